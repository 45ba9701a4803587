"""Timelines: what each stage did when, its busy fraction, the pipeline's bubbles, Chrome traces."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

NAMES = {"F": "forward", "B": "backward", "E": "evaluate", "T": "trial forward",
         "L": "build local loss", "I": "inner steps", "W": "fill inner steps", "A": "apply update",
         "J": "tangent forward", "H": "tangent backward", "C": "CG step"}
UPDATE_KINDS = ("L", "I", "W", "A", "J", "H", "C")


@dataclass(frozen=True)
class TimelineEvent:
    """One action of one stage, with wall-clock times (seconds since the epoch)."""

    stage: int
    iteration: int
    kind: str
    index: int | None
    start: float
    end: float
    detail: str = ""  # e.g. the inner steps an update slice took

    @property
    def label(self) -> str:
        return self.kind if self.index is None else f"{self.kind}{self.index}"


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


def iteration_utilisation(events: Sequence[TimelineEvent], iteration: int,
                          num_stages: int) -> IterationUtilisation | None:
    """Utilisation of one iteration from the events of every stage. The window ends where the
    next iteration's first action starts (or at this iteration's last action if there is none
    yet), so back-to-back iterations tile the time line."""
    own = [e for e in events if e.iteration == iteration]
    if not own:
        return None
    later = [e.start for e in events if e.iteration > iteration]
    lo = min(e.start for e in own)
    hi = min(later) if later else max(e.end for e in own)
    duration = max(hi - lo, 1e-12)
    busy, turnaround, update = [], [], []
    for s in range(num_stages):
        mine = [(e.start, e.end) for e in events if e.stage == s]
        busy.append(_covered(mine, lo, hi) / duration)
        stage_own = [e for e in own if e.stage == s]
        forwards = [e for e in stage_own if e.kind == "F"]
        backwards = [e for e in stage_own if e.kind == "B"]
        if forwards and backwards:
            gap_lo, gap_hi = max(e.end for e in forwards), min(e.start for e in backwards)
            turnaround.append(max(gap_hi - gap_lo - _covered(mine, gap_lo, gap_hi), 0.0)
                              / duration)
        else:
            turnaround.append(0.0)
        following = [e.start for e in events if e.stage == s and e.iteration > iteration
                     and e.kind in ("F", "E", "T")]
        if backwards and following:
            gap_lo, gap_hi = max(e.end for e in backwards), min(following)
            update.append(max(gap_hi - gap_lo - _covered(mine, gap_lo, gap_hi), 0.0) / duration)
        else:
            update.append(None)
    return IterationUtilisation(duration, busy, 1.0 - sum(busy) / num_stages, turnaround, update)


def chrome_trace(events: Iterable[TimelineEvent], host_of_stage: dict[int, str] | None = None
                 ) -> dict:
    """Events in Chrome's trace format (opens in Perfetto / chrome://tracing): one row per stage."""
    events = list(events)
    origin = min((e.start for e in events), default=0.0)
    trace = []
    stages = sorted({e.stage for e in events})
    for s in stages:
        host = (host_of_stage or {}).get(s, "")
        trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": s,
                      "args": {"name": f"stage {s}" + (f" ({host})" if host else "")}})
    for e in events:
        trace.append({"name": e.label, "cat": NAMES[e.kind], "ph": "X", "pid": 0, "tid": e.stage,
                      "ts": (e.start - origin) * 1e6, "dur": max(e.end - e.start, 0.0) * 1e6,
                      "args": {"iteration": e.iteration, **({"detail": e.detail}
                                                            if e.detail else {})}})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_chrome_trace(path: Path, events: Iterable[TimelineEvent],
                       host_of_stage: dict[int, str] | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(chrome_trace(events, host_of_stage)))
    tmp.replace(path)


def events_to_dicts(events: Iterable[TimelineEvent]) -> list[dict]:
    return [asdict(e) for e in events]
