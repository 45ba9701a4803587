"""A finished (or interrupted) run directory as read from disk, for reports and compare."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sm_dist.optim import registry
from sm_dist.optim.metrics import NoMetrics, OptimizerMetrics
from sm_dist.pipeline.timeline import events_from_trace, read_trace
from sm_dist.run.metrics import IterationRecord, MetricsError, read_metrics
from sm_dist.run.run_dir import StopNote, read_stop_note


class ReportError(Exception):
    """A directory that cannot be reported on: missing, not a run, or with unreadable files."""


@dataclass
class RunData:
    """One run directory as read from disk."""

    path: Path
    name: str  # what plots and tables call the run: its directory's name
    config: dict[str, Any]  # config.yaml, the resolved job
    records: list[IterationRecord]  # metrics.jsonl, one per finished iteration
    trace: dict[str, Any] | None  # trace.json (absent for --single-process runs)
    stop: StopNote | None = None  # why the run stopped early (stopped.json), if it did
    finished: bool = True  # it wrote model.pt, which a run does after its last iteration

    @property
    def stopped(self) -> str | None:
        """What the run said when a diverging loss stopped it (None: it did not); compare
        takes such a run as a result, not a failure."""
        return self.stop.message if self.stop is not None and self.stop.kind == "diverged" \
            else None

    @property
    def ended_early(self) -> str | None:
        """Why the run ended before its last iteration, whatever stopped it: its stop note, or
        what the directory shows (None: it finished)."""
        if self.stop is not None:
            return self.stop.text().strip()
        planned = (self.config.get("run") or {}).get("iterations")
        last = self.records[-1].iteration
        if self.finished or not isinstance(planned, int) or last >= planned:
            return None
        return (f"it ended after iteration {last} of {planned} and left no stop note (a full "
                "disk has no room for one, a killed process no time; or it is still running)")

    @property
    def metrics(self) -> type[OptimizerMetrics]:
        """Its optimizer's metrics section (none for an optimizer that cannot be loaded here)."""
        name = (self.config.get("optimizer") or {}).get("name")
        try:
            return registry.get(name).Metrics if isinstance(name, str) else NoMetrics
        except registry.UnknownOptimizer:
            return NoMetrics


def load_run(path: str | Path) -> RunData:
    """The run directory at `path`; ReportError naming the directory says what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path} does not exist")
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory: give a run directory")
    if not (path / "metrics.jsonl").is_file():
        raise ReportError(f"{path} has no metrics.jsonl: is it a run directory?")
    if not (path / "config.yaml").is_file():
        raise ReportError(f"{path} has no config.yaml: is it a run directory?")
    try:
        records = read_metrics(path / "metrics.jsonl")
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        trace_path = path / "trace.json"
        trace = read_trace(trace_path) if trace_path.is_file() else None
    except OSError as err:
        raise ReportError(f"cannot read {path}: {err}") from None
    except MetricsError as err:
        raise ReportError(str(err)) from None
    except yaml.YAMLError as err:
        raise ReportError(f"{path / 'config.yaml'} is not valid YAML ({err})") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{path / 'trace.json'} is not valid JSON ({err.msg})") from None
    if not records:
        raise ReportError(f"{path / 'metrics.jsonl'} holds no finished iteration yet")
    if not isinstance(config, dict):
        raise ReportError(f"{path / 'config.yaml'} is not a job (a mapping of sections)")
    if trace is not None:
        try:  # read it now so that a bad trace is reported as bad input, not a crash later
            events_from_trace(trace)
        except (KeyError, TypeError, ValueError) as err:
            raise ReportError(f"{path / 'trace.json'} is not an sm-dist trace ({err})") from None
    return RunData(path, path.resolve().name, config, records, trace, read_stop_note(path),
                   (path / "model.pt").is_file())


def load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """Every run, named so that no two share a name (in legends and timeline file names)."""
    runs = [load_run(p) for p in paths]
    counts = Counter(run.name for run in runs)
    taken: set[str] = set()
    for run in runs:
        if counts[run.name] > 1:  # e.g. a/out and b/out
            run.name = f"{run.path.resolve().parent.name}/{run.name}"
        name, copy = run.name, 1
        while name in taken:  # the same directory given twice
            copy += 1
            name = f"{run.name}#{copy}"
        run.name = name
        taken.add(name)
    return runs
