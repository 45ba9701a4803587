"""Timelines: what each stage did when, its busy fraction, the pipeline's bubbles, Chrome traces."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm_dist.pipeline.actions import (
    BACKWARD,
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    ActionKind,
    Direction,
    kind_in_trace,
)
from sm_dist.whole_files import JsonListFile, remove_quietly


@dataclass(frozen=True)
class TimelineEvent:
    """One action of one stage, with wall-clock times (seconds since the epoch)."""

    stage: int
    iteration: int
    kind: ActionKind
    index: int | None
    start: float
    end: float
    detail: str = ""  # e.g. the inner steps an update slice took
    sent: int = 0  # bytes the action sent to its neighbours
    replica: int = 0  # which of the stage's data-parallel replicas (model.replicas)
    plan: int = -1  # the id of the plan it belongs to (-1: not from a dispatched plan)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ActionKind):
            object.__setattr__(self, "kind", kind_in_trace(self.kind))

    @property
    def label(self) -> str:
        return self.kind.letter if self.index is None else f"{self.kind.letter}{self.index}"


class EventLog(list):
    """The timeline events a pipeline has received, in arrival (iteration) order. Only the
    recent ones are kept (`forget_before`): what utilisation and the monitor read; every event
    also goes to `sink` (the streamed trace.json) as it arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0  # events forgotten from the front so far
        self.sink: Callable[[list[TimelineEvent]], None] | None = None

    def add(self, events: list[TimelineEvent]) -> None:
        self.extend(events)
        if self.sink is not None:
            self.sink(events)

    def forget_before(self, iteration: int) -> None:
        """Drop the leading events of iterations before `iteration`."""
        keep = next((k for k, e in enumerate(self) if e.iteration >= iteration), len(self))
        del self[:keep]
        self.dropped += keep


def _covered(intervals: Iterable[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of intervals clipped to [lo, hi)."""
    total, reach = 0.0, lo
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            total += end - start
            reach = end
    return total


@dataclass
class IterationUtilisation:
    """How busy each stage was during one iteration, and where the idle time sat."""

    duration: float  # the iteration's window: its first action to the next iteration's first
    busy_fraction: list[float]  # per stage
    bubble_fraction: float  # idle share of the pipeline: 1 − mean busy fraction
    turnaround_idle: list[float]  # per stage: idle between its last F and first B (GPipe's)
    update_idle: list[float | None]  # per stage: idle between its last B and next input action


def iteration_window(events: Sequence[TimelineEvent], iteration: int
                     ) -> tuple[float, float] | None:
    """From the iteration's first action to the next iteration's first (or to its own last
    action when none has started yet), so that back-to-back iterations tile the time line."""
    own = [e for e in events if e.iteration == iteration]
    if not own:
        return None
    later = [e.start for e in events if e.iteration > iteration]
    return min(e.start for e in own), (min(later) if later else max(e.end for e in own))


def iteration_utilisation(events: Sequence[TimelineEvent], iteration: int,
                          num_stages: int) -> IterationUtilisation | None:
    """Utilisation of one iteration from the events of every stage, over `iteration_window`."""
    window = iteration_window(events, iteration)
    if window is None:
        return None
    lo, hi = window
    duration = max(hi - lo, 1e-12)
    # With replicas, each (stage, replica) is measured on its own and the stage gets the mean.
    replicas = 1 + max((e.replica for e in events), default=0)
    parts = [_utilisation([e for e in events if e.replica == r], iteration, num_stages,
                          lo, hi, duration) for r in range(replicas)]
    if replicas == 1:
        busy, turnaround, update = parts[0]
    else:
        busy = [sum(p[0][s] for p in parts) / replicas for s in range(num_stages)]
        turnaround = [sum(p[1][s] for p in parts) / replicas for s in range(num_stages)]
        update = [None if any(p[2][s] is None for p in parts)
                  else sum(p[2][s] for p in parts) / replicas  # type: ignore[misc]
                  for s in range(num_stages)]
    return IterationUtilisation(duration, busy, 1.0 - sum(busy) / num_stages, turnaround, update)


# A zero-bubble schedule's backward is its two halves.
_BACKWARDS = (BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)


def _utilisation(events: Sequence[TimelineEvent], iteration: int, num_stages: int, lo: float,
                 hi: float, duration: float
                 ) -> tuple[list[float], list[float], list[float | None]]:
    """Busy shares, turnaround and update idle of one pipeline's stages over [lo, hi)."""
    own = [e for e in events if e.iteration == iteration]
    busy: list[float] = []
    turnaround: list[float] = []
    update: list[float | None] = []
    for s in range(num_stages):
        mine = [(e.start, e.end) for e in events if e.stage == s]
        busy.append(_covered(mine, lo, hi) / duration)
        stage_own = [e for e in own if e.stage == s]
        forwards = [e for e in stage_own if e.kind == FORWARD]
        backwards = [e for e in stage_own if e.kind in _BACKWARDS]
        if forwards and backwards:
            gap_lo, gap_hi = max(e.end for e in forwards), min(e.start for e in backwards)
            turnaround.append(max(gap_hi - gap_lo - _covered(mine, gap_lo, gap_hi), 0.0)
                              / duration)
        else:
            turnaround.append(0.0)
        following = [e.start for e in events if e.stage == s and e.iteration > iteration
                     and e.kind.direction is Direction.UP]
        if backwards and following:
            gap_lo, gap_hi = max(e.end for e in backwards), min(following)
            update.append(max(gap_hi - gap_lo - _covered(mine, gap_lo, gap_hi), 0.0) / duration)
        else:
            update.append(None)
    return busy, turnaround, update


def slowest_replicas(events: Iterable[TimelineEvent], num_stages: int) -> list[int | None]:
    """Per stage, the replica that spent the most time in actions over `events` (the one its
    pipeline waits for); None for a stage without replicas."""
    busy: dict[tuple[int, int], float] = {}
    for e in events:
        busy[(e.stage, e.replica)] = busy.get((e.stage, e.replica), 0.0) + e.end - e.start
    out: list[int | None] = []
    for s in range(num_stages):
        mine = {r: t for (stage, r), t in busy.items() if stage == s}
        out.append(max(mine, key=lambda r: mine[r]) if len(mine) > 1 else None)
    return out


def chrome_trace(events: Iterable[TimelineEvent], host_of_stage: dict[int, str] | None = None
                 ) -> dict[str, Any]:
    """Events in Chrome's trace format (opens in Perfetto / chrome://tracing): one row per stage."""
    events = list(events)
    origin = min((e.start for e in events), default=0.0)
    trace: list[dict[str, Any]] = []
    for s in sorted({e.stage for e in events}):
        host = (host_of_stage or {}).get(s, "")
        trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": s,
                      "args": {"name": f"stage {s}" + (f" ({host})" if host else "")}})
    trace.extend(_trace_event(e, origin) for e in events)
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def _trace_event(e: TimelineEvent, origin: float) -> dict[str, Any]:
    # One process row per replica (pid), a thread row per stage in it.
    return {"name": e.label, "cat": e.kind.name, "ph": "X", "pid": e.replica,
            "tid": e.stage,
            "ts": (e.start - origin) * 1e6, "dur": max(e.end - e.start, 0.0) * 1e6,
            "args": {"iteration": e.iteration, "plan": e.plan,
                     **({"detail": e.detail} if e.detail else {}),
                     **({"bytes": e.sent} if e.sent else {})}}


class TraceWriter:
    """Chrome's trace format written as events come, never held in memory, and a whole JSON
    document after every write: a failed write (a full disk) leaves the trace as it was
    (whole_files.JsonListFile). A process killed in the middle of a write leaves a file that
    lacks its closing `]}`, which `read_trace` tolerates."""

    def __init__(self, path: Path, num_stages: int,
                 host_of_stage: dict[int, str] | None = None) -> None:
        self.path = path
        self._file = JsonListFile(path, '{"displayTimeUnit": "ms", "traceEvents": [\n')
        self._origin: float | None = None
        names = []
        for s in range(num_stages):
            host = (host_of_stage or {}).get(s, "")
            names.append(json.dumps({"name": "thread_name", "ph": "M", "pid": 0, "tid": s,
                                     "args": {"name": f"stage {s}" + (f" ({host})" if host
                                                                      else "")}}))
        try:
            self._file.add(names)
        except BaseException:
            self._file.close()
            remove_quietly(path)
            raise

    def write(self, events: Iterable[TimelineEvent]) -> None:
        items = []
        for e in events:
            if self._origin is None:
                self._origin = e.start
            items.append(json.dumps(_trace_event(e, self._origin)))
        self._file.add(items)

    def close(self) -> None:
        self._file.close()


def read_trace(path: Path) -> dict[str, Any]:
    """A trace file as written by `TraceWriter` (or `chrome_trace`), also when cut short."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        complete = text[:text.rfind("}") + 1] if "}" in text else text
        return json.loads(complete + "\n]}")


def events_from_trace(trace: dict[str, Any]) -> list[TimelineEvent]:
    """The events of a trace that `chrome_trace` wrote, times in seconds from the trace's first
    action (the trace keeps no wall-clock origin). A letter no loaded optimizer registers is
    read as a kind of its own (`kind_in_trace`). Raises ValueError on a name that is not an
    action's (a letter and an index)."""
    events = []
    for item in trace.get("traceEvents", []):
        if item.get("ph") != "X":  # metadata: the stages' row names
            continue
        name = str(item.get("name", ""))
        letter, number = name[:1], name[1:]
        if not letter.isalpha() or not (number == "" or number.isdigit()):
            raise ValueError(f"unknown action {name!r} in the trace (expected e.g. F0, B3, L, W9)")
        args = item.get("args", {})
        start = float(item["ts"]) / 1e6
        events.append(TimelineEvent(stage=int(item["tid"]), iteration=int(args["iteration"]),
                                    kind=kind_in_trace(letter),
                                    index=int(number) if number else None,
                                    start=start, end=start + float(item["dur"]) / 1e6,
                                    detail=str(args.get("detail", "")),
                                    sent=int(args.get("bytes", 0)),
                                    replica=int(item.get("pid", 0)),
                                    plan=int(args.get("plan", -1))))
    return events

