"""The pipeline simulator against the real engine on 2 stages, one thread each (the one
configuration a 2-core machine runs truly in parallel), for GPipe+SGD, SM with a fixed N and SM
filling its bubbles; and fill mode's cost in time, measured and simulated.

Each configuration is trained twice: by the engine (two processes; its iteration times are the
measurement) and by --single-process, whose actions, run one at a time, give the costs the
simulator replays (`sm-dist simulate`). Prints the iteration times side by side and their
ratio; the target is within ±15%. Then fill mode against fixed N on a job where the second
stage idles around its update (balance [2, 1]): alternating pairs of engine runs, the inner
steps each stage took and the ratio of iteration times (target: fill steps at no cost, 1.0).
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


def job(name: str, optimizer: dict, args: argparse.Namespace,
        balance: tuple[int, int] = (1, 2)) -> dict:
    widths = [args.width] * 3 + [10]
    return {"name": name,
            "model": {"mlp": {"widths": widths, "activation": "relu"},
                      "balance": list(balance)},
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


def run_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def measured(out: Path) -> float:
    """Median iteration time of the steady iterations (the window the utilisation uses)."""
    return statistics.median(r["iteration_time"] for r in run_records(out)[1:-1])


def inner_steps(out: Path) -> list[float] | None:
    """Each stage's mean inner steps per iteration (the last, which fills nothing, left out)."""
    records = run_records(out)
    if "inner_steps" not in records[0].get("optimizer", {}):
        return None
    return [statistics.mean(r["optimizer"]["inner_steps"][s] for r in records[:-1])
            for s in range(2)]


def job_file(directory: Path, name: str, optimizer: dict, args: argparse.Namespace,
             balance: tuple[int, int] = (1, 2)) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job(name, optimizer, args, balance)))
    return path


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
    parser.add_argument("--fill-pairs", type=int, default=3,
                        help="alternating fixed/fill engine pairs where a stage idles (0: none)")
    parser.add_argument("--fill-only", action="store_true",
                        help="only the fill pairs, not the simulator's three configurations")
    args = parser.parse_args()
    if not args.fill_only:
        simulator_against_engine(args)
    if args.fill_pairs:
        fill_against_fixed(CONFIGURATIONS["SM, N=10"], CONFIGURATIONS["SM, fill 10..400"], args)


CONFIGURATIONS = {
    "GPipe+SGD": {"name": "sgd", "lr": 0.05},
    "SM, N=10": {"name": "sm", "inner_steps": 10},
    "SM, fill 10..400": {"name": "sm", "inner_steps": {"min": 10, "max": 400}},
}


def simulator_against_engine(args: argparse.Namespace) -> None:
    """The three configurations on balance [1, 2], each by the engine and simulated."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, optimizer in CONFIGURATIONS.items():
            path = job_file(Path(tmp), f"bench{len(rows)}", optimizer, args)
            engine, single = Path(tmp) / f"engine{len(rows)}", Path(tmp) / f"single{len(rows)}"
            train(path, engine, single=False)
            train(path, single, single=True)
            sim = simulated(single, args.link)
            rows.append((label, measured(engine), sim["iteration_time"],
                         sim["bubble_fraction"], inner_steps(engine)))
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


def fill_against_fixed(fixed: dict, fill: dict, args: argparse.Namespace) -> None:
    """Fill mode where a stage does idle: balance [2, 1] leaves the second stage waiting for
    its next input after its shorter update. Engine runs of fixed N and fill mode alternate
    (the order swapped every pair), so that a slow spell of the machine falls on both."""
    ratios = []
    print(f"fill mode against fixed N where the second stage idles (balance [2, 1]), "
          f"{args.fill_pairs} alternating pairs of engine runs:")
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.fill_pairs):
            order = [("fixed", fixed), ("fill", fill)]
            times, steps = {}, {}
            for label, optimizer in order if pair % 2 == 0 else order[::-1]:
                path = job_file(Path(tmp), f"fill{pair}{label}", optimizer, args, (2, 1))
                out = Path(tmp) / f"{label}{pair}"
                train(path, out, single=False)
                times[label] = measured(out)
                taken = inner_steps(out)
                assert taken is not None, "an SM run records its inner steps"
                steps[label] = taken
            ratios.append(times["fill"] / times["fixed"])
            print(f"  pair {pair}: fixed {times['fixed'] * 1e3:.1f} ms (steps "
                  f"{', '.join(f'{x:.1f}' for x in steps['fixed'])}), fill "
                  f"{times['fill'] * 1e3:.1f} ms (steps "
                  f"{', '.join(f'{x:.1f}' for x in steps['fill'])}), ratio {ratios[-1]:.3f}")
        simulated_time = {}
        for label, optimizer in (("fixed", fixed), ("fill", fill)):
            path = job_file(Path(tmp), f"fill-{label}", optimizer, args, (2, 1))
            train(path, Path(tmp) / f"{label}-single", single=True)
            simulated_time[label] = simulated(Path(tmp) / f"{label}-single",
                                              args.link)["iteration_time"]
    print(f"fill mode's iteration time / fixed N's where a stage idles: measured median "
          f"{statistics.median(ratios):.3f} over {len(ratios)} pairs, simulated "
          f"{simulated_time['fill'] / simulated_time['fixed']:.3f} ("
          f"{simulated_time['fixed'] * 1e3:.1f} and {simulated_time['fill'] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
