"""The pipeline simulator against the real engine on 2 stages, one thread each (the one
configuration a 2-core machine runs truly in parallel), for GPipe+SGD, SM with a fixed N and SM
filling its bubbles; and fill mode's cost in time, measured and simulated.

Each configuration is trained twice: by the engine (two processes; its iteration times are the
measurement) and by --single-process, whose actions, run one at a time, give the costs the
simulator replays (`sm-dist simulate`). Prints the iteration times side by side and their
ratio; the target is within ±15%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def job(name: str, optimizer: dict, args: argparse.Namespace) -> dict:
    widths = [args.width] * 3 + [10]
    return {"name": name,
            "model": {"mlp": {"widths": widths, "activation": "relu"}, "balance": [1, 2]},
            "data": {"dataset": "synthetic", "microbatches": args.microbatches,
                     "synthetic": {"features": args.width, "classes": 10,
                                   "train_size": args.batch, "test_size": 64}},
            "optimizer": optimizer,
            "run": {"iterations": args.iterations, "eval_every": 0, "dtype": "float32",
                    "threads": 1}}


def train(path: Path, out: Path, single: bool) -> None:
    command = [sys.executable, "-m", "sm_dist", "train", str(path), "--no-live", "--out",
               str(out)] + (["--single-process"] if single else [])
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True,
                   env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                        "PATH": "/usr/bin:/bin"})


def measured(out: Path) -> float:
    """Median iteration time of the steady iterations (the window the utilisation uses)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return statistics.median(r["iteration_time"] for r in records[1:-1])


def simulated(out: Path, link: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "sm_dist", "simulate", str(out), "--json",
                             "--link", link], check=True, cwd=REPO, capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--link", default="none",
                        help="the simulated link (loopback TCP between two processes is fast "
                             "next to these stages; none leaves transfers out)")
    args = parser.parse_args()
    configurations = {
        "GPipe+SGD": {"name": "sgd", "lr": 0.05},
        "SM, N=10": {"name": "sm", "inner_steps": 10},
        "SM, fill 10..400": {"name": "sm", "inner_steps": {"min": 10, "max": 400}},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, optimizer in configurations.items():
            path = Path(tmp) / f"{len(rows)}.yaml"
            path.write_text(yaml.safe_dump(job(f"bench{len(rows)}", optimizer, args)))
            engine, single = Path(tmp) / f"engine{len(rows)}", Path(tmp) / f"single{len(rows)}"
            train(path, engine, single=False)
            train(path, single, single=True)
            sim = simulated(single, args.link)
            records = [json.loads(line) for line in (engine / "metrics.jsonl").open()]
            steps = [statistics.mean(r["inner_steps"][s] for r in records[:-1])
                     for s in range(2)] if "inner_steps" in records[0] else None
            rows.append((label, measured(engine), sim["iteration_time"],
                         sim["bubble_fraction"], steps))
    print(f"simulator vs engine: 2 stages (MLP {args.width}x3+10, balance [1, 2]), 1 thread "
          f"each, batch {args.batch} in {args.microbatches} microbatches, float32, "
          f"{args.iterations} iterations; simulated link {args.link}; costs from the same job "
          "trained with --single-process")
    print(f"  {'configuration':<18}{'engine (ms)':>13}{'simulated (ms)':>16}{'ratio':>8}"
          f"{'sim. bubble':>13}  inner steps per stage (engine)")
    for label, real, sim_time, bubble, steps in rows:
        shown = "-" if steps is None else ", ".join(f"{s:.1f}" for s in steps)
        print(f"  {label:<18}{real * 1e3:>13.1f}{sim_time * 1e3:>16.1f}"
              f"{sim_time / real:>8.2f}{bubble:>13.1%}  {shown}")
    fixed, fill = rows[1][1], rows[2][1]
    print(f"fill mode's iteration time / fixed N's: measured {fill / fixed:.2f}, "
          f"simulated {rows[2][2] / rows[1][2]:.2f}")


if __name__ == "__main__":
    main()
