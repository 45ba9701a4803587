"""Held-out losses of one job's variants, each trained at several seeds, side by side.

Each run directory is named `<variant>-s<seed>` (`runs/kron-rules/secant-d0.2-s3`); the runs of
one variant are grouped. Per variant it prints each seed's best held-out loss and its iteration,
then the mean of the bests, the mean and the worst of the final held-out losses (a variant whose
loss swings between evaluations has a good best and a bad final), and, with --target, the first
evaluation at which each seed's run reached that seed's target loss ('-' if never).

    python benchmarks/heldout_seeds.py runs/kron-rules/* [--target 0=0.61,1=0.57,...]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")


def bad_input(message: str) -> NoReturn:
    """One line on stderr, exit 2 (bad input)."""
    print(f"heldout_seeds: {message}", file=sys.stderr)
    sys.exit(2)


def parse_targets(text: str) -> dict[int, float]:
    """'0=0.61,1=0.57' → {0: 0.61, 1: 0.57}."""
    targets = {}
    for item in text.split(","):
        seed, _, loss = item.partition("=")
        targets[int(seed)] = float(loss)
    return targets


def evaluations(run_dir: Path) -> list[tuple[int, float]]:
    """(iteration, held-out loss) of every finite evaluation of a run."""
    from benchmarks.heldout_time import evaluations as with_accuracy
    from sm_dist.report.run_data import ReportError, load_run
    try:
        run = load_run(run_dir)
    except ReportError as err:
        bad_input(str(err))
    return [(iteration, loss) for iteration, loss, _ in with_accuracy(run)]


def variant_line(variant: str, runs: dict[int, list[tuple[int, float]]],
                 targets: dict[int, float]) -> str:
    """One variant: per seed best@iteration, the means, and when each seed reached its target."""
    seeds = sorted(runs)
    bests = [min(runs[s], key=lambda e: e[1]) for s in seeds]
    finals = [runs[s][-1][1] for s in seeds]
    cells = " ".join(f"{loss:.3f}@{it}" for it, loss in bests)
    line = (f"{variant:24s} {cells}  mean best {statistics.mean(b for _, b in bests):.3f}"
            f"  final mean {statistics.mean(finals):.3f} worst {max(finals):.3f}")
    if targets:
        reached = [next((str(it) for it, loss in runs[s] if loss <= targets[s]), "-")
                   if s in targets else "?" for s in seeds]
        line += f"  reaches target at {','.join(reached)}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories <variant>-s<seed>")
    parser.add_argument("--target", type=parse_targets, default={},
                        help="per seed, the held-out loss to reach: SEED=LOSS,...")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    grouped: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for run_dir in args.runs:
        match = NAME.match(run_dir.name)
        if match is None:
            bad_input(f"{run_dir}: name it <variant>-s<seed>, e.g. secant-s0")
        found = evaluations(run_dir)
        if not found:
            bad_input(f"{run_dir}: no held-out evaluation; train with run.eval_every > 0")
        grouped.setdefault(match["variant"], {})[int(match["seed"])] = found
    print(f"{'variant':24s} best held-out @ iteration, per seed")
    for variant, runs in grouped.items():
        print(variant_line(variant, runs, args.target))


if __name__ == "__main__":
    main()
