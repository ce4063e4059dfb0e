# Helpers for the sh/ recipes: collect jobs, then hand them to `python -m utils.sweep jobs`, which
# skips finished ones (a killed recipe resumes), runs the rest in order, logs each to its own file
# and reports every failure at the end. Source it after setting PYTHON and ROOT.
#
#   job <name> <outputs,comma,separated> <requires,comma,separated or -> <command...>
JOBS_FILE=$(mktemp "${TMPDIR:-/tmp}/jobs.XXXXXX")
trap 'rm -f "$JOBS_FILE"' EXIT

_json_str() {  # a JSON string (paths and flags hold no control characters beyond tab/newline)
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\t'/\\t}; s=${s//$'\n'/\\n}
  printf '"%s"' "$s"
}
_json_list() {  # _json_list <items...>
  local first=1 item
  printf '['
  for item in "$@"; do [ $first = 1 ] || printf ', '; first=0; _json_str "$item"; done
  printf ']'
}

job() {
  local name=$1 outputs=$2 requires=$3 outs=() reqs=(); shift 3
  [ -n "$outputs" ] && [ "$outputs" != - ] && IFS=, read -r -a outs <<<"$outputs"
  [ -n "$requires" ] && [ "$requires" != - ] && IFS=, read -r -a reqs <<<"$requires"
  {
    printf '{"name": '; _json_str "$name"; printf ', "argv": '; _json_list "$@"
    printf ', "outputs": '; _json_list "${outs[@]}"; printf ', "log": '; _json_str "$ROOT/logs/$name.log"
    printf ', "requires": '; _json_list "${reqs[@]}"; printf '}\n'
  } >>"$JOBS_FILE"
}

# run_jobs: run the collected jobs; returns the sweep's exit status. SWEEP_ARGS adds sweep flags,
# e.g. SWEEP_ARGS=--dry_run (list the jobs, done or to do, and run nothing) or "--workers 2".
run_jobs() {
  # shellcheck disable=SC2086
  "$PYTHON" -m utils.sweep jobs --jobs_file "$JOBS_FILE" --record_root "$ROOT" ${SWEEP_ARGS:-}
}
