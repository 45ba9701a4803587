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
