"""Each stage's peak memory under SM against GPipe+Adam with the same microbatches, as ratios.

For the 4-stage MLP, CNN and transformer jobs of configs/, one engine run each (one process
per stage) of: Adam, SM keeping every microbatch's Ψ graph through the update (the default),
SM with `optimizer.recompute: true` (one graph alive at a time, no warm-start vectors kept),
recompute with `power_warm_start: true`, sm_kron (its defaults), sm_kron keeping the graphs
of its stages without a Kronecker bound, and sm_kron with `gram_block: 0`. Runs
go one after another, never side by side. It prints two figures per stage
(pipeline/memory.py): the peak since training started, and what training added on top of what
the process held at its start. On CPU both are resident memory, so the peak includes torch
itself (hundreds of MiB) and the added part includes first-use allocations any optimizer
makes; on CUDA (`--device cuda`) they are allocated tensor bytes. Rank 0 also holds the
coordinator (the data, the records). On CPU it then measures the same runs' live tensor bytes
per stage in one profiled process (benchmarks/tensor_memory.py): the CPU counterpart of
CUDA's allocated memory.

    python benchmarks/memory_per_stage.py [--iterations 3] [--workloads mlp,cnn,transformer]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = {  # workload: (SM job, its Adam twin's overrides or job)
    "mlp": ("configs/fashion/mlp4-sm.yaml", None),
    "cnn": ("configs/fashion/cnn-sm.yaml", "configs/fashion/cnn-adam.yaml"),
    "transformer": ("configs/text/transformer-sm.yaml", "configs/text/transformer-adam.yaml"),
}
ADAM_LR = "0.01"  # the MLP job has no Adam twin: the same job with Adam at this rate


def _run(command: list[str], job: str, sets: list[str], iterations: int, what: str) -> str:
    """`command JOB` for `iterations`, no evaluation or checkpoints, `sets` on top: its stdout
    (exits naming the run where it fails)."""
    args = [*command, job]
    for value in [f"run.iterations={iterations}", "run.eval_every=0", "run.checkpoint_every=0",
                  *sets]:
        args += ["--set", value]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"memory_per_stage: {what}{job} {' '.join(sets)} failed:\n{done.stderr}")
    return done.stdout


def train(job: str, sets: list[str], iterations: int, device: str, out: Path) -> dict:
    """One engine run; its summary.json."""
    _run([sys.executable, "-m", "sm_dist", "train", "--no-live", "--out", str(out)], job,
         [f"run.device={device}", *sets], iterations, "")
    return json.loads((out / "summary.json").read_text())


def tensor_peaks(job: str, sets: list[str], iterations: int) -> list[float]:
    """Live tensor MiB per stage (benchmarks/tensor_memory.py, in its own process)."""
    stdout = _run([sys.executable, str(REPO / "benchmarks" / "tensor_memory.py")], job, sets,
                  iterations, "tensor memory of ")
    return json.loads(stdout.strip().splitlines()[-1])["tensor_peak_mb"]


def ratios(sm: list[float], adam: list[float]) -> str:
    return " ".join(f"{a / b:6.3f}" if b else "     -" for a, b in zip(sm, adam))


def figures(values: list[float]) -> str:
    return " ".join(f"{v:6.1f}" for v in values)


def row(label: str, text: str) -> str:
    return f"  {label:<52}{text}"


# SM's configurations next to Adam: graphs kept (the default), recompute (which by default
# keeps no power-iteration warm-start vectors), recompute keeping them (one input-sized
# tensor per microbatch), and sm_kron.
SM_RUNS = {"sm, graphs kept": ["optimizer.recompute=false"],
           "sm, recompute": ["optimizer.recompute=true"],
           "sm, recompute + warm starts": ["optimizer.recompute=true",
                                           "optimizer.power_warm_start=true"],
           # Each layer's rows and weights of A and U kept from the backward to the update;
           # a stage without a Kronecker bound rebuilds its graphs (sm_kron's recompute).
           "sm_kron": ["optimizer.name=sm_kron"],
           # Such a stage keeping its graphs instead (sm_kron's default before an earlier round).
           "sm_kron, graphs kept": ["optimizer.name=sm_kron", "optimizer.recompute=false"],
           # Stage 0's Z̃ᵀZ̃ formed a microbatch's whole product at a time (the default before
           # this round; by default a Linear input layer sums it 128 samples at a time).
           "sm_kron, gram_block 0": ["optimizer.name=sm_kron", "optimizer.gram_block=0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    print(f"peak memory per stage process, MiB, {args.iterations} iterations each, device "
          f"{args.device}; runs one at a time")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads.split(","):
            sm_job, adam_job = WORKLOADS[name]
            runs = {"adam": (adam_job, []) if adam_job else
                    (sm_job, ["optimizer.name=adam", f"optimizer.lr={ADAM_LR}"])}
            runs |= {label: (sm_job, sets) for label, sets in SM_RUNS.items()}
            summaries = {label: train(job, sets, args.iterations, args.device,
                                      Path(tmp) / f"{name}-{i}")
                         for i, (label, (job, sets)) in enumerate(runs.items())}
            adam, kept = summaries["adam"], summaries["sm, graphs kept"]
            print(f"\n{name} ({sm_job}; SM is {kept['optimizer']}, "
                  f"{kept['microbatches']} microbatches; memory: {kept['memory_kind']})")
            print(row("stage:", "".join(f"{s:>7}" for s in range(len(kept["peak_memory_mb"])))))
            for label, summary in summaries.items():
                print(row(f"{label}: peak", figures(summary["peak_memory_mb"])))
                print(row(f"{label}: added by training",
                          figures(summary["training_memory_mb"])))
            for label in SM_RUNS:
                summary = summaries[label]
                print(row(f"ratio to adam, {label}: peak",
                          ratios(summary["peak_memory_mb"], adam["peak_memory_mb"])))
                print(row(f"ratio to adam, {label}: added",
                          ratios(summary["training_memory_mb"], adam["training_memory_mb"])))
            print("  wall time of {} iterations: {}".format(args.iterations, ", ".join(
                f"{label} {summary['wall_time']:.1f} s" for label, summary in summaries.items())))
            if args.device != "cpu":
                continue
            tensors = {label: tensor_peaks(job, sets, args.iterations)
                       for label, (job, sets) in runs.items()}
            for label, peaks in tensors.items():
                print(row(f"{label}: live tensors, peak", figures(peaks)))
            for label in SM_RUNS:
                print(row(f"ratio to adam, {label}: tensors",
                          ratios(tensors[label], tensors["adam"])))

if __name__ == "__main__":
    main()
