#!/usr/bin/env bash
# Train a job across several machines under torchrun: run this same command on every node.
#
# Usage: launch/multi_node.sh JOB.yaml [sm-dist train args...]
#        launch/multi_node.sh --help
#
# Each node starts NPROC_PER_NODE stage processes; together the NNODES nodes must start exactly
# one process per stage and replica (NNODES * NPROC_PER_NODE = len(model.balance) x
# model.replicas; ranks are stage-major, rank = stage x replicas + replica, so with
# NPROC_PER_NODE a multiple of the replicas a stage's replicas share a node). The node whose processes
# get ranks 0.. holds stage 0 and the coordinator, and writes the run directory (--out is a path
# on that node). With the c10d rendezvous torchrun ignores --node-rank and numbers the nodes in
# the order of their host names (then process ids): node order on a cluster with ordered names
# (SLURM's node ids follow them); RDZV_BACKEND=static makes NODE_RANK 0 rank 0 in every case.
# The script checks the job (`sm-dist validate`, with the --set overrides among the arguments),
# prints the command on one line prefixed "launch:" (on stderr), then runs
#   torchrun --nnodes NNODES --node-rank NODE_RANK --nproc-per-node NPROC_PER_NODE \
#     --rdzv-backend RDZV_BACKEND --rdzv-endpoint MASTER_ADDR:MASTER_PORT --rdzv-id RDZV_ID \
#     -m sm_dist train JOB.yaml ARGS...
# Every argument after JOB.yaml goes to `sm-dist train` unchanged.
#
# Environment:
#   NNODES          number of nodes (required)
#   NODE_RANK       this node's index, 0 .. NNODES-1 (required)
#   MASTER_ADDR     address of node 0, reachable from every node (required)
#   MASTER_PORT     rendezvous port on MASTER_ADDR (default 29500)
#   NPROC_PER_NODE  stage processes on this node (default: stages x replicas / NNODES, which
#                   must divide)
#   RDZV_ID         rendezvous id, the same on every node of one job (default sm-dist)
#   RDZV_BACKEND    torchrun rendezvous: c10d (default) or static (honours NODE_RANK exactly)
#   BIND            the network interface the stages listen on (adds --set run.bind=BIND), e.g.
#                   eth0 or ib0; needed on several nodes unless the job sets run.bind. The job's
#                   network must be trusted: stages unpickle what their peers send.
#   PYTHON          interpreter with torch and sm-dist (default: <repo>/.venv/bin/python)
#   TORCHRUN        a torchrun to use (default: $PYTHON -m sm_dist.launch.torchrun, torchrun
#                   passing the job's exit code through)
#
# Example (2 nodes, a 4-stage job, 2 GPUs each):
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 BIND=eth0 launch/multi_node.sh JOB.yaml --set run.device=cuda
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 BIND=eth0 launch/multi_node.sh JOB.yaml --set run.device=cuda
# Exit codes: those of sm-dist train (0 done, 2 bad input, 1 failure); 2 when the job or the
# environment is unusable before anything starts.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

smd_handle_usage "${BASH_SOURCE[0]}" "$@"
job=$1
shift

for var in NNODES NODE_RANK MASTER_ADDR; do
  if [[ -z ${!var:-} ]]; then
    smd_die "$var is not set; set NNODES, NODE_RANK and MASTER_ADDR on every node (see --help)"
  fi
done
master_port=${MASTER_PORT:-29500}
rdzv_id=${RDZV_ID:-sm-dist}
rdzv_backend=${RDZV_BACKEND:-c10d}
if [[ $MASTER_ADDR == *:* && $MASTER_ADDR != \[* ]]; then
  master_addr_port="[$MASTER_ADDR]:$master_port"  # an IPv6 address
else
  master_addr_port="$MASTER_ADDR:$master_port"
fi
smd_require_count NNODES "$NNODES"
smd_require_uint NODE_RANK "$NODE_RANK"
smd_require_count MASTER_PORT "$master_port"
if ((NODE_RANK >= NNODES)); then
  smd_die "NODE_RANK=$NODE_RANK is out of range for NNODES=$NNODES (use 0 .. $((NNODES - 1)))"
fi

smd_check_python
shape=$(smd_job_shape "$job" "$@")
read -r stages replicas <<<"$shape"
world=$((stages * replicas))
if ((replicas == 1)); then
  what="$stages stages (len(model.balance)); start exactly one process per stage"
else
  what="$stages stages x $replicas replicas = $world processes (len(model.balance) x model.replicas)"
fi
if [[ -n ${NPROC_PER_NODE:-} ]]; then
  smd_require_count NPROC_PER_NODE "$NPROC_PER_NODE"
  nproc=$NPROC_PER_NODE
elif ((world % NNODES == 0)); then
  nproc=$((world / NNODES))
else
  smd_die "the job's $what cannot be shared evenly by NNODES=$NNODES nodes; use a node count that divides $world, or set NPROC_PER_NODE"
fi
if ((NNODES * nproc != world)); then
  smd_die "world size NNODES * NPROC_PER_NODE = $NNODES * $nproc = $((NNODES * nproc)) does not match the job's $what"
fi

bind=()
[[ -n ${BIND:-} ]] && bind=(--set "run.bind=$BIND")
smd_torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --nproc-per-node "$nproc" --rdzv-backend "$rdzv_backend" --rdzv-endpoint "$master_addr_port" \
  --rdzv-id "$rdzv_id" -m sm_dist train "$job" "$@" "${bind[@]}"
