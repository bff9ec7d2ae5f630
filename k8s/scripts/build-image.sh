#!/usr/bin/env bash
# Build the pipeline's two images from k8s/Dockerfile:
#   services  (target "services")  streamer, collector, API gateway, `check`; no Jupyter
#   notebooks (target "full")      the services plus dashboard, notebooks and papermill (helm test)
# with docker (buildx when present) where a docker engine answers, else podman.
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib/common.bash
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

PROG=$(basename -- "$0")
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd)

IMAGE=telemetry-nb:dev
NOTEBOOK_IMAGE=""
TARGETS=both
BASE=python:3.11-slim
DEBIAN_BASE=localhost/debian-python:bookworm
DEBIAN_SUITE=bookworm
REBUILD_BASE=false
ENGINE=auto
PODMAN_RUNTIME=${PODMAN_RUNTIME:-}
DOCKERFILE=$REPO_ROOT/k8s/Dockerfile
CONTEXT=$REPO_ROOT
PIP_CONFIG=true
DRY_RUN=false
COMMAND=build  # read by require_tools (lib/common.bash)
export COMMAND

usage() {
  cat <<EOF
Usage: $PROG [options]

Build the telemetry-nb images from k8s/Dockerfile (run from anywhere; the context is the repository).

  services image  (--target services)  telemetry-nb stream | collect | serve | check
  notebook image  (--target full)      the services plus dashboard, notebooks, papermill (helm test)

Options:
  --image REF           services image            (default: $IMAGE)
  --notebook-image REF  notebook (full) image     (default: the --image repository + "-notebooks",
                                                   same tag: telemetry-nb-notebooks:dev); the chart's
                                                   notebookImage defaults to the same naming
  --target T            services | full | both    (default: $TARGETS)
  --base IMAGE          Python base image (default: $BASE). "debian-local" builds a Debian 12
                        base with mmdebstrap and imports it as $DEBIAN_BASE
                        (podman only; reused when it exists)
  --rebuild-base        with --base debian-local: build the Debian base even if it exists
  --engine E            docker | podman | auto (default: auto = docker when \`docker info\`
                        answers, else podman)
  --podman-runtime R    OCI runtime for podman, e.g. runc (default: \$PODMAN_RUNTIME or podman's own)
  --dockerfile FILE     Dockerfile to build (default: k8s/Dockerfile)
  --context DIR         build context (default: the repository root)
  --no-pip-config       podman: do not mount this machine's pip configuration and CA bundle
  --dry-run             print every command (prefixed "+ ") and run none; needs no tools
  -h, --help            show this help

With podman the build sees this machine's pip configuration read-only (--volume): the CA bundle
named by \$SSL_CERT_FILE, the pip.conf files that exist (/etc/pip.conf, /etc/xdg/pip/pip.conf,
~/.config/pip/pip.conf, ~/.pip/pip.conf) and the files they name (cert, constraint), so pip
inside the build reaches the package index exactly as pip does here. docker builds use their
own network settings.

Exit status: 0 built, 1 usage error or a failed build, 2 a required tool is missing.
EOF
}

while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --image) need_value "$@"; IMAGE=$2; shift 2 ;;
    --notebook-image) need_value "$@"; NOTEBOOK_IMAGE=$2; shift 2 ;;
    --target) need_value "$@"; TARGETS=$2; shift 2 ;;
    --base) need_value "$@"; BASE=$2; shift 2 ;;
    --rebuild-base) REBUILD_BASE=true; shift ;;
    --engine) need_value "$@"; ENGINE=$2; shift 2 ;;
    --podman-runtime) need_value "$@"; PODMAN_RUNTIME=$2; shift 2 ;;
    --dockerfile) need_value "$@"; DOCKERFILE=$2; shift 2 ;;
    --context) need_value "$@"; CONTEXT=$2; shift 2 ;;
    --no-pip-config) PIP_CONFIG=false; shift ;;
    --dry-run) DRY_RUN=true; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

case $TARGETS in services|full|both) ;; *) die "--target must be services, full or both" ;; esac
case $ENGINE in auto|docker|podman) ;; *) die "--engine must be docker, podman or auto" ;; esac
if [[ -z $NOTEBOOK_IMAGE ]]; then
  if [[ ${IMAGE##*/} == *:* ]]; then
    NOTEBOOK_IMAGE="${IMAGE%:*}-notebooks:${IMAGE##*:}"
  else
    NOTEBOOK_IMAGE="$IMAGE-notebooks"
  fi
fi

# docker only counts when its engine answers (a docker CLI without a daemon is common).
pick_engine() {
  if [[ $ENGINE != auto ]]; then
    echo "$ENGINE"
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo docker
  elif command -v podman >/dev/null 2>&1; then
    echo podman
  else
    echo none
  fi
}
ENGINE=$(pick_engine)
if [[ $ENGINE == none ]]; then
  $DRY_RUN || { echo "error: neither a docker engine (docker info) nor podman found" >&2; exit 2; }
  ENGINE=docker
fi
require_tools "$ENGINE"

PODMAN=(podman)
[[ -z $PODMAN_RUNTIME ]] || PODMAN=(podman --runtime "$PODMAN_RUNTIME")

# A Debian 12 base with python3 + venv, from Debian's mirror (no image registry needed).
build_debian_base() {
  [[ $ENGINE == podman ]] || die "--base debian-local needs podman (docker: docker import the rootfs yourself)"
  if ! $REBUILD_BASE && ! $DRY_RUN && "${PODMAN[@]}" image exists "$DEBIAN_BASE"; then
    echo "# $DEBIAN_BASE exists, reusing it (--rebuild-base to rebuild)" >&2
    return 0
  fi
  require_tools mmdebstrap
  local dir
  dir=/tmp/debian-base
  $DRY_RUN || dir=$(mktemp -d)
  run mmdebstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$DEBIAN_SUITE" "$dir/rootfs.tar"
  run "${PODMAN[@]}" import "$dir/rootfs.tar" "$DEBIAN_BASE"
  $DRY_RUN || rm -rf -- "$dir"
}

# --volume arguments: the CA bundle and pip configuration of this machine, read-only.
pip_volumes() {
  local files=() f key value
  [[ -n ${SSL_CERT_FILE:-} && -f ${SSL_CERT_FILE:-} ]] && files+=("$SSL_CERT_FILE")
  for f in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
    [[ -f $f ]] || continue
    files+=("$f")
    # files a config names (cert = ..., constraint = ...) must exist inside the build too
    while IFS='=' read -r key value; do
      key=${key//[[:space:]]/}
      value=${value#"${value%%[![:space:]]*}"}
      value=${value%"${value##*[![:space:]]}"}
      case $key in cert|client-cert|constraint|requirement) [[ -f $value ]] && files+=("$value") ;; esac
    done <"$f"
  done
  local -A seen=()
  for f in ${files[@]+"${files[@]}"}; do
    [[ -z ${seen[$f]:-} ]] || continue
    seen[$f]=1
    # the user's pip.conf is read at /root/... inside the build (it runs as root)
    local target=$f
    [[ $f == "$HOME"/* ]] && target="/root/${f#"$HOME"/}"
    printf '%s\n' "--volume=$f:$target:ro"
  done
}

build_one() {
  local target=$1 tag=$2 args=()
  case $ENGINE in
    docker)
      if $DRY_RUN || docker buildx version >/dev/null 2>&1; then
        args=(docker buildx build --load)
      else
        args=(env DOCKER_BUILDKIT=1 docker build)
      fi
      ;;
    podman)
      args=("${PODMAN[@]}" build --layers)
      # podman reads the ignore file next to the Dockerfile only when told
      [[ -f $DOCKERFILE.dockerignore ]] && args+=(--ignorefile "$DOCKERFILE.dockerignore")
      if $PIP_CONFIG; then
        local vols
        mapfile -t vols < <(pip_volumes)
        args+=(${vols[@]+"${vols[@]}"})
      fi
      ;;
  esac
  args+=(-f "$DOCKERFILE" --target "$target" --build-arg "PYTHON_IMAGE=$BASE" -t "$tag" "$CONTEXT")
  run "${args[@]}"
}

size_of() {
  $DRY_RUN && return 0
  local bytes
  if [[ $ENGINE == podman ]]; then
    bytes=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$1")
  else
    bytes=$(docker image inspect --format '{{.Size}}' "$1")
  fi
  echo "# $1: $((bytes / 1000000)) MB" >&2
}

if [[ $BASE == debian-local ]]; then
  build_debian_base
  BASE=$DEBIAN_BASE
fi
echo "# engine: $ENGINE, base: $BASE" >&2
if [[ $TARGETS == services || $TARGETS == both ]]; then
  build_one services "$IMAGE"
fi
if [[ $TARGETS == full || $TARGETS == both ]]; then
  build_one full "$NOTEBOOK_IMAGE"
fi
[[ $TARGETS == full ]] || size_of "$IMAGE"
[[ $TARGETS == services ]] || size_of "$NOTEBOOK_IMAGE"
