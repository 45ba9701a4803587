#!/usr/bin/env bash
# Everything sm-dist checks on a GPU, as one script (well under 10 minutes on one H200):
#   1. the CUDA tests (tests/test_cuda.py: one GPU per process, and four stages on one GPU
#      through RPC device maps);
#   2. benchmarks/hvp_cost.py on the GPU (one local-loss product against a forward+backward);
#   3. the engine against torch.distributed.pipelining's ScheduleGPipe on the GPU;
#   4. one measured SM run on the GPU, four stages, and the simulator calibrated on it
#      (simulate from its own trace against its measured iteration time);
#   5. each stage's peak CUDA memory under SM (graphs kept, recompute, recompute with warm
#      starts kept) against Adam.
# Figures go to stdout and to $OUT/gpu-figures.txt (OUT defaults to runs/gpu-check).
# Usage: ./benchmarks/gpu_check.sh   (after ./launch/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-figures.txt") 2>&1
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
echo "== 1. CUDA tests"
$PY -m pytest -q tests/test_cuda.py
echo "== 2. hvp_cost on the GPU"
$PY benchmarks/hvp_cost.py --device cuda --width 4096 --batch 1024 --rounds 20
$PY benchmarks/hvp_cost.py --device cuda --width 1024 --batch 256 --rounds 20
echo "== 3. engine vs torch.distributed.pipelining (4 stages sharing the GPU)"
$PY benchmarks/engine_vs_torch_pipelining.py --device cuda --widths 4096 4096 4096 4096 10 \
    --batch 4096 --microbatches 4 --iterations 30 --warmup 5 --threads 4
echo "== 4. one SM run on the GPU, and the simulator calibrated on it"
rm -rf "$OUT/sm-gpu"
$PY -m sm_dist train configs/fashion/mlp4-sm.yaml --no-live --out "$OUT/sm-gpu" \
    --set run.device=cuda --set run.iterations=12 --set run.eval_every=0 \
    --set optimizer.name=sm_adaptive
$PY - "$OUT/sm-gpu" <<'PY'
import json, statistics, sys
records = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
steady = [r["iteration_time"] for r in records[1:-1]]
print(f"measured iteration time (median of iterations 2..{len(records) - 1}): "
      f"{statistics.median(steady) * 1e3:.2f} ms")
PY
$PY -m sm_dist simulate "$OUT/sm-gpu" --link none --iterations 2:11
echo "== 5. peak memory per stage on the GPU: SM against Adam"
$PY benchmarks/memory_per_stage.py --device cuda --iterations 3
echo "== done"
