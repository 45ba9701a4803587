# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): finding Python and torchrun, reading the
# number of stages and replicas from a job file, checking numbers, printing and running a
# command.
#
# Environment read here:
#   PYTHON    the interpreter with torch and sm-dist (default: <repo>/.venv/bin/python)
#   TORCHRUN  a torchrun executable to use instead of "$PYTHON -m sm_dist.launch.torchrun"
#             (torchrun's own agent and arguments, with the job's exit code and its one-line
#             errors instead of torchrun's 1 and traceback)

SMD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$SMD_ROOT/.venv/bin/python}
# The sm_dist package next to these scripts, whichever Python runs it.
export PYTHONPATH="$SMD_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Ctrl-C while the job is checked, before torchrun takes over: one line.
trap 'printf "launch: stopped by SIGINT before training started\n" >&2; exit 130' INT

smd_die() {  # smd_die MESSAGE [EXIT_CODE]: print "launch: error: MESSAGE" and exit (default 2)
  printf 'launch: error: %s\n' "$1" >&2
  exit "${2:-2}"
}

smd_usage() {  # smd_usage SCRIPT: print the script's leading comment block, without the '# '
  local line
  while IFS= read -r line; do
    case $line in
      '#!'*) continue ;;
      '#') printf '\n' ;;
      '# '*) printf '%s\n' "${line#\# }" ;;
      *) break ;;
    esac
  done <"$1"
}

smd_want_help() {  # smd_want_help ARGS...: true when the first argument asks for help
  [[ ${1:-} == "-h" || ${1:-} == "--help" ]]
}

smd_handle_usage() {  # smd_handle_usage SCRIPT ARGS...: --help exits 0; no JOB.yaml exits 2
  local script=$1
  shift
  if smd_want_help "$@"; then
    smd_usage "$script"
    exit 0
  fi
  if [[ $# -lt 1 ]]; then
    smd_usage "$script" >&2
    smd_die "missing JOB.yaml"
  fi
}

smd_check_python() {
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    smd_die "no Python at '$PYTHON'; run ./launch/setup.sh, or set PYTHON to an interpreter with torch"
  fi
}

smd_torchrun() {  # smd_torchrun ARGS...: print and exec torchrun ARGS (see TORCHRUN above)
  if [[ -n ${TORCHRUN:-} ]]; then
    smd_run "$TORCHRUN" "$@"
  else  # torchrun itself, passing the job's exit code through (2: bad input), no traceback
    smd_run "$PYTHON" -m sm_dist.launch.torchrun "$@"
  fi
}

smd_overrides() {  # smd_overrides [TRAIN_ARGS...]: the values of every --set, NUL-terminated
  # Parsed with argparse, as sm-dist parses them: --set V, --set=V and unique prefixes.
  "$PYTHON" - "$@" <<'PY'
import signal; signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: no traceback
import argparse
import sys

parser = argparse.ArgumentParser(prog="sm-dist train", add_help=False)
parser.add_argument("--set", dest="overrides", action="append", default=[])
parser.add_argument("--out")
parser.add_argument("--single-process", action="store_true")
parser.add_argument("--no-live", action="store_true")
known, _ = parser.parse_known_args(sys.argv[1:])
sys.stdout.write("".join(f"{override}\0" for override in known.overrides))
PY
}

smd_job_shape() {  # smd_job_shape JOB [TRAIN_ARGS...]: check the job, print "STAGES REPLICAS"
  local job=$1 overrides=() set_args=() override
  shift
  mapfile -d '' -t overrides < <(smd_overrides "$@")
  wait "$!" || smd_die "cannot read the sm-dist train arguments: $*"
  # The same validation as `sm-dist validate`, with the same --set overrides applied.
  for override in "${overrides[@]}"; do
    set_args+=(--set "$override")
  done
  "$PYTHON" -m sm_dist validate "$job" "${set_args[@]}" >/dev/null \
    || smd_die "the job does not validate (see above); nothing was started"
  "$PYTHON" - "$job" "${overrides[@]}" <<'PY'
import signal; signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: no traceback
import sys

from sm_dist.config.job import load_job

job = load_job(sys.argv[1], sys.argv[2:])
print(len(job.model.balance), job.model.replicas)
PY
}

smd_require_uint() {  # smd_require_uint NAME VALUE: VALUE must be a non-negative integer
  [[ $2 =~ ^[0-9]+$ ]] || smd_die "$1 must be a non-negative integer, got '$2'"
}

smd_require_count() {  # smd_require_count NAME VALUE: VALUE must be a positive integer
  [[ $2 =~ ^[1-9][0-9]*$ ]] || smd_die "$1 must be a positive integer, got '$2'"
}

smd_run() {  # smd_run COMMAND...: print it on one line, prefixed "launch:", and exec it
  local quoted
  printf -v quoted ' %q' "$@"
  printf 'launch:%s\n' "$quoted" >&2
  exec "$@"
}
