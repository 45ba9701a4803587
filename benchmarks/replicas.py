"""Data-parallel replicas: the iteration time of R = 1 and R = 2 on the same global batch.

Runs one job on the engine with model.replicas = 1, then 2 (exact mode), and with `--approx`
also 2 with optimizer.replica_mode: average_steps, side by side in one session, and prints
per run the mean iteration time of the middle iterations, the final loss, the Ψ products of
the last stage and the all-reduces one iteration costs each stage (exact: the gradient, one
per inner step; average_steps: one, the step). R = 2 computes half the batch per process, so
with a core (or GPU) per process the compute time per iteration roughly halves and the
all-reduces are what it costs; the equal final losses of R = 1 and exact R = 2 are the
parity. On CPU the default job has 2 stages, so R = 2 is four processes: on a machine with
fewer than four free cores they share cores, and the time shows the cost of the all-reduces
and of the extra processes, not the speed-up a core per process would give.
`--device cuda` runs the same on GPUs (one per process, round-robin when there are fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = """\
name: replicas-benchmark
model: {mlp: {widths: [784, 256, 256, 10]}, balance: [2, 1]}
data: {dataset: synthetic, microbatches: 4,
       synthetic: {features: 784, classes: 10, train_size: 4096, test_size: 256}}
optimizer: {name: sm, inner_steps: 10}
run: {eval_every: 0, dtype: float32}
"""


def run(job: Path, overrides: list[str], out: Path) -> list[dict]:
    args = [sys.executable, "-m", "sm_dist", "train", str(job), "--no-live", "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env=env)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def all_reduces(mode: str, replicas: int, inner_steps: int) -> str:
    """The all-reduces one iteration costs a stage (fill mode off)."""
    if replicas == 1:
        return "0"
    return f"{1 + inner_steps} (g, {inner_steps} products)" if mode == "exact" else "1 (d)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="?", help="a job file (default: a 784-256-256-10 MLP on "
                        "4,096 synthetic samples, 2 stages, float32)")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--approx", action="store_true",
                        help="also R = 2 with optimizer.replica_mode: average_steps")
    args = parser.parse_args()
    runs = [("R=1", 1, "exact"), ("R=2 exact", 2, "exact")]
    if args.approx:
        runs.append(("R=2 average_steps", 2, "average_steps"))
    common = [f"run.iterations={args.iterations}", f"run.device={args.device}",
              f"optimizer.inner_steps={args.inner_steps}", "run.threads=1"]
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(args.job) if args.job else Path(tmp) / "job.yaml"
        if not args.job:
            job.write_text(JOB)
        results = {name: run(job, common + [f"model.replicas={r}",
                                            f"optimizer.replica_mode={mode}"],
                             Path(tmp) / name.replace(" ", "_").replace("=", ""))
                   for name, r, mode in runs}
    cores = os.cpu_count() or 1
    print(f"job {args.job or 'default (2 stages)'}, device {args.device}, {args.iterations} "
          f"iterations, N = {args.inner_steps}; {cores} cores here; iteration time: mean of "
          "iterations 2..n-1")
    print(f"{'run':<20}{'processes':>10}{'iteration s':>13}{'final loss':>12}"
          f"{'Ψ products':>12}  all-reduces per stage and iteration")
    for name, replicas, mode in runs:
        records = results[name]
        middle = records[1:-1] or records
        stages = len(records[-1]["hvp_products"])
        time = statistics.fmean(r["iteration_time"] for r in middle)
        print(f"{name:<20}{stages * replicas:>10}{time:>13.4f}"
              f"{records[-1]['train_loss']:>12.6f}{records[-1]['hvp_products'][-1]:>12}  "
              f"{all_reduces(mode, replicas, args.inner_steps)}")
    if args.device == "cpu" and cores < 4:
        print("note: fewer cores than R = 2's processes: they share cores, so this shows the "
              "all-reduces' and extra processes' cost, not the speed-up of a core per process")


if __name__ == "__main__":
    main()
