#!/usr/bin/env bash
# Deploy the telemetry pipeline across two clusters: streamers on the EDGE cluster, collectors +
# API gateway + dashboard + PostgreSQL on the CENTRAL cluster, both talking to one Redis that
# lives outside the edge cluster (managed Redis, or one exposed by the central cluster).
#
# Passwords never reach a helm command line: the script creates the Secrets itself (manifest on
# kubectl's stdin) and hands the chart their names (externalRedis.existingSecret,
# postgresql.auth.existingSecret).
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib/common.bash
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

PROG=$(basename -- "$0")
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
CHART=$(cd -- "$SCRIPT_DIR/../helm/telemetry-pipeline" 2>/dev/null && pwd || echo "$SCRIPT_DIR/../helm/telemetry-pipeline")

EDGE_CONTEXT=${EDGE_CONTEXT:-kind-telemetry-edge}
CENTRAL_CONTEXT=${CENTRAL_CONTEXT:-kind-telemetry-central}
REDIS_HOST=${REDIS_HOST:-}
REDIS_PORT=${REDIS_PORT:-6379}
REDIS_PASSWORD=${REDIS_PASSWORD:-}
REDIS_TLS=false
DB_PASSWORD=${DB_PASSWORD:-}
NAMESPACE=telemetry
RELEASE=telemetry
IMAGE=""
IMAGE_PULL_POLICY=""
TIMEOUT=10m
WAIT=true
POD_SECURITY=restricted
DRY_RUN=false
EDGE_VALUES=()
CENTRAL_VALUES=()
EDGE_SET=()
CENTRAL_SET=()
COMMAND=""

usage() {
  cat <<EOF
Usage: $PROG [options] <command>

Deploy the telemetry pipeline across an edge and a central Kubernetes cluster with Helm.

Commands:
  deploy-edge      streamers on the edge cluster (values-edge-cluster.yaml)
  deploy-central   collectors, API gateway, dashboard, PostgreSQL on the central cluster
                   (values-central-cluster.yaml)
  deploy-all       deploy-central, then deploy-edge
  status           helm status and pods of the release in both clusters
  test             helm test of the release in both clusters (deployment-check notebook)
  uninstall        helm uninstall in both clusters and delete the Secrets this script made

Options:
  --edge-context CTX       kube context of the edge cluster      (default: $EDGE_CONTEXT)
  --central-context CTX    kube context of the central cluster   (default: $CENTRAL_CONTEXT)
  --redis-host HOST        Redis both clusters use (required for deploy-*; env REDIS_HOST)
  --redis-port PORT        its port                               (default: $REDIS_PORT)
  --redis-password PW      its password (prefer env REDIS_PASSWORD or --redis-password-file)
  --redis-password-file F  read the Redis password from file F
  --redis-tls              connect with TLS (rediss://)
  --db-password PW         password of the central PostgreSQL (prefer env DB_PASSWORD or
                           --db-password-file; empty: the chart generates and keeps one)
  --db-password-file F     read the PostgreSQL password from file F
  --namespace NS           namespace in both clusters             (default: $NAMESPACE)
  --release NAME           Helm release name in both clusters     (default: $RELEASE)
  --chart DIR              chart directory                        (default: k8s/helm/telemetry-pipeline)
  --image REPO:TAG         image of the pipeline (sets image.repository and image.tag)
  --image-pull-policy P    Always | IfNotPresent | Never
  --edge-values FILE       extra values file for the edge release (repeatable)
  --central-values FILE    extra values file for the central release (repeatable)
  --edge-set KEY=VAL       extra --set for the edge release (repeatable)
  --central-set KEY=VAL    extra --set for the central release (repeatable)
  --pod-security LEVEL     Pod Security level enforced on the namespace (default: $POD_SECURITY;
                           "none" leaves the namespace labels alone)
  --timeout DUR            helm --timeout                          (default: $TIMEOUT)
  --no-wait                do not wait for the rollout (helm --wait)
  --dry-run                print every helm/kubectl command (prefixed "+ ") and run none;
                           works without helm or kubectl installed
  -h, --help               show this help

Passwords are written into Secrets named <release>-redis-auth (key redis-password) and
<release>-postgresql-auth (key postgres-password) through kubectl's stdin; they never appear
in a helm command or in the --dry-run output.

Exit status: 0 ok, 1 usage error, 2 a required tool (helm, kubectl) is missing, else the
failing command's status.

Example:
  REDIS_PASSWORD=s3cret $PROG --redis-host 172.18.0.3 --redis-port 30379 deploy-all
EOF
}



read_file() { [[ -r $1 ]] || die "cannot read $1"; local s; s=$(<"$1"); printf '%s' "${s%$'\n'}"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --edge-context) need_value "$@"; EDGE_CONTEXT=$2; shift 2 ;;
    --central-context) need_value "$@"; CENTRAL_CONTEXT=$2; shift 2 ;;
    --redis-host) need_value "$@"; REDIS_HOST=$2; shift 2 ;;
    --redis-port) need_value "$@"; REDIS_PORT=$2; shift 2 ;;
    --redis-password) need_value "$@"; REDIS_PASSWORD=$2; shift 2 ;;
    --redis-password-file) need_value "$@"; REDIS_PASSWORD=$(read_file "$2"); shift 2 ;;
    --redis-tls) REDIS_TLS=true; shift ;;
    --db-password) need_value "$@"; DB_PASSWORD=$2; shift 2 ;;
    --db-password-file) need_value "$@"; DB_PASSWORD=$(read_file "$2"); shift 2 ;;
    --namespace|-n) need_value "$@"; NAMESPACE=$2; shift 2 ;;
    --release) need_value "$@"; RELEASE=$2; shift 2 ;;
    --chart) need_value "$@"; CHART=$2; shift 2 ;;
    --image) need_value "$@"; IMAGE=$2; shift 2 ;;
    --image-pull-policy) need_value "$@"; IMAGE_PULL_POLICY=$2; shift 2 ;;
    --edge-values) need_value "$@"; EDGE_VALUES+=("$2"); shift 2 ;;
    --central-values) need_value "$@"; CENTRAL_VALUES+=("$2"); shift 2 ;;
    --edge-set) need_value "$@"; EDGE_SET+=("$2"); shift 2 ;;
    --central-set) need_value "$@"; CENTRAL_SET+=("$2"); shift 2 ;;
    --pod-security) need_value "$@"; POD_SECURITY=$2; shift 2 ;;
    --timeout) need_value "$@"; TIMEOUT=$2; shift 2 ;;
    --no-wait) WAIT=false; shift ;;
    --dry-run) DRY_RUN=true; shift ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z $COMMAND ]] || die "one command at a time (got '$COMMAND' and '$1')"
      COMMAND=$1; shift ;;
  esac
done

[[ -n $COMMAND ]] || { usage >&2; exit 1; }
case $COMMAND in
  deploy-edge|deploy-central|deploy-all|status|test|uninstall) ;;
  *) die "unknown command '$COMMAND' (see --help)" ;;
esac
[[ $REDIS_PORT =~ ^[0-9]+$ ]] || die "--redis-port must be a number, got '$REDIS_PORT'"
case $POD_SECURITY in privileged|baseline|restricted|none) ;; *) die "--pod-security must be privileged, baseline, restricted or none" ;; esac
if [[ $COMMAND == deploy-* ]]; then
  [[ -n $REDIS_HOST ]] || die "--redis-host is required for $COMMAND"
  [[ -f $CHART/Chart.yaml ]] || die "no chart at $CHART (use --chart)"
fi

REDIS_SECRET="$RELEASE-redis-auth"
DB_SECRET="$RELEASE-postgresql-auth"

# ------------------------------------------------------------------------------- helpers ----

# Apply a manifest given on stdin; only the note (never the manifest) is printed.
apply_stdin() {
  local context=$1 note=$2
  printf '+ kubectl --context %q apply -f -  # %s\n' "$context" "$note"
  if $DRY_RUN; then
    cat >/dev/null
  else
    kubectl --context "$context" apply -f -
  fi
}

b64() { printf '%s' "$1" | base64 | tr -d '\n'; }

ensure_namespace() {
  local context=$1
  local labels=""
  if [[ $POD_SECURITY != none ]]; then
    labels="  labels:
    pod-security.kubernetes.io/enforce: $POD_SECURITY
    pod-security.kubernetes.io/warn: $POD_SECURITY"
  fi
  apply_stdin "$context" "Namespace $NAMESPACE (pod-security: $POD_SECURITY)" <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NAMESPACE
$labels
EOF
}

# A Secret with one key; the value travels base64-encoded on kubectl's stdin only.
apply_secret() {
  local context=$1 name=$2 key=$3 value=$4
  apply_stdin "$context" "Secret $NAMESPACE/$name (key $key; value from stdin, not shown)" <<EOF
apiVersion: v1
kind: Secret
metadata:
  name: $name
  namespace: $NAMESPACE
  labels:
    app.kubernetes.io/name: telemetry-pipeline
    app.kubernetes.io/instance: $RELEASE
    app.kubernetes.io/managed-by: deploy-cross-cluster
type: Opaque
data:
  $key: $(b64 "$value")
EOF
}

check_context() {
  $DRY_RUN && return 0
  local context=$1 contexts
  # read the list first: `kubectl … | grep -q` under pipefail fails when grep exits early (SIGPIPE)
  contexts=$(kubectl config get-contexts -o name 2>/dev/null) || contexts=""
  if ! grep -qxF -- "$context" <<<"$contexts"; then
    echo "error: kube context '$context' not found (kubectl config get-contexts)" >&2
    exit 1
  fi
}

# Common helm arguments: image, Redis endpoint, waiting.
helm_common_args() {
  HELM_ARGS=(--namespace "$NAMESPACE")
  if [[ -n $IMAGE ]]; then
    # A tag is what follows the last ":" of the last path segment (registry:port/repo[:tag]).
    if [[ ${IMAGE##*/} == *:* ]]; then
      HELM_ARGS+=(--set-string "image.repository=${IMAGE%:*}" --set-string "image.tag=${IMAGE##*:}")
    else
      HELM_ARGS+=(--set-string "image.repository=$IMAGE")
    fi
  fi
  if [[ -n $IMAGE_PULL_POLICY ]]; then
    HELM_ARGS+=(--set-string "image.pullPolicy=$IMAGE_PULL_POLICY")
  fi
  HELM_ARGS+=(--set-string "externalRedis.host=$REDIS_HOST" --set "externalRedis.port=$REDIS_PORT"
              --set "externalRedis.tls.enabled=$REDIS_TLS")
  if [[ -n $REDIS_PASSWORD ]]; then
    HELM_ARGS+=(--set-string "externalRedis.existingSecret=$REDIS_SECRET"
                --set-string "externalRedis.existingSecretPasswordKey=redis-password")
  fi
  if $WAIT; then
    HELM_ARGS+=(--wait --timeout "$TIMEOUT")
  fi
}

deploy_edge() {
  check_context "$EDGE_CONTEXT"
  echo "# edge cluster ($EDGE_CONTEXT): streamers -> redis $REDIS_HOST:$REDIS_PORT" >&2
  ensure_namespace "$EDGE_CONTEXT"
  if [[ -n $REDIS_PASSWORD ]]; then
    apply_secret "$EDGE_CONTEXT" "$REDIS_SECRET" redis-password "$REDIS_PASSWORD"
  fi
  helm_common_args
  local args=(-f "$CHART/values-edge-cluster.yaml") f s
  for f in ${EDGE_VALUES[@]+"${EDGE_VALUES[@]}"}; do args+=(-f "$f"); done
  local sets=()
  for s in ${EDGE_SET[@]+"${EDGE_SET[@]}"}; do sets+=(--set "$s"); done
  run helm --kube-context "$EDGE_CONTEXT" upgrade --install "$RELEASE" "$CHART" "${args[@]}" "${HELM_ARGS[@]}" \
    ${sets[@]+"${sets[@]}"}
}

deploy_central() {
  check_context "$CENTRAL_CONTEXT"
  echo "# central cluster ($CENTRAL_CONTEXT): collectors, API, dashboard, PostgreSQL <- redis $REDIS_HOST:$REDIS_PORT" >&2
  ensure_namespace "$CENTRAL_CONTEXT"
  if [[ -n $REDIS_PASSWORD ]]; then
    apply_secret "$CENTRAL_CONTEXT" "$REDIS_SECRET" redis-password "$REDIS_PASSWORD"
  fi
  if [[ -n $DB_PASSWORD ]]; then
    apply_secret "$CENTRAL_CONTEXT" "$DB_SECRET" postgres-password "$DB_PASSWORD"
  fi
  helm_common_args
  local args=(-f "$CHART/values-central-cluster.yaml") f s
  for f in ${CENTRAL_VALUES[@]+"${CENTRAL_VALUES[@]}"}; do args+=(-f "$f"); done
  local sets=()
  if [[ -n $DB_PASSWORD ]]; then
    sets+=(--set-string "postgresql.auth.existingSecret=$DB_SECRET"
           --set-string "postgresql.auth.existingSecretPasswordKey=postgres-password")
  fi
  for s in ${CENTRAL_SET[@]+"${CENTRAL_SET[@]}"}; do sets+=(--set "$s"); done
  run helm --kube-context "$CENTRAL_CONTEXT" upgrade --install "$RELEASE" "$CHART" "${args[@]}" "${HELM_ARGS[@]}" \
    ${sets[@]+"${sets[@]}"}
}

status() {
  local context
  for context in "$CENTRAL_CONTEXT" "$EDGE_CONTEXT"; do
    echo "# $context" >&2
    run helm --kube-context "$context" status "$RELEASE" --namespace "$NAMESPACE" || true
    run kubectl --context "$context" --namespace "$NAMESPACE" get pods,svc \
      -l "app.kubernetes.io/instance=$RELEASE" -L app.kubernetes.io/component -o wide || true
  done
}

helm_tests() {
  local context rc=0
  for context in "$CENTRAL_CONTEXT" "$EDGE_CONTEXT"; do
    run helm --kube-context "$context" test "$RELEASE" --namespace "$NAMESPACE" --logs --timeout "$TIMEOUT" || rc=$?
  done
  return "$rc"
}

uninstall() {
  local context
  for context in "$EDGE_CONTEXT" "$CENTRAL_CONTEXT"; do
    run helm --kube-context "$context" uninstall "$RELEASE" --namespace "$NAMESPACE" --ignore-not-found
    run kubectl --context "$context" --namespace "$NAMESPACE" delete secret "$REDIS_SECRET" "$DB_SECRET" --ignore-not-found
  done
}

# ---------------------------------------------------------------------------------- main ----

case $COMMAND in
  deploy-edge)    require_tools helm kubectl; deploy_edge ;;
  deploy-central) require_tools helm kubectl; deploy_central ;;
  deploy-all)     require_tools helm kubectl; deploy_central; deploy_edge ;;
  status)         require_tools helm kubectl; status ;;
  test)           require_tools helm; helm_tests ;;
  uninstall)      require_tools helm kubectl; uninstall ;;
esac
