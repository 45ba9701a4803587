"""What the shared-backward product (stages affine in θ) buys in training, not only per product.

Trains the same SM job with `--single-process` (one thread) in alternating pairs: the product
as training chooses it (`affine_in_parameters`: the shared form on one-layer ReLU stages) and
the general form forced on every stage. Prints each pair's ratio of median iteration times
(shared / general), each pair's order swapped so that a slow spell of the shared machine does
not fall on one form, and how far the two runs' training losses drift apart (other rounding,
the same math).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A child process that trains with the general form on every stage.
GENERAL = ("import sys, sm_dist.optim.base as base; "
           "base.affine_in_parameters = lambda module: False; "
           "from sm_dist.cli import main; sys.exit(main(sys.argv[1:]))")
SHARED = "import sys; from sm_dist.cli import main; sys.exit(main(sys.argv[1:]))"


def train(job: str, out: Path, general: bool, sets: list[str]) -> list[dict]:
    command = [sys.executable, "-c", GENERAL if general else SHARED, "train", job,
               "--single-process", "--no-live", "--out", str(out),
               "--set", "run.threads=1", *[a for s in sets for a in ("--set", s)]]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True,
                   env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                        "PATH": "/usr/bin:/bin"})
    return [json.loads(line) for line in (out / "metrics.jsonl").open() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", default="configs/fashion/mlp4-sm.yaml")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a job-file override, as for sm-dist train (repeatable)")
    args = parser.parse_args()
    sets = [f"run.iterations={args.iterations}", "run.eval_every=0", *args.set]
    print(f"{args.job} {' '.join('--set ' + s for s in args.set)}".rstrip() + ", "
          f"{args.iterations} iterations, --single-process, 1 thread; "
          f"{args.pairs} alternating pairs (median iteration time of iterations 2 to the "
          f"last but one)")
    ratios, drift = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            times, losses = {}, {}
            for general in ((False, True) if pair % 2 == 0 else (True, False)):
                records = train(args.job, Path(tmp) / f"{pair}-{general}", general, sets)
                times[general] = statistics.median(r["iteration_time"] for r in records[1:-1])
                losses[general] = [r["train_loss"] for r in records]
            ratios.append(times[False] / times[True])
            drift = max(drift, max(abs(a - b) / abs(b)
                                   for a, b in zip(losses[False], losses[True], strict=True)))
            print(f"  pair {pair}: shared {times[False] * 1e3:8.1f} ms, general "
                  f"{times[True] * 1e3:8.1f} ms per iteration, ratio {ratios[-1]:.3f}")
    print(f"iteration time, shared form / general form: median {statistics.median(ratios):.3f} "
          f"over {args.pairs} pairs; largest relative difference of a training loss between "
          f"the two forms: {drift:.1e}")


if __name__ == "__main__":
    main()
