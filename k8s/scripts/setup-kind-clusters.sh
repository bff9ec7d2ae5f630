#!/usr/bin/env bash
# Create (or delete) the two local kind clusters used to try the cross-cluster layout:
# an EDGE cluster for the streamers and a CENTRAL cluster for collectors, API and PostgreSQL,
# and load the telemetry-nb image into both.
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib/common.bash
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

PROG=$(basename -- "$0")
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

EDGE_NAME=telemetry-edge
CENTRAL_NAME=telemetry-central
IMAGE=telemetry-nb:dev
NODE_IMAGE=""
BUILD=true
DRY_RUN=false
COMMAND=""

usage() {
  cat <<EOF
Usage: $PROG [options] <command>

Local kind clusters for the cross-cluster deployment (k8s/scripts/deploy-cross-cluster.sh).

Commands:
  create-all    create the edge and central clusters, build the image and load it into both
  load-image    build the image (unless --no-build) and load it into both clusters
  delete-all    delete both clusters
  central-ip    print the central node's address on the "kind" docker network (how the edge
                cluster reaches a NodePort of the central one)

Options:
  --edge-name NAME      edge cluster name      (default: $EDGE_NAME; context kind-NAME)
  --central-name NAME   central cluster name   (default: $CENTRAL_NAME; context kind-NAME)
  --image TAG           services image to build and load (default: $IMAGE); the notebook
                        image REPO-notebooks:TAG goes with it (k8s/scripts/build-image.sh)
  --node-image IMG      kindest/node image (Kubernetes >= 1.29 needed for the pod-index label)
  --no-build            load images you built yourself instead of running build-image.sh
  --dry-run             print every docker/kind command (prefixed "+ ") and run none;
                        works without docker or kind installed
  -h, --help            show this help

Exit status: 0 ok, 1 usage error, 2 a required tool (docker, kind) is missing.
EOF
}


while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --edge-name) need_value "$@"; EDGE_NAME=$2; shift 2 ;;
    --central-name) need_value "$@"; CENTRAL_NAME=$2; shift 2 ;;
    --image) need_value "$@"; IMAGE=$2; shift 2 ;;
    --node-image) need_value "$@"; NODE_IMAGE=$2; shift 2 ;;
    --no-build) BUILD=false; shift ;;
    --dry-run) DRY_RUN=true; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z $COMMAND ]] || die "one command at a time (got '$COMMAND' and '$1')"
      COMMAND=$1; shift ;;
  esac
done

[[ -n $COMMAND ]] || { usage >&2; exit 1; }
case $COMMAND in
  create-all|load-image|delete-all|central-ip) ;;
  *) die "unknown command '$COMMAND' (see --help)" ;;
esac

cluster_exists() {
  $DRY_RUN && return 1
  local clusters  # read first: under pipefail an early-exiting grep -q would fail the pipe (SIGPIPE)
  clusters=$(kind get clusters 2>/dev/null) || clusters=""
  grep -qxF -- "$1" <<<"$clusters"
}

create_cluster() {
  local name=$1
  if cluster_exists "$name"; then
    echo "# kind cluster $name exists, keeping it" >&2
    return 0
  fi
  local args=(kind create cluster --name "$name" --wait 180s)
  [[ -z $NODE_IMAGE ]] || args+=(--image "$NODE_IMAGE")
  run "${args[@]}"
}

# The notebook (full) image is named as build-image.sh and the chart's notebookImage default name it.
notebook_image() {
  if [[ ${IMAGE##*/} == *:* ]]; then echo "${IMAGE%:*}-notebooks:${IMAGE##*:}"; else echo "$IMAGE-notebooks"; fi
}

build_image() {
  if $BUILD; then
    # the same two images as everywhere else (k8s/scripts/build-image.sh), with docker: kind loads from it
    local args=("$SCRIPT_DIR/build-image.sh" --engine docker --image "$IMAGE")
    $DRY_RUN && args+=(--dry-run)
    printf '+'
    printf ' %q' "${args[@]}"
    printf '\n'
    "${args[@]}"
  fi
}

load_image() {
  local name image
  for name in "$EDGE_NAME" "$CENTRAL_NAME"; do
    for image in "$IMAGE" "$(notebook_image)"; do
      run kind load docker-image "$image" --name "$name"
    done
  done
}

case $COMMAND in
  create-all)
    require_tools docker kind
    create_cluster "$EDGE_NAME"
    create_cluster "$CENTRAL_NAME"
    build_image
    load_image
    echo "# contexts: kind-$EDGE_NAME (edge), kind-$CENTRAL_NAME (central)" >&2
    ;;
  load-image)
    require_tools docker kind
    build_image
    load_image
    ;;
  delete-all)
    require_tools docker kind
    run kind delete cluster --name "$EDGE_NAME"
    run kind delete cluster --name "$CENTRAL_NAME"
    ;;
  central-ip)
    require_tools docker
    # Only the address goes to stdout, so $( ... central-ip) can capture it.
    if $DRY_RUN; then
      run docker inspect -f '{{ .NetworkSettings.Networks.kind.IPAddress }}' "$CENTRAL_NAME-control-plane"
    else
      docker inspect -f '{{ .NetworkSettings.Networks.kind.IPAddress }}' "$CENTRAL_NAME-control-plane"
    fi
    ;;
esac
