"""An optimizer's own section of the iteration record: its fields (a dataclass of `metric`s),
their JSON form and how the monitor shows them. The record, metrics.jsonl, TensorBoard, the
monitor and the reports read any optimizer's section through this class, never by its name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

Section = Mapping[str, Any]  # a section's values by field name, as metrics.jsonl holds them
Column = tuple[str, list[Any], Callable[[Any], str]]  # heading, one value per stage, format


@dataclass(frozen=True)
class Shown:
    """How the monitor shows one metric: `label` and a format spec for numbers; per stage
    (a list, one entry per stage); on the plain progress line; as a column of the live
    view's stage table (per-stage metrics); averaged over the steady iterations like the
    utilisation (summary.json's `mean_<name>`)."""

    label: str
    format: str | Callable[[Any], str] = ""  # a format spec, or a function of the value
    heading: str = ""  # the stage table's column heading (default: the label)
    per_stage: bool = False
    line: bool = False
    column: bool = False
    mean: bool = False

    def text(self, value: Any) -> str:
        if isinstance(value, list):
            return ",".join("-" if v is None else self.text(v) for v in value)
        if callable(self.format):
            return self.format(value)
        return format(value, self.format) if isinstance(value, (int, float)) else str(value)


def metric(label: str, *, format: str | Callable[[Any], str] = "", heading: str = "",
           per_stage: bool = False, line: bool = False, column: bool = False,
           mean: bool = False) -> Any:
    """A field of a metrics section (None until an iteration measures it)."""
    return field(default=None, metadata={"shown": Shown(label, format, heading, per_stage,
                                                         line, column, mean)})


@dataclass
class OptimizerMetrics:
    """The base of an optimizer's section: subclass it with `metric` fields; override the
    `line_parts`, `summary_items` or `columns` where one field's display needs another's."""

    # What the coordinator counts over the run for the live view (e.g. rejected steps).
    counted: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def shown(cls, name: str) -> Shown:
        spec = next(f for f in dataclasses.fields(cls) if f.name == name)
        return spec.metadata["shown"]

    @classmethod
    def check(cls, values: Section) -> None:
        """Every key is one of the section's fields (a typo is a bug, said at once)."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise AttributeError(f"{cls.__name__} has no field {unknown[0]!r}")

    @classmethod
    def means_of(cls) -> tuple[str, ...]:
        """The per-stage fields averaged over the steady iterations."""
        return tuple(name for name in cls.names() if cls.shown(name).mean)

    @classmethod
    def line_parts(cls, section: Section) -> list[str]:
        """This section's parts of the plain progress line."""
        return [f"{cls.shown(name).label} {cls.shown(name).text(section[name])}"
                for name in cls.names()
                if cls.shown(name).line and section.get(name) is not None]

    @classmethod
    def summary_items(cls, section: Section, counts: Mapping[str, int]) -> list[str]:
        """This section's items of the live view's summary line (`counts`: the run's totals
        of the `counted` fields so far)."""
        return [f"{cls.shown(name).label} {cls.shown(name).text(section[name])}"
                for name in cls.names()
                if not cls.shown(name).per_stage and not cls.shown(name).line
                and section.get(name) is not None and cls.shown(name).label]

    @classmethod
    def columns(cls, section: Section, means: Mapping[str, Any]) -> list[Column]:
        """This section's columns of the live view's stage table: the steady mean where the
        field has one, else the latest iteration's values."""
        found: list[Column] = []
        for name in cls.names():
            shown = cls.shown(name)
            values = means.get(name) or section.get(name)
            if shown.column and values is not None and any(v is not None for v in values):
                found.append((shown.heading or shown.label, list(values), _formatter(shown)))
        return found


def _formatter(shown: Shown) -> Callable[[Any], str]:
    return lambda value: shown.text(value)


@dataclass
class NoMetrics(OptimizerMetrics):
    """An optimizer that adds nothing to the record."""
