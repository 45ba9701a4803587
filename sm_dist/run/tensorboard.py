"""TensorBoard event files of a run's records (run.tensorboard): every metrics.jsonl field, its
optimizer's section's beside the record's own, per stage where it is per stage. metrics.jsonl
stays the record; these are a view of it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from sm_dist.run.metrics import IterationRecord

TENSORBOARD_DIR = "tensorboard"  # in the run directory
# Fields that are the record's x axis, not a curve.
_AXES = ("iteration",)


class TensorBoardMissing(Exception):
    """run.tensorboard is on but the tensorboard package is not installed."""


def check_available() -> None:
    """That torch.utils.tensorboard can write (it needs the `tensorboard` package)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as exc:
        raise TensorBoardMissing(
            "run.tensorboard is true but the tensorboard package is not installed "
            f"({exc}); install it with: pip install 'sm-dist[tensorboard]' (or set "
            "run.tensorboard: false)") from exc


def _fields(record: IterationRecord) -> dict[str, Any]:
    """The record's fields and its optimizer section's, by name."""
    own = {spec.name: getattr(record, spec.name) for spec in dataclasses.fields(record)
           if spec.name not in _AXES and spec.name != "optimizer"}
    return {**own, **record.optimizer}


def scalars(record: IterationRecord) -> dict[str, float]:
    """The record's numbers by TensorBoard tag: `field`, or `field/stage_<s>` per stage
    (booleans as 0/1; values a run did not measure, or not finite, left out)."""
    tags: dict[str, float] = {}
    for name, value in _fields(record).items():
        if value is None:
            continue
        if isinstance(value, list):
            for s, item in enumerate(value):
                if _number(item) is not None:
                    tags[f"{name}/stage_{s}"] = _number(item)  # type: ignore[assignment]
        elif _number(value) is not None:
            tags[name] = _number(value)  # type: ignore[assignment]
    return tags


def texts(record: IterationRecord) -> dict[str, str]:
    """The record's words by tag (why each stage's inner loop stopped), per stage."""
    found: dict[str, str] = {}
    for name, value in _fields(record).items():
        if isinstance(value, list):
            for s, item in enumerate(value):
                if isinstance(item, str):
                    found[f"{name}/stage_{s}"] = item
        elif isinstance(value, str):
            found[name] = value
    return found


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


class TensorBoardSink:
    """Writes each record as it is written to metrics.jsonl, at step = its iteration."""

    def __init__(self, run_dir: Path, resume_after: int | None = None) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run redoes the iterations after its checkpoint: purge_step makes
        # TensorBoard drop what the earlier attempt wrote from there on.
        purge = resume_after + 1 if resume_after is not None else None
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge)

    def write(self, record: IterationRecord) -> None:
        step = record.iteration
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        for tag, text in texts(record).items():
            self.writer.add_text(tag, text, step)
        self.writer.flush()  # as metrics.jsonl: what finished is on disk

    def close(self) -> None:
        self.writer.close()
