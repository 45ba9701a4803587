"""What the coordinator shows while training: a live rich view, or one plain line per iteration."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sm_dist.pipeline.timeline import TimelineEvent
from sm_dist.run.metrics import IterationRecord


def format_record(record: IterationRecord, iterations: int) -> str:
    """One plain progress line per iteration."""
    parts = [f"iter {record.iteration:>{len(str(iterations))}}/{iterations}",
             f"loss {record.train_loss:.4f}", f"acc {record.train_acc:.3f}"]
    if record.predicted_decrease is not None and record.inner_steps is not None:
        parts.append(f"pred {record.predicted_decrease:+.3e}")
        parts.append("inner " + ",".join(str(s) for s in record.inner_steps))
    if record.step_scale is not None:
        parts.append(f"scale {record.step_scale:.3g}"
                     + (" (step rejected)" if record.step_rejected else ""))
    if record.step_size is not None:
        parts.append(f"step {record.step_size:.3g} ({record.line_search_trials} trials)")
    if record.test_acc is not None and record.test_loss is not None:
        parts.append(f"test_loss {record.test_loss:.4f} test_acc {record.test_acc:.3f}")
    parts.append(f"{record.wall_time:.1f}s")
    return "  ".join(parts)


def stage_phase(events: Sequence[TimelineEvent], stage: int, now: float) -> str:
    """What a stage is doing now, as far as the coordinator can know without asking it.

    Stages report their actions when they finish an iteration. Until the next report, the
    stage is taken to repeat its last reported iteration: its phase is the one it had at the
    same time after the start of that iteration (the schedule is the same every iteration).
    """
    mine = [e for e in events if e.stage == stage]
    if not mine:
        return "starting"
    last_iteration = mine[-1].iteration
    template = [e for e in mine if e.iteration == last_iteration]
    before = [e for e in mine if e.iteration < last_iteration]
    origin = before[-1].end if before else template[0].start
    elapsed = now - template[-1].end  # time since the stage reported its last action
    for event in template:
        if event.start - origin <= elapsed < event.end - origin:
            return event.kind.info.phase
    return "idle"


class PlainMonitor:
    """One line per iteration, for logs and terminals without the live view."""

    def __init__(self, iterations: int, stream: TextIO | None = None) -> None:
        self.iterations = iterations
        self.stream = stream

    def __enter__(self) -> PlainMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def progress(self, record: IterationRecord) -> None:
        """A new iteration's result, printed at once (its utilisation is not known yet)."""
        print(format_record(record, self.iterations), file=self.stream, flush=True)

    def record(self, record: IterationRecord) -> None:
        pass


def _per_stage(values: list[Any] | None, stage: int) -> Any:
    return None if values is None else values[stage]


class LiveMonitor:
    """The rich live view, redrawn at most `refresh_per_second` times by rich's own thread.

    The training loop only stores what the stages already sent (iteration results and their
    timelines); drawing reads that state, so the monitor sends nothing to the stages and costs
    the loop a few assignments per iteration.
    """

    def __init__(self, name: str, iterations: int, num_stages: int,
                 events: list[TimelineEvent], console: Console | None = None,
                 refresh_per_second: float = 2.0) -> None:
        self.name = name
        self.iterations = iterations
        self.num_stages = num_stages
        self.events = events  # the pipeline's own list, appended to as results arrive
        self._seen = 0  # events already sorted into `recent`
        # Each stage's events of its last two reported iterations: all stage_phase needs,
        # so a redraw costs the same in the thousandth iteration as in the first.
        self.recent: dict[int, list[TimelineEvent]] = {s: [] for s in range(num_stages)}
        self.console = console or Console()
        self.latest: IterationRecord | None = None
        self.finished: IterationRecord | None = None  # the last with utilisation (one behind)
        self.test: IterationRecord | None = None
        self.rejected = 0  # sm_adaptive: steps rejected so far
        self._lock = threading.Lock()
        self.stopped = False  # training is over: no stage is doing anything any more
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=self.console)
        self.task = self.bar.add_task(name, total=iterations)
        self.live = Live(self, console=self.console, refresh_per_second=refresh_per_second,
                         transient=False)

    def __enter__(self) -> LiveMonitor:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped = True
        self.live.refresh()
        self.live.stop()

    def progress(self, record: IterationRecord) -> None:
        with self._lock:
            self.latest = record
            self.rejected += bool(record.step_rejected)
            if record.test_acc is not None:
                self.test = record
        self.bar.update(self.task, completed=record.iteration)

    def record(self, record: IterationRecord) -> None:
        with self._lock:
            self.finished = record

    def __rich__(self) -> RenderableType:
        with self._lock:
            latest, finished, test = self.latest, self.finished, self.test
        return Group(self.bar, self._summary(latest, finished, test),
                     self._stages(latest, finished))

    def _summary(self, latest: IterationRecord | None, finished: IterationRecord | None,
                 test: IterationRecord | None) -> Table:
        table = Table.grid(padding=(0, 3))
        row = []
        if latest is not None:
            row += [f"loss [bold]{latest.train_loss:.4f}[/]", f"acc {latest.train_acc:.3f}"]
        if test is not None and test.test_acc is not None:
            row.append(f"test acc {test.test_acc:.3f} (iter {test.iteration})")
        if latest is not None and latest.decrease_ratio_prev is not None:
            actual = latest.actual_decrease_prev or 0.0
            row.append(f"decrease actual/predicted {actual:+.2e}"
                       f" / {actual / latest.decrease_ratio_prev:+.2e}")
        elif latest is not None and latest.predicted_decrease is not None:
            row.append(f"predicted decrease {latest.predicted_decrease:+.2e}")
        if latest is not None and latest.step_scale is not None:
            row.append(f"scale {latest.step_scale:.3g}, {self.rejected} rejected")
        if finished is not None and finished.bubble_fraction is not None:
            row.append(f"bubble {finished.bubble_fraction:.0%}")
        table.add_row(*(row or ["waiting for the first iteration"]))
        return table

    def _sort_new_events(self) -> None:
        dropped = getattr(self.events, "dropped", 0)  # an EventLog forgets its oldest
        new = self.events[max(self._seen - dropped, 0):]
        self._seen = dropped + len(self.events)
        for event in new:
            mine = self.recent[event.stage]
            mine.append(event)
            if mine[0].iteration < event.iteration - 1:
                self.recent[event.stage] = [e for e in mine if e.iteration >= event.iteration - 1]

    def _stages(self, latest: IterationRecord | None, finished: IterationRecord | None) -> Table:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("stage", "phase", "inner steps", "local loss", "curvature sent", "busy"):
            table.add_column(column, justify="left" if column == "phase" else "right")
        now = time.time()
        self._sort_new_events()
        for s in range(self.num_stages):
            steps = _per_stage(latest.inner_steps if latest else None, s)
            value = _per_stage(latest.local_loss if latest else None, s)
            curvature = _per_stage(latest.curvature if latest else None, s)
            busy = _per_stage(finished.busy_fraction if finished else None, s)
            phase = "done" if self.stopped else stage_phase(self.recent[s], s, now)
            table.add_row(str(s), phase if self.events else "-",
                          "-" if steps is None else str(steps),
                          "-" if value is None else f"{value:+.3e}",
                          "-" if curvature is None else f"{curvature:.3e}",
                          "-" if busy is None else f"{busy:.0%}")
        return table
