"""Simulated pipeline time to tuned Adam's and the best peer's final training loss, per job.

For every job of a compare output directory (the runs/ named `<job>-<optimizer>...`, or
`<optimizer>...` for a single job), each optimizer's best run by final training loss (a swept
learning rate's best), replayed on one device per stage at its fastest schedule (as
compare.md's time tables do: `sm-dist simulate`, the --link). It prints, per optimizer, the
final loss, the schedule, the simulated time of an iteration and of the run, and the simulated
time at which its training loss first reached (a) tuned Adam's final loss and (b) the final
loss of the best peer (Shampoo, SOAP, Muon, PSGD), '-' if never; then sm_kron's time to each
target over Adam's and over that peer's (the targets of issue 25: at most 0.5 and 1.0), and
sm_kron's largest rise of the training loss between accepted iterations (at most 1%); with
--plot, a figure of each best run's training loss against its simulated time, per job. Meant
for full-batch jobs, whose training loss is the whole batch's (heldout_time.py for minibatches).

    python benchmarks/time_to_loss.py runs/peers-fashion-cpu [--link pcie4] [--plot FIGURE.png]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PEERS = ("shampoo", "soap", "muon", "psgd")


def job_of(run: Any) -> str:
    """The job part of a run's directory name (before `-<optimizer>`), '' for a single job."""
    marker = f"-{run.config['optimizer']['name']}-"
    return run.name.split(marker)[0] if marker in run.name else ""


def final_loss(run: Any) -> float:
    loss = run.records[-1].train_loss
    return loss if math.isfinite(loss) and run.stopped is None else math.inf


def first_time(run: Any, times: dict[int, float], target: float) -> float | None:
    """Simulated time at the end of the first iteration whose training loss is <= target."""
    return next((times[r.iteration] for r in run.records if r.train_loss <= target), None)


def largest_rise(run: Any) -> float:
    """The largest relative rise of the training loss from one iteration to the next, over
    iterations whose step was accepted (a rejected step is undone before the next one)."""
    rises = [0.0]
    for before, after in zip(run.records, run.records[1:]):
        rejected = (after.optimizer or {}).get("step_rejected", False)
        if not rejected and before.train_loss > 0:
            rises.append(after.train_loss / before.train_loss - 1.0)
    return max(rises)


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def report(job: str, runs: list[Any], link: str,
           series: dict[str, tuple[list[float], list[float]]]) -> float | None:
    """Print the job's table; fill `series` with each best run's loss against simulated time.
    Returns Adam's final loss (the job's first target), None without an Adam run."""
    from benchmarks.compare_runs import best_per_optimizer
    from sm_dist.report.compare_time import fastest_schedule

    best = best_per_optimizer(runs, final_loss)
    if "adam" not in best:
        print(f"\n{job or 'the job'}: no adam run, skipped")
        return None
    adam_target = final_loss(best["adam"])
    peer = min((p for p in PEERS if p in best), key=lambda p: final_loss(best[p]), default=None)
    peer_target = final_loss(best[peer]) if peer else math.inf
    print(f"\n{job or 'the job'}: targets: adam's final loss {adam_target:.4g}; best peer "
          f"{peer} {peer_target:.4g}; link {link}, each run on its fastest schedule")
    print(f"{'run':<28} {'final loss':>10} {'schedule':<9} {'iter (ms)':>9} {'run (s)':>8} "
          f"{'to adam (s)':>11} {'to peer (s)':>11}")
    reached: dict[str, tuple[float | None, float | None]] = {}
    for name, run in sorted(best.items(), key=lambda item: final_loss(item[1])):
        schedule, times = fastest_schedule(run, link)
        total = max(times.values())
        per_iteration = 1e3 * total / len(times)
        reached[name] = (first_time(run, times, adam_target), first_time(run, times, peer_target))
        print(f"{run.name:<28} {final_loss(run):>10.4g} {schedule:<9} {per_iteration:>9.1f} "
              f"{total:>8.2f} {fmt(reached[name][0]):>11} {fmt(reached[name][1]):>11}")
        series[f"{run.name} ({schedule})"] = ([times[r.iteration] for r in run.records],
                                             [r.train_loss for r in run.records])
    if "sm_kron" in best:
        kron, adam = reached["sm_kron"], reached["adam"]
        to_adam = f"{kron[0] / adam[0]:.2f}" if kron[0] and adam[0] else "never reached"
        print(f"sm_kron / adam, time to adam's final loss: {to_adam} (target <= 0.5)")
        if peer:
            own = reached[peer][1]
            to_peer = f"{kron[1] / own:.2f}" if kron[1] and own else "never reached"
            print(f"sm_kron / {peer}, time to {peer}'s final loss: {to_peer} (target <= 1.0)")
        print(f"sm_kron's largest rise between accepted iterations: "
              f"{100 * largest_rise(best['sm_kron']):.2f}% (target <= 1%)")
    return adam_target


def main() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.compare_runs import load_runs, plot_against_time

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="a compare --out directory")
    parser.add_argument("--link", default="pcie4")
    parser.add_argument("--plot", help="also draw training loss against simulated time (PNG)")
    args = parser.parse_args()
    print(f"python benchmarks/time_to_loss.py {args.out} --link {args.link}")
    jobs: dict[str, list[Any]] = defaultdict(list)
    for run in load_runs(args.out):
        jobs[job_of(run)].append(run)
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    targets: dict[str, float] = {}
    for job, runs in sorted(jobs.items()):
        title = job or Path(args.out).name
        panels[title] = {}
        target = report(job, runs, args.link, panels[title])
        if target is not None:
            targets[title] = target
    if args.plot:
        plot_against_time(panels, args.plot, "training loss", targets)
        print(f"\nfigure: {args.plot}")


if __name__ == "__main__":
    main()
