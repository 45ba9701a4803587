"""The runs of an `sm-dist compare` output directory and each optimizer's best of them: what
time_to_loss.py and heldout_time.py both read."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def load_runs(out: str | Path) -> list[Any]:
    """Every run under OUT/runs with at least one iteration, in name order."""
    sys.path.insert(0, str(REPO))
    from sm_dist.report.run_data import load_run

    runs = [load_run(path) for path in sorted((Path(out) / "runs").iterdir())]
    return [run for run in runs if run.records]


def best_per_optimizer(runs: list[Any], score: Callable[[Any], float]) -> dict[str, Any]:
    """Of each optimizer's runs (its swept learning rates), the one of lowest `score`; the
    first in name order on a tie."""
    best: dict[str, Any] = {}
    for run in runs:
        name = run.config["optimizer"]["name"]
        if name not in best or score(run) < score(best[name]):
            best[name] = run
    return best


Series = dict[str, tuple[list[float], list[float]]]  # label: (simulated seconds, losses)
# One colour per optimizer, the same in every panel.
COLOURS = {"sm_kron": "C0", "sm_adaptive": "C1", "adam": "C2", "shampoo": "C3", "soap": "C4",
           "muon": "C5", "psgd": "C6"}


def _colour(label: str) -> str | None:
    return next((c for name, c in COLOURS.items() if name in label), None)


def plot_against_time(panels: dict[str, Series], path: str | Path, ylabel: str,
                      targets: dict[str, float]) -> None:
    """One panel per job: each run's loss (log scale) against simulated pipeline time, and
    the job's target loss as a dashed line; written to `path` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (title, series) in zip(figure.subplots(1, len(panels), squeeze=False)[0],
                                     panels.items()):
        for label, (seconds, losses) in series.items():
            axes.plot(seconds, losses, marker=".", label=label, color=_colour(label))
        if title in targets:
            axes.axhline(targets[title], color="grey", linestyle="--", linewidth=1)
        axes.set(title=title, xlabel="simulated pipeline time (s), each on its fastest "
                 "schedule", ylabel=ylabel, yscale="log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)
