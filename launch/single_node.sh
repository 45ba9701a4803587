#!/usr/bin/env bash
# Train a job on this machine under torchrun, one process per pipeline stage and replica.
#
# Usage: launch/single_node.sh JOB.yaml [sm-dist train args...]
#        launch/single_node.sh --help
#
# Checks the job (`sm-dist validate`, with the --set overrides among the arguments), reads its
# world size N = stages x replicas = len(model.balance) x model.replicas (after those
# overrides), prints the command on one line prefixed "launch:" (on stderr), then runs
#   torchrun --standalone --nnodes 1 --nproc-per-node N -m sm_dist train JOB.yaml ARGS...
# (torchrun as python -m sm_dist.launch.torchrun, which exits with the job's code).
# Every argument after JOB.yaml goes to `sm-dist train` unchanged (--set, --out, --no-live).
#
# Environment:
#   NPROC_PER_NODE  processes to start: N (any other count is refused, exit 2)
#   PYTHON          interpreter with torch and sm-dist (default: <repo>/.venv/bin/python)
#   TORCHRUN        a torchrun to use (default: $PYTHON -m sm_dist.launch.torchrun, torchrun
#                   passing the job's exit code through)
#
# Example:
#   launch/single_node.sh configs/fashion/mlp4-sm.yaml --set run.iterations=5 --no-live
# Exit codes: those of sm-dist train (0 done, 2 bad input, 1 failure); 2 when the job or the
# environment is unusable before anything starts.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

smd_handle_usage "${BASH_SOURCE[0]}" "$@"
job=$1
shift

smd_check_python
shape=$(smd_job_shape "$job" "$@")
read -r stages replicas <<<"$shape"
world=$((stages * replicas))
nproc=${NPROC_PER_NODE:-$world}
smd_require_count NPROC_PER_NODE "$nproc"
if [[ $nproc -ne $world ]]; then
  if ((replicas == 1)); then
    smd_die "NPROC_PER_NODE=$nproc does not match the job's $stages stages (len(model.balance)); start exactly one process per stage (leave NPROC_PER_NODE unset)"
  fi
  smd_die "NPROC_PER_NODE=$nproc does not match the job's $stages stages x $replicas replicas = $world processes (len(model.balance) x model.replicas); leave NPROC_PER_NODE unset"
fi

smd_torchrun --standalone --nnodes 1 --nproc-per-node "$nproc" \
  -m sm_dist train "$job" "$@"
