# Helpers shared by the cluster launchers (sourced, not run). The caller sets `usage_lines`
# (the sed range of its header comment that shows how to call it) before calling `usage`.

usage() {
  sed -n "${usage_lines}p" "$0" | sed 's/^# \{0,1\}//' >&2
  echo "Options: see the comment at the top of $0." >&2
  exit 2
}

die() {
  echo "launch/$(basename "$0"): $*" >&2
  exit 2
}

# Shell-quotes one word only when needed, so printed commands stay readable and paste-able.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# The main args (after '--') must name the workdir and must not set what the launcher sets itself
# (the coordinator flags). Usage: check_main_args WHY ARG... ; WHY ends the error line for a
# coordinator flag, after the flag itself.
check_main_args() {
  local why="$1" arg have_workdir=0
  shift
  for arg in "$@"; do
    case "$arg" in
      --workdir=*) have_workdir=1 ;;
      --coordinator_address*|--num_processes*|--process_id*) die "'$arg'$why" ;;
    esac
  done
  ((have_workdir)) || die "the main args (after '--') need --workdir=DIR (and --config=...)."
}
