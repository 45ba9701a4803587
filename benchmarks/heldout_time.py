"""Held-out loss against simulated pipeline time, per optimizer, from the runs of `sm-dist compare`.

For every optimizer of a compare output directory (its runs/), each run replayed on one device
per stage at its fastest schedule (as compare.md's time tables do: `sm-dist simulate`, the
--link); of a swept optimizer, the learning rate whose best held-out loss is lowest (tuned for
this figure, not for training loss). It prints, per optimizer, its best held-out loss and
accuracy, the iteration and simulated time where it got there, and the simulated time at which
it first reached the best held-out loss of --target (tuned Adam by default), '-' if never;
with --plot, a figure of each run's held-out loss against its simulated time.

    python benchmarks/heldout_time.py runs/peers-cnn-minibatch [--link pcie4] [--target adam]
                                      [--plot FIGURE.png]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def evaluations(run: Any) -> list[tuple[int, float, float | None]]:
    """(iteration, held-out loss, accuracy) of every evaluation of a run."""
    return [(r.iteration, r.test_loss, r.test_acc) for r in run.records
            if r.test_loss is not None and math.isfinite(r.test_loss)]


def best_heldout(run: Any) -> float:
    return min((loss for _, loss, _ in evaluations(run)), default=math.inf)


def main() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.compare_runs import best_per_optimizer, load_runs, plot_against_time
    from sm_dist.report.compare_time import fastest_schedule

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="a compare --out directory")
    parser.add_argument("--link", default="pcie4")
    parser.add_argument("--target", default="adam", help="whose best held-out loss to reach")
    parser.add_argument("--plot", help="also draw held-out loss against simulated time (PNG)")
    args = parser.parse_args()
    print(f"python benchmarks/heldout_time.py {args.out} --link {args.link} "
          f"--target {args.target}")
    runs = [run for run in load_runs(args.out) if evaluations(run)]
    best = best_per_optimizer(runs, best_heldout)
    if args.target not in best:
        sys.exit(f"heldout_time: no {args.target} run with held-out losses in {args.out}")
    target = best_heldout(best[args.target])
    print(f"target: {args.target}'s best held-out loss, {target:.4g}; simulated link "
          f"{args.link}, each run on its fastest schedule")
    print(f"{'run':<28} {'schedule':<9} {'best held-out':>13} {'acc':>6} {'@iter':>6} "
          f"{'at (s)':>8} {'to target (s)':>14}")
    series: dict[str, tuple[list[float], list[float]]] = {}
    for run in sorted(best.values(), key=best_heldout):
        evals = evaluations(run)
        schedule, times = fastest_schedule(run, args.link)
        iteration, loss, acc = min(evals, key=lambda e: e[1])
        reached = next((t for t, value, _ in evals if value <= target), None)
        to_target = f"{times[reached]:.2f}" if reached is not None else "-"
        accuracy = f"{100 * acc:.1f}%" if acc is not None else "-"
        print(f"{run.name:<28} {schedule:<9} {loss:>13.4g} {accuracy:>6} {iteration:>6} "
              f"{times[iteration]:>8.2f} {to_target:>14}")
        series[f"{run.name} ({schedule})"] = ([times[i] for i, _, _ in evals],
                                             [value for _, value, _ in evals])
    if args.plot:
        title = Path(args.out).name
        plot_against_time({title: series}, args.plot, "held-out loss", {title: target})
        print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
