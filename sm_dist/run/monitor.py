"""What the coordinator shows while training: a live rich view, or plain progress lines."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from sm_dist.config.build import build_optimizer
from sm_dist.config.job import JobConfig
from sm_dist.models.build import num_params
from sm_dist.optim.metrics import NoMetrics, OptimizerMetrics
from sm_dist.pipeline.interface import Pipeline
from sm_dist.pipeline.timeline import TimelineEvent, slowest_replicas
from sm_dist.run.metrics import IterationRecord, SteadyMeans

Metrics = type[OptimizerMetrics]


def means_note(metrics: Metrics) -> str:
    """What the live view's steady means are of."""
    labels = ["bubble", "busy"] + [metrics.shown(n).heading or metrics.shown(n).label
                                   for n in metrics.means_of()]
    return f"{', '.join(labels)}: means over steady iterations (not the first or last)"


def format_record(record: IterationRecord, iterations: int,
                  metrics: Metrics = NoMetrics) -> str:
    """One plain progress line per iteration (`metrics`: the optimizer's section's class)."""
    parts = [f"iter {record.iteration:>{len(str(iterations))}}/{iterations}",
             f"loss {record.train_loss:.4f}", f"acc {record.train_acc:.3f}"]
    if record.predicted_decrease is not None:
        parts.append(f"pred {record.predicted_decrease:+.3e}")
    parts += metrics.line_parts(record.optimizer)
    if record.test_acc is not None and record.test_loss is not None:
        parts.append(f"test_loss {record.test_loss:.4f} test_acc {record.test_acc:.3f}")
    if record.full_train_loss is not None and record.full_train_acc is not None:
        parts.append(f"full_train_loss {record.full_train_loss:.4f} "
                     f"full_train_acc {record.full_train_acc:.3f}")
    if record.epoch is not None:
        parts.append(f"epoch {record.epoch:.2f}")
    if record.peak_memory_mb:
        parts.append("peak_mem_mib " + ",".join(f"{m:.0f}" for m in record.peak_memory_mb))
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
            return event.kind.phase
    return "idle"


PLAIN_LINES = 200  # the most progress lines a plain monitor prints by default, whatever the run


def log_interval(iterations: int, every: int = 0) -> int:
    """Iterations between two plain progress lines: `every` (run.log_every), or with 0 the
    smallest interval that prints at most PLAIN_LINES lines (1 for a run of up to 200)."""
    return every if every > 0 else max(1, -(-iterations // PLAIN_LINES))


class PlainMonitor:
    """One line every `every` iterations (run.log_every; 0: at most PLAIN_LINES lines) and one
    for the last, for logs and terminals without the live view. A run that ends before its
    last iteration prints the last iteration it finished when the monitor closes."""

    def __init__(self, iterations: int, stream: TextIO | None = None,
                 metrics: Metrics = NoMetrics, every: int = 0) -> None:
        self.iterations = iterations
        self.stream = stream
        self.metrics = metrics
        self.every = log_interval(iterations, every)
        self._unprinted: IterationRecord | None = None  # the newest record not printed

    def __enter__(self) -> PlainMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._unprinted is not None:  # the run ended early: where it got to
            try:
                self._print(self._unprinted)
            except OSError:
                pass  # the reader of stdout left: the error in flight says more

    def progress(self, record: IterationRecord) -> None:
        """A new iteration's result, printed at once when it is due (its utilisation is not
        known yet)."""
        if record.iteration % self.every == 0 or record.iteration >= self.iterations:
            self._print(record)
        else:
            self._unprinted = record

    def _print(self, record: IterationRecord) -> None:
        self._unprinted = None
        print(format_record(record, self.iterations, self.metrics), file=self.stream,
              flush=True)

    def record(self, record: IterationRecord) -> None:
        pass


@dataclass(frozen=True)
class StageInfo:
    """Where one stage runs and how many parameters it holds."""

    device: str
    parameters: int
    host: str = ""


def stage_infos(pipeline: Pipeline) -> list[StageInfo]:
    """Each stage's device and parameter count: the engine's stages described themselves when
    they joined (RpcPipeline.stages), the single-process pipeline holds the stages themselves."""
    stages = getattr(pipeline, "stages", None)  # both pipelines have it, in their own form
    if isinstance(stages, dict):
        return [StageInfo(str(stages[s]["device"]), int(stages[s]["parameters"]),
                          str(stages[s].get("host", ""))) for s in sorted(stages)]
    if isinstance(stages, list):
        return [StageInfo(str(stage.device), num_params(stage.module)) for stage in stages]
    return []


class Packed:
    """Items left to right, as many to a line as the console has room for; an item is never
    split across lines unless it alone is wider than the console."""

    def __init__(self, items: Sequence[Text], gap: int = 3) -> None:
        self.items, self.gap = list(items), gap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        line = Text()
        for item in self.items:
            if line.cell_len and line.cell_len + self.gap + item.cell_len > options.max_width:
                yield line
                line = Text()
            if line.cell_len:
                line.append(" " * self.gap)
            line.append_text(item)
        if line.cell_len:
            yield line


def run_header(header: str, stages: Sequence[StageInfo]) -> RenderableType:
    """The line printed before training, wrapped at spaces, and each stage's device and
    parameters (with its host when the stages run on several)."""
    several = len({info.host for info in stages}) > 1
    items = [Text(f"stage {s}: {info.host + ' ' if several else ''}{info.device}, "
                  f"{info.parameters:,} parameters") for s, info in enumerate(stages)]
    # "-> RUN_DIR" moves to a line of its own as a whole rather than leaving "->" behind.
    before, arrow, after = header.partition(" -> ")
    line = Packed([Text(before), Text(f"-> {after}")], gap=1) if arrow else Text(header)
    return Group(line, Packed(items))


def _mib_text(mib: float) -> str:
    return f"{mib:.0f} MiB"


def _at(values: list[Any] | None, stage: int) -> Any:
    return None if values is None or stage >= len(values) else values[stage]


class LiveMonitor:
    """The rich live view, redrawn at most `refresh_per_second` times by rich's own thread.

    The training loop only stores what the stages already sent (iteration results and their
    timelines); drawing reads that state, so the monitor sends nothing to the stages and costs
    the loop a few assignments per iteration. Bubble, busy shares and the optimizer section's
    averaged fields (e.g. inner steps) are means over the steady iterations (`SteadyMeans`, as
    in summary.json), so that the last frame and the summary printed after it agree. The
    optimizer's section is shown as its `metrics` class says, with its `notes` beside it.
    """

    def __init__(self, name: str, iterations: int, num_stages: int,
                 events: list[TimelineEvent], console: Console | None = None,
                 refresh_per_second: float = 2.0, metrics: Metrics = NoMetrics,
                 notes: Sequence[str] = ()) -> None:
        self.name = name
        self.iterations = iterations
        self.num_stages = num_stages
        self.events = events  # the pipeline's own list, appended to as results arrive
        self.metrics = metrics
        self.notes = list(notes)  # e.g. a torch optimizer's constant lr
        self._seen = 0  # events already sorted into `recent`
        # Each stage's events of its last two reported iterations: all stage_phase needs,
        # so a redraw costs the same in the thousandth iteration as in the first.
        self.recent: dict[int, list[TimelineEvent]] = {s: [] for s in range(num_stages)}
        self.console = console or Console()
        self.latest: IterationRecord | None = None
        self.test: IterationRecord | None = None
        self.full_train: IterationRecord | None = None  # the last whole-training-set evaluation
        self.counts: dict[str, int] = {}  # the section's `counted` fields, over the run so far
        self.steady = SteadyMeans(metrics.means_of())  # of the finished records
        self.means: dict[str, Any] = self.steady.means()
        self._lock = threading.Lock()
        self.stopped = False  # training is over: no stage is doing anything any more
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=self.console)
        self.task = self.bar.add_task(name, total=iterations)
        self.live = Live(self, console=self.console, refresh_per_second=refresh_per_second,
                         transient=False)

    @classmethod
    def for_job(cls, job: JobConfig, pipeline: Pipeline,
                console: Console | None = None) -> LiveMonitor:
        """The live view of `job` on `pipeline`."""
        optimizer = build_optimizer(job)
        return cls(job.name, job.run.iterations, pipeline.num_stages, pipeline.events, console,
                   metrics=optimizer.Metrics, notes=optimizer.monitor_notes())

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
            for name in self.metrics.counted:
                self.counts[name] = self.counts.get(name, 0) + bool(record.metric(name))
            if record.test_acc is not None:
                self.test = record
            if record.full_train_loss is not None:
                self.full_train = record
        self.bar.update(self.task, completed=record.iteration)

    def record(self, record: IterationRecord) -> None:
        with self._lock:
            self.steady.add(record)
            self.means = self.steady.means()  # once per iteration, not once per redraw

    def __rich__(self) -> RenderableType:
        with self._lock:
            latest, test, means = self.latest, self.test, self.means
        parts: list[RenderableType] = [self.bar, Packed(self._summary(latest, test, means)),
                                       self._stages(latest, means)]
        if any(means[key] is not None for key in ("bubble_fraction", *self.metrics.means_of())):
            parts.append(Text(means_note(self.metrics), style="dim"))
        return Group(*parts)

    def _summary(self, latest: IterationRecord | None, test: IterationRecord | None,
                 means: dict[str, Any]) -> list[Text]:
        """The figures of the whole pipeline, each an unbreakable item of the line."""
        if latest is None:
            return [Text("waiting for the first iteration")]
        items = [Text.assemble("loss ", (f"{latest.train_loss:.4f}", "bold"))]
        if latest.train_acc is not None:
            items.append(Text(f"acc {latest.train_acc:.3f}"))
        if test is not None and test.test_acc is not None:
            items.append(Text(f"test acc {test.test_acc:.3f} (iter {test.iteration})"))
        whole = self.full_train
        if whole is not None and whole.full_train_loss is not None:
            items.append(Text(f"full-set loss {whole.full_train_loss:.4f} "
                              f"(iter {whole.iteration})"))
        if latest.epoch is not None:
            items.append(Text(f"epoch {latest.epoch:.2f}"))
        ratio = latest.decrease_ratio_prev
        if ratio:  # the prediction is actual / ratio (0 only when nothing changed)
            actual = latest.actual_decrease_prev or 0.0
            items.append(Text(f"decrease actual/predicted {actual:+.2e} / {actual / ratio:+.2e}"))
        elif latest.predicted_decrease is not None:
            items.append(Text(f"predicted decrease {latest.predicted_decrease:+.2e}"))
        items += [Text(item) for item in self.metrics.summary_items(latest.optimizer,
                                                                      self.counts)]
        items += [Text(note) for note in self.notes]
        if means["bubble_fraction"] is not None:
            items.append(Text(f"bubble {means['bubble_fraction']:.0%}"))
        memory = latest.peak_memory_mb
        if memory is not None and len(memory) != self.num_stages:  # all stages in one process
            items.append(Text(f"peak memory {_mib_text(memory[0])}"))
        return items

    def _sort_new_events(self) -> None:
        dropped = getattr(self.events, "dropped", 0)  # an EventLog forgets its oldest
        new = self.events[max(self._seen - dropped, 0):]
        self._seen = dropped + len(self.events)
        for event in new:
            mine = self.recent[event.stage]
            mine.append(event)
            if mine[0].iteration < event.iteration - 1:
                self.recent[event.stage] = [e for e in mine if e.iteration >= event.iteration - 1]

    def _stages(self, latest: IterationRecord | None, means: dict[str, Any]) -> Table:
        """One row per stage, with the columns the optimizer's section fills."""
        def has(values: list[Any] | None) -> bool:
            return values is not None and any(v is not None for v in values)

        columns: list[tuple[str, list[Any] | None, Callable[[Any], str]]] = []
        columns += self.metrics.columns(latest.optimizer if latest else {}, means)
        columns.append(("busy", means["busy_fraction"], lambda v: f"{v:.0%}"))
        self._sort_new_events()  # model.replicas: the busy share is their mean; name the slowest
        slowest = slowest_replicas([e for s in self.recent for e in self.recent[s]],
                                   self.num_stages)
        if has(slowest):
            columns.append(("slowest replica", slowest, str))
        memory = latest.peak_memory_mb if latest else None
        if memory is not None and len(memory) == self.num_stages:  # one process per stage
            columns.append(("peak memory", memory, _mib_text))
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("stage", justify="right")
        table.add_column("phase")
        for heading, _, _ in columns:
            table.add_column(heading, justify="right")
        now = time.time()
        self._sort_new_events()
        for s in range(self.num_stages):
            phase = "done" if self.stopped else stage_phase(self.recent[s], s, now)
            row = [str(s), phase if self.events else "-"]
            row += ["-" if (value := _at(values, s)) is None else form(value)
                    for _, values, form in columns]
            table.add_row(*row)
        return table
