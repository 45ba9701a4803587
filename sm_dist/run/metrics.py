"""The iteration record: one typed line of metrics.jsonl per finished iteration, its JSON form,
and the one reader of metrics.jsonl (report, compare, --resume and the monitor use it).

JSON form: one object per line, keys as the field names below; the optimizer's own section
(its `Metrics`, e.g. SM's inner steps per stage) is the object under `optimizer`. A field a
run does not measure is absent (None in memory); a number that is not finite (NaN, inf) is
written as null, and a line cut short by a crash (the last one, with no newline) is skipped
when read back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sm_dist.whole_files import RecordFile


class MetricsError(Exception):
    """A metrics.jsonl that cannot be read: a broken line that is not the last."""


@dataclass
class IterationRecord:
    """What one iteration measured. The training loss and accuracy come from its forward pass
    (before its update), the test figures from the evaluation after it."""

    iteration: int
    train_loss: float  # h at the iterate the iteration started from (Σ ℓ / n); read back as
    # None where it was not finite (null in the file)
    train_acc: float | None = None  # None only in files from elsewhere that lack it
    wall_time: float = 0.0  # seconds from the start of the run (resumed runs continue it)
    iteration_time: float = 0.0  # seconds: the iteration's window (engine) or loop time
    # Cumulative costs: pipeline passes of the batch, tangent passes, second-order products
    # per stage (see docs/comparing.md); every run writes them, None in files that lack them.
    forward_passes: int | None = None
    backward_passes: int | None = None
    tangent_passes: int | None = None
    hvp_products: list[int] | None = None
    test_loss: float | None = None
    test_acc: float | None = None
    # The whole training set after the update (run.eval_train_every), and the passes over it
    # so far (minibatch runs).
    full_train_loss: float | None = None
    full_train_acc: float | None = None
    epoch: float | None = None
    # A model-based optimizer's predicted change of h by this iteration's step, and (full
    # batch) the previous iteration's prediction against what this iteration's forward measured.
    predicted_decrease: float | None = None
    actual_decrease_prev: float | None = None
    decrease_ratio_prev: float | None = None
    # Utilisation over the iteration's window (engine runs only), see pipeline/timeline.py.
    busy_fraction: list[float] | None = None
    bubble_fraction: float | None = None
    turnaround_idle: list[float] | None = None
    update_idle: list[float | None] | None = None
    # Memory (pipeline/memory.py), MiB: the peak since training started and what training
    # added to the start's; per stage process in the engine, one figure for --single-process.
    peak_memory_mb: list[float] | None = None
    training_memory_mb: list[float] | None = None
    memory_kind: str | None = None  # "resident" (CPU processes) or "cuda_allocated"
    # The optimizer's own section: its Metrics fields by name (sm_dist/optim/metrics.py).
    optimizer: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> Any:
        """A field of the optimizer's section (None where it has none)."""
        return self.optimizer.get(name)

    def value(self, name: str) -> Any:
        """A field of the record's own, or else of its optimizer's section."""
        if name != "optimizer" and name in _OWN_FIELDS:
            return getattr(self, name)
        return self.optimizer.get(name)

    def to_json(self) -> dict[str, Any]:
        """The record's JSON object (absent fields left out, non-finite numbers null)."""
        data = {f.name: _finite_or_none(value) for f in dataclasses.fields(self)
                if f.name != "optimizer" and (value := getattr(self, f.name)) is not None}
        section = {k: _finite_or_none(v) for k, v in self.optimizer.items() if v is not None}
        return {**data, "optimizer": section} if section else data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IterationRecord:
        """A record from its JSON object; keys this version does not know go to the
        optimizer's section (records of earlier versions kept the section's keys at the top)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"optimizer"}
        section = dict(data.get("optimizer") or {})
        section.update({k: v for k, v in data.items() if k not in known and k != "optimizer"})
        return cls(**{k: v for k, v in data.items() if k in known}, optimizer=section)


_OWN_FIELDS = {f.name for f in dataclasses.fields(IterationRecord)}


@dataclass
class Costs:
    """Cumulative costs of a run: pipeline passes of the batch (forward, backward, CGBlock's
    tangent passes) and each stage's second-order products."""

    forward_passes: int = 0
    backward_passes: int = 0
    tangent_passes: int = 0
    hvp_products: list[int] = field(default_factory=list)

    def add_passes(self, forward: int, backward: int, tangent: int = 0) -> None:
        self.forward_passes += forward
        self.backward_passes += backward
        self.tangent_passes += tangent

    def add_products(self, per_stage: list[int]) -> None:
        self.hvp_products = [a + b for a, b in zip(self.hvp_products, per_stage, strict=True)]


# What `SteadyMeans` averages of every run: the engine's utilisation.
STEADY_FIELDS = ("bubble_fraction", "busy_fraction", "turnaround_idle", "update_idle")


class SteadyMeans:
    """Means over the steady iterations of the records added in order: all but the first (it
    includes start-up) and the newest (the last has no next input, so its window ends at its
    own last action and a fill-mode update takes only `min` steps); all of them while there
    are fewer than three. Of STEADY_FIELDS and the optimizer section's `section_fields` (its
    Metrics' `means_of`, e.g. SM's inner steps per stage). The one definition that the
    summary, the report and the live monitor use, so that the monitor's last frame shows the
    summary's figures."""

    def __init__(self, section_fields: tuple[str, ...] = ()) -> None:
        self.keys = STEADY_FIELDS + section_fields
        self._edges: list[IterationRecord] = []  # the first and the newest record
        self._sums: dict[str, list[float]] = {}
        self._counts: dict[str, list[int]] = {}
        self.steady = 0  # records summed as steady

    def add(self, record: IterationRecord) -> None:
        if len(self._edges) == 2:  # the newest so far is steady now that one follows it
            _accumulate(self._edges.pop(), self.keys, self._sums, self._counts)
            self.steady += 1
        self._edges.append(record)

    def means(self) -> dict[str, Any]:
        """Per field: a float (bubble_fraction) or one float per stage, None where unmeasured."""
        sums, counts = self._sums, self._counts
        if not self.steady:  # fewer than three records: every one counts
            sums, counts = {}, {}
            for record in self._edges:
                _accumulate(record, self.keys, sums, counts)
        means: dict[str, Any] = {}
        for key in self.keys:
            if key not in sums:
                means[key] = None
                continue
            column = [s / c if c else None for s, c in zip(sums[key], counts[key])]
            means[key] = column[0] if key == "bubble_fraction" else column
        return means


def _accumulate(record: IterationRecord, keys: tuple[str, ...], sums: dict[str, list[float]],
                counts: dict[str, list[int]]) -> None:
    """Add the record's `keys` (its own fields or its section's) to per-stage sums and counts
    (nulls left out)."""
    for key in keys:
        value = getattr(record, key) if key in STEADY_FIELDS else record.metric(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        total, count = sums.setdefault(key, []), counts.setdefault(key, [])
        for stage, v in enumerate(values):
            if stage == len(total):
                total.append(0.0)
                count.append(0)
            if v is not None:
                total[stage] += v
                count[stage] += 1


def steady_means(records: list[IterationRecord],
                 section_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """`SteadyMeans` of a run's records."""
    means = SteadyMeans(section_fields)
    for record in records:
        means.add(record)
    return means.means()


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def record_line(record: IterationRecord) -> str:
    return json.dumps(record.to_json()) + "\n"


def read_metrics(path: Path) -> list[IterationRecord]:
    """The records of a metrics.jsonl (or of the run directory holding one). A last line cut
    short by a crash is skipped; any other broken line is a MetricsError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: cut short by a killed run
                continue
            raise MetricsError(f"{path} line {number} is not JSON ({err.msg})") from None
        try:
            records.append(IterationRecord.from_json(data))
        except TypeError as err:
            raise MetricsError(f"{path} line {number} is not an sm-dist record ({err})") from None
    return records


class MetricsWriter:
    """Appends one whole line per record, written through at once, so that a crash keeps every
    finished one; a failed write (a full disk) is cut back to the last whole line
    (whole_files.RecordFile), so the file never ends in part of a record."""

    def __init__(self, path: Path, mode: str = "a") -> None:
        self._file = RecordFile(path, mode)
        self.written = 0  # records written by this writer

    def write(self, record: IterationRecord) -> None:
        self._file.append(record_line(record))
        self.written += 1

    def close(self) -> None:
        self._file.close()
