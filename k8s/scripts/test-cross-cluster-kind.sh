#!/usr/bin/env bash
# End-to-end test of the cross-cluster layout on two local kind clusters:
#   1. create the edge and central clusters, build the image and load it (setup-kind-clusters.sh)
#   2. run a stand-in "external" Redis in the central cluster, exposed on a NodePort
#   3. deploy the central release, then the edge release, pointed at that Redis
#      (deploy-cross-cluster.sh deploy-all)
#   4. wait for every rollout, run `helm test` (the deployment-check notebook) in both clusters
#   5. report, and delete the clusters unless --keep
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib/common.bash
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

PROG=$(basename -- "$0")
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
CHART=$(cd -- "$SCRIPT_DIR/../helm/telemetry-pipeline" && pwd)

EDGE_NAME=telemetry-edge
CENTRAL_NAME=telemetry-central
IMAGE=telemetry-nb:dev
NAMESPACE=telemetry
RELEASE=telemetry
REDIS_NAMESPACE=telemetry-redis
REDIS_RELEASE=redis
REDIS_NODE_PORT=30379
TIMEOUT=10m
KEEP=false
BUILD=true
DRY_RUN=false
COMMAND=""

usage() {
  cat <<EOF
Usage: $PROG [options] <command>

Cross-cluster end-to-end test on two kind clusters (needs docker, kind, helm, kubectl).

Commands:
  full-test   create clusters, build + load the image, deploy central then edge, wait for the
              rollouts, run helm test in both clusters, report; then delete the clusters
              (unless --keep)
  cleanup     delete the clusters

Options:
  --edge-name NAME      edge kind cluster    (default: $EDGE_NAME)
  --central-name NAME   central kind cluster (default: $CENTRAL_NAME)
  --image TAG           services image to build and load (default: $IMAGE; the notebook image
                        is REPO-notebooks:TAG, built by k8s/scripts/build-image.sh)
  --no-build            use an already built image
  --namespace NS        pipeline namespace   (default: $NAMESPACE)
  --release NAME        pipeline release     (default: $RELEASE)
  --redis-node-port N   NodePort of the stand-in external Redis (default: $REDIS_NODE_PORT)
  --timeout DUR         rollout / helm timeout (default: $TIMEOUT)
  --keep                keep the clusters after the test
  --dry-run             print every command (prefixed "+ ") and run none
  -h, --help            show this help

Exit status: 0 when every helm test passed, 1 usage error or a failed step, 2 a required tool
is missing.
EOF
}


while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --edge-name) need_value "$@"; EDGE_NAME=$2; shift 2 ;;
    --central-name) need_value "$@"; CENTRAL_NAME=$2; shift 2 ;;
    --image) need_value "$@"; IMAGE=$2; shift 2 ;;
    --no-build) BUILD=false; shift ;;
    --namespace) need_value "$@"; NAMESPACE=$2; shift 2 ;;
    --release) need_value "$@"; RELEASE=$2; shift 2 ;;
    --redis-node-port) need_value "$@"; REDIS_NODE_PORT=$2; shift 2 ;;
    --timeout) need_value "$@"; TIMEOUT=$2; shift 2 ;;
    --keep) KEEP=true; shift ;;
    --dry-run) DRY_RUN=true; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z $COMMAND ]] || die "one command at a time (got '$COMMAND' and '$1')"
      COMMAND=$1; shift ;;
  esac
done

[[ -n $COMMAND ]] || { usage >&2; exit 1; }
case $COMMAND in full-test|cleanup) ;; *) die "unknown command '$COMMAND' (see --help)" ;; esac

EDGE_CONTEXT="kind-$EDGE_NAME"
CENTRAL_CONTEXT="kind-$CENTRAL_NAME"
KIND_ARGS=(--edge-name "$EDGE_NAME" --central-name "$CENTRAL_NAME" --image "$IMAGE")
$BUILD || KIND_ARGS+=(--no-build)
DEPLOY_ARGS=(--edge-context "$EDGE_CONTEXT" --central-context "$CENTRAL_CONTEXT"
             --namespace "$NAMESPACE" --release "$RELEASE" --timeout "$TIMEOUT")
if $DRY_RUN; then
  KIND_ARGS+=(--dry-run)
  DEPLOY_ARGS+=(--dry-run)
fi

step() { printf '\n==> %s\n' "$*" >&2; }

# Our own sub-scripts: printed like any command, and run even under --dry-run (they get
# --dry-run too and print their own commands).
sub() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  "$@"
}

cleanup() {
  sub "$SCRIPT_DIR/setup-kind-clusters.sh" "${KIND_ARGS[@]}" delete-all
}

# A stand-in for a managed Redis: this chart with only its built-in Redis, on a NodePort of the
# central cluster. The edge cluster reaches it at <central node IP>:<node port>.
deploy_external_redis() {
  local b64
  b64=$(printf '%s' "$REDIS_PASSWORD" | base64 | tr -d '\n')
  printf '+ kubectl --context %q apply -f -  # Namespace %s + Secret %s/redis-auth (value not shown)\n' \
    "$CENTRAL_CONTEXT" "$REDIS_NAMESPACE" "$REDIS_NAMESPACE"
  if ! $DRY_RUN; then
    kubectl --context "$CENTRAL_CONTEXT" apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $REDIS_NAMESPACE
  labels:
    pod-security.kubernetes.io/enforce: restricted
---
apiVersion: v1
kind: Secret
metadata:
  name: redis-auth
  namespace: $REDIS_NAMESPACE
type: Opaque
data:
  redis-password: $b64
EOF
  fi
  run helm --kube-context "$CENTRAL_CONTEXT" upgrade --install "$REDIS_RELEASE" "$CHART" \
    --namespace "$REDIS_NAMESPACE" \
    --set streamer.enabled=false --set collector.enabled=false --set apiGateway.enabled=false \
    --set dashboard.enabled=false --set postgresql.enabled=false --set tests.enabled=false \
    --set redis.enabled=true --set redis.persistence.enabled=false \
    --set redis.service.type=NodePort --set "redis.service.nodePort=$REDIS_NODE_PORT" \
    --set-string redis.auth.existingSecret=redis-auth \
    --wait --timeout "$TIMEOUT"
}

central_ip() {
  if $DRY_RUN; then
    echo "<central-node-ip>"
  else
    "$SCRIPT_DIR/setup-kind-clusters.sh" --central-name "$CENTRAL_NAME" central-ip
  fi
}

# Every Deployment and StatefulSet of the release in one cluster, found by label.
wait_rollouts() {
  local context=$1 workload
  local selector="app.kubernetes.io/instance=$RELEASE"
  local workloads=("<each workload listed above>")
  run kubectl --context "$context" --namespace "$NAMESPACE" get deployments,statefulsets -l "$selector" -o name
  if ! $DRY_RUN; then
    mapfile -t workloads < <(kubectl --context "$context" --namespace "$NAMESPACE" \
      get deployments,statefulsets -l "$selector" -o name)
    [[ ${#workloads[@]} -gt 0 ]] || die "no workloads of release $RELEASE in $context/$NAMESPACE"
  fi
  for workload in "${workloads[@]}"; do
    run kubectl --context "$context" --namespace "$NAMESPACE" rollout status "$workload" --timeout "$TIMEOUT"
  done
}

full_test() {
  step "1/6 kind clusters + image"
  sub "$SCRIPT_DIR/setup-kind-clusters.sh" "${KIND_ARGS[@]}" create-all

  step "2/6 stand-in external Redis in the central cluster (NodePort $REDIS_NODE_PORT)"
  REDIS_PASSWORD=${REDIS_PASSWORD:-$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 24 || true)}
  # deploy-cross-cluster.sh reads it from the environment: it never shows up in a command line.
  export REDIS_PASSWORD
  deploy_external_redis
  local redis_host
  redis_host=$(central_ip)
  echo "# external Redis: $redis_host:$REDIS_NODE_PORT" >&2

  step "3/6 deploy central, then edge"
  sub "$SCRIPT_DIR/deploy-cross-cluster.sh" "${DEPLOY_ARGS[@]}" \
    --redis-host "$redis_host" --redis-port "$REDIS_NODE_PORT" \
    --image "$IMAGE" --image-pull-policy Never \
    --central-set collector.autoscaling.enabled=false --central-set collector.replicas=2 \
    --central-set postgresql.persistence.size=1Gi --edge-set streamer.replicas=2 \
    deploy-all

  step "4/6 rollouts"
  wait_rollouts "$CENTRAL_CONTEXT"
  wait_rollouts "$EDGE_CONTEXT"

  step "5/6 helm test (deployment-check notebook) in both clusters"
  local rc=0
  sub "$SCRIPT_DIR/deploy-cross-cluster.sh" "${DEPLOY_ARGS[@]}" test || rc=$?

  step "6/6 report"
  sub "$SCRIPT_DIR/deploy-cross-cluster.sh" "${DEPLOY_ARGS[@]}" status || true
  if $DRY_RUN; then
    echo "DRY RUN: the commands above were printed, none was run"
  elif [[ $rc -eq 0 ]]; then
    echo "PASS: cross-cluster deployment is healthy (helm test passed in $CENTRAL_CONTEXT and $EDGE_CONTEXT)"
  else
    echo "FAIL: helm test failed (exit $rc); see the logs above" >&2
  fi
  return "$rc"
}

case $COMMAND in
  full-test)
    require_tools docker kind helm kubectl
    rc=0
    full_test || rc=$?
    if $KEEP; then
      echo "# --keep: clusters kept (contexts $EDGE_CONTEXT, $CENTRAL_CONTEXT)" >&2
    else
      cleanup || true
    fi
    exit "$rc"
    ;;
  cleanup)
    require_tools docker kind
    cleanup
    ;;
esac
