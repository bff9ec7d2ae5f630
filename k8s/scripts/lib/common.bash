# Helpers shared by the k8s/scripts/*.sh commands (sourced, not run).
# They read $DRY_RUN (true|false) and $COMMAND (the subcommand, for error messages).

die() { echo "error: $*" >&2; exit 1; }

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

# The tools a command needs; without --dry-run a missing one is an error naming it (exit 2).
require_tools() {
  $DRY_RUN && return 0
  local tool
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "error: $tool not found in PATH (needed for $COMMAND)" >&2
      exit 2
    fi
  done
}

# Print a command as "+ cmd args" (shell-quoted) and run it unless --dry-run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  $DRY_RUN || "$@"
}
