"""Plots of finished runs: loss and accuracy curves, and a Gantt chart of one pipeline iteration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The figure and the Agg canvas are used directly rather than through pyplot: no global backend
# to select, no display needed, and no figure registry that keeps figures alive.
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import Formatter, LogFormatter, MaxNLocator

from sm_dist.pipeline.actions import IDLE_COLOUR, ActionKind, known_kinds
from sm_dist.pipeline.timeline import (
    TimelineEvent,
    events_from_trace,
    iteration_utilisation,
    iteration_window,
)
from sm_dist.report.run_data import RunData
from sm_dist.run.metrics import IterationRecord
from sm_dist.whole_files import replace_whole

DPI = 120
FONT_SIZE = 10
LANE_HEIGHT = 0.8
MIN_BAR_PX = 2.5  # the narrowest bar the timeline draws, in pixels


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> None:
    """The figure as an image, in the format its name ends in; whole or absent."""
    path = Path(path)
    replace_whole(path, lambda handle: figure.savefig(handle, format=path.suffix[1:] or "png",
                                                      dpi=DPI, bbox_inches="tight"))


def _runs_title(what: str, runs: Sequence[RunData]) -> str:
    names = [run.name for run in runs]
    shown = ", ".join(names) if len(names) <= 3 else f"{len(names)} runs"
    return f"{what}: {shown}"


def series(records: Sequence[IterationRecord], x_key: str, y_key: str,
           x_of: Any = None) -> tuple[list[float], list[float]]:
    """The (x, y) pairs of the records having both fields; nulls (non-finite values) are
    skipped. `x_of(record)` computes x instead of reading field `x_key`."""
    xs, ys = [], []
    for record in records:
        x = x_of(record) if x_of is not None else record.value(x_key)
        y = record.value(y_key)
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _legend_or_note(axes: Axes) -> None:
    """The legend, or a note saying why the plot is empty (every value was null)."""
    if axes.lines:
        axes.legend(fontsize=FONT_SIZE - 1)
    else:
        axes.text(0.5, 0.5, "no finite values recorded", transform=axes.transAxes,
                  ha="center", va="center", fontsize=FONT_SIZE, color="0.4")


def _colour(position: int) -> str:
    return f"C{position % 10}"


class PlainLogFormatter(LogFormatter):
    """LogFormatter's choice of which ticks to label, written as plain numbers (0.9, 0.01)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


class MinorLogLabels(Formatter):
    """Plain labels on a log axis's minor ticks, fewer the more decades the view spans: every
    one within half a decade, 2, 3, 4 and 6 × 10^k up to `decades`, 2 and 5 × 10^k up to twice
    that, none beyond (the major ticks then label the axis). Decided at draw time from the
    view, so that labels never run together."""

    def __init__(self, decades: float) -> None:
        self.decades = decades

    def __call__(self, x: float, pos: int | None = None) -> str:
        low, high = sorted(self.axis.get_view_interval()) if self.axis else (x, x)
        if x <= 0 or low <= 0:
            return ""
        span = math.log10(high / low)
        coefficient = round(x / 10 ** math.floor(math.log10(x) + 1e-9), 6)
        if span <= 0.5:
            return f"{x:g}"
        if span <= self.decades:
            shown = (2, 3, 4, 6)
        elif span <= 2 * self.decades:
            shown = (2, 5)
        else:
            shown = ()
        return f"{x:g}" if coefficient in shown else ""


def plain_log_ticks(axis: Axis, minor_decades: float = 2.0) -> None:
    """Plain numbers (0.9, 2, 30; not 9×10^-1 or 2×10^0) on a log-scale axis, set after its
    scale (setting a scale resets the formatters). A short run's values often span less than a
    decade, so minor ticks carry labels too, as many as `minor_decades` allows (see
    MinorLogLabels; a horizontal axis has room for fewer than a vertical one)."""
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(MinorLogLabels(minor_decades))


def _loss_figure(runs: Sequence[RunData], x_key: str, x_label: str, path: str | Path) -> None:
    figure = new_figure(7.5, 4.5)
    axes = figure.add_subplot()
    for position, run in enumerate(runs):
        colour = _colour(position)
        xs, ys = series(run.records, x_key, "train_loss")
        if xs:
            axes.plot(xs, ys, color=colour, linewidth=1.6, label=f"{run.name} (train)")
        xs, ys = series(run.records, x_key, "test_loss")
        if xs:
            axes.plot(xs, ys, color=colour, linestyle="--", marker="o", markersize=4,
                      linewidth=1.0, label=f"{run.name} (test)")
    axes.set_yscale("log")
    plain_log_ticks(axes.yaxis)
    if x_key == "iteration":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(x_label, fontsize=FONT_SIZE)
    axes.set_ylabel("loss (log scale)", fontsize=FONT_SIZE)
    axes.set_title(_runs_title("Loss", runs), fontsize=FONT_SIZE + 1)
    axes.grid(True, which="major", alpha=0.3)
    axes.grid(True, which="minor", alpha=0.1)
    _legend_or_note(axes)
    save_figure(figure, path)


def plot_loss(runs: Sequence[RunData], path_iter: str | Path, path_time: str | Path) -> None:
    """Training loss (solid) and test loss (dashed, markers at the evaluations) of every run,
    against the iteration (to `path_iter`) and against wall time in seconds (to `path_time`)."""
    _loss_figure(runs, "iteration", "iteration", path_iter)
    _loss_figure(runs, "wall_time", "wall time (s)", path_time)


def plot_accuracy(runs: Sequence[RunData], path: str | Path) -> None:
    """Training accuracy (line) and test accuracy (markers) of every run against the iteration."""
    figure = new_figure(7.5, 4.5)
    axes = figure.add_subplot()
    for position, run in enumerate(runs):
        colour = _colour(position)
        xs, ys = series(run.records, "iteration", "train_acc")
        if xs:
            axes.plot(xs, [100 * y for y in ys], color=colour, linewidth=1.6,
                      label=f"{run.name} (train)")
        xs, ys = series(run.records, "iteration", "test_acc")
        if xs:
            axes.plot(xs, [100 * y for y in ys], color=colour, linestyle="none", marker="o",
                      markersize=5, label=f"{run.name} (test)")
    axes.set_ylim(0, 100)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("iteration", fontsize=FONT_SIZE)
    axes.set_ylabel("accuracy (%)", fontsize=FONT_SIZE)
    axes.set_title(_runs_title("Accuracy", runs), fontsize=FONT_SIZE + 1)
    axes.grid(True, alpha=0.3)
    _legend_or_note(axes)
    save_figure(figure, path)


# ------------------------------------------------------------------------------ the timeline
def default_timeline_iteration(events: Sequence[TimelineEvent]) -> int | None:
    """The iteration a report draws: the second-to-last, a steady-state one whose window ends at
    the next iteration's start (the first iteration also pays for warm-up), or the only one."""
    iterations = sorted({e.iteration for e in events})
    if not iterations:
        return None
    return iterations[-2] if len(iterations) > 1 else iterations[0]


def _text_fits(text: str, width_px: float) -> bool:
    # A rough average glyph width of 0.6 em: the label only needs to fit, not to be centred
    # to the pixel, and measuring with the renderer would draw every label twice.
    return len(text) * 0.6 * (FONT_SIZE - 2) * DPI / 72 + 4 <= width_px


def _bar_label(event: TimelineEvent, width_px: float) -> str:
    """The text drawn inside a bar, only where it fits whole: the action (F0, B1), or an
    update's letter with the steps it took (W 37 steps) or alone; else none."""
    if event.kind.travels:
        candidates = [event.label]
    else:  # an update's index is a step budget, not a microbatch: what it did says more
        candidates = [f"{event.kind.letter} {event.detail}"] if event.detail else []
        candidates.append(event.kind.letter)
    return next((text for text in candidates if _text_fits(text, width_px)), "")


def _legend_entries(drawn: set[ActionKind]) -> list[tuple[str, str]]:
    """(colour, label) per colour of the kinds drawn, each letter with its action's name
    (F forward, L build local loss), in the order the kinds were registered (a kind of an
    optimizer not loaded here last)."""
    groups: dict[str, tuple[str, list[str]]] = {}
    known = known_kinds()
    ordered = [k for k in known if k in drawn] + sorted(drawn - set(known), key=str)
    for kind in ordered:
        colour, names = groups.setdefault(kind.legend, (kind.colour, []))
        names.append(f"{kind.letter} {kind.name}")
    return [(colour, ", ".join(names)) for colour, names in groups.values()]


def _short_bar_width(width_ms: float, px_per_ms: float) -> float:
    """A bar's drawn width: at least MIN_BAR_PX, so that a microsecond forward still shows."""
    return max(width_ms, MIN_BAR_PX / px_per_ms)


def _timeline_axes(axes: Any, num_stages: int, iteration: int, window_ms: float, title: str,
                   utilisation: Any) -> None:
    """The timeline's lanes, axis label and title, with each lane's busy share."""
    axes.set_yticks(range(num_stages), [f"stage {s}" for s in range(num_stages)],
                    fontsize=FONT_SIZE)
    axes.set_xlabel(f"time from the first action of iteration {iteration} (ms)",
                    fontsize=FONT_SIZE)
    facts = f"window {window_ms:.1f} ms"
    if utilisation is not None:
        facts += f", pipeline idle {utilisation.bubble_fraction:.0%}"
        for stage, busy in enumerate(utilisation.busy_fraction):
            # Each lane's busy share, just right of the plot: the numbers metrics.jsonl holds.
            axes.text(1.005, stage, f"busy {busy:.0%}", transform=axes.get_yaxis_transform(),
                      va="center", ha="left", fontsize=FONT_SIZE - 1)
    axes.set_title(f"{title}\n{facts}", fontsize=FONT_SIZE + 1)
    axes.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        axes.spines[side].set_visible(False)


def _timeline_legend(figure: Any, axes: Any, drawn: set[ActionKind],
                     other_iterations: bool) -> None:
    """The timeline's legend below its x label: the kinds drawn, idle, another iteration."""
    legend = [Patch(facecolor=colour, label=label) for colour, label in _legend_entries(drawn)]
    legend.append(Patch(facecolor=IDLE_COLOUR, label="idle"))
    if other_iterations:
        legend.append(Patch(facecolor="#999999", edgecolor="white", hatch="///",
                            label="another iteration"))
    # As many columns as the widest label leaves room for in the figure's width.
    widest = max(len(patch.get_label()) for patch in legend)
    room = figure.get_figwidth() * 72 / (0.6 * (FONT_SIZE - 1) * widest + 4 * FONT_SIZE)
    # Below the x label: half an inch down, whatever the number of lanes makes the axes' height.
    below = -0.55 * DPI / axes.get_window_extent().height
    axes.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, below),
                ncol=max(1, min(len(legend), int(room))), fontsize=FONT_SIZE - 1,
                frameon=False)


def plot_timeline(events: Sequence[TimelineEvent] | dict[str, Any], iteration: int,
                  num_stages: int, path: str | Path, title: str) -> None:
    """A Gantt chart of one iteration, as in Figure 1 of the SM paper: one lane per stage (stage 0
    at the top), time in ms on x, bars coloured by phase over a grey lane whose visible parts are
    idle time. The window is the one `iteration_utilisation` measures: from the iteration's first
    action to the next iteration's first action (or to its own last action when it is the last),
    so every action of any iteration that runs in it is drawn, clipped to it; actions of other
    iterations (the previous update still filling bubbles) are hatched. `events` may also be a
    trace dict as trace.json holds it."""
    if isinstance(events, dict):
        events = events_from_trace(events)
    window = iteration_window(events, iteration)
    if window is None:
        raise ValueError(f"no actions of iteration {iteration} in the timeline")
    lo, hi = window
    window_ms = max(hi - lo, 1e-9) * 1e3

    figure = new_figure(10.0, 1.6 + 0.55 * num_stages)
    axes = figure.add_subplot()
    axes.set_xlim(0, window_ms)
    axes.set_ylim(num_stages - 0.5, -0.5)  # stage 0 at the top
    figure.canvas.draw()  # fixes the axes' size in pixels, needed to decide which labels fit
    px_per_ms = axes.get_window_extent().width / window_ms
    other_iterations = False
    drawn: set[ActionKind] = set()  # the legend names these
    for stage in range(num_stages):
        axes.broken_barh([(0, window_ms)], (stage - LANE_HEIGHT / 2, LANE_HEIGHT),
                         facecolors=IDLE_COLOUR, zorder=1)
    for event in events:
        start, end = max(event.start, lo), min(event.end, hi)
        if end <= start or not 0 <= event.stage < num_stages:
            continue
        x, width = (start - lo) * 1e3, (end - start) * 1e3
        foreign = event.iteration != iteration
        other_iterations |= foreign
        drawn.add(event.kind)
        # A white edge parts neighbouring bars, but it would cover a narrow bar entirely.
        edge = 0.6 if width * px_per_ms > 3 * MIN_BAR_PX else 0.0
        axes.broken_barh([(x, _short_bar_width(width, px_per_ms))],
                         (event.stage - LANE_HEIGHT / 2, LANE_HEIGHT),
                         facecolors=event.kind.colour, edgecolors="white",
                         linewidth=edge, hatch="///" if foreign else None, zorder=2)
        text = _bar_label(event, width * px_per_ms)
        if text:
            dark = event.kind.legend in ("forward", "update")
            axes.text(x + width / 2, event.stage, text, ha="center", va="center",
                      fontsize=FONT_SIZE - 2, color="white" if dark else "black", zorder=3,
                      clip_on=True)

    _timeline_axes(axes, num_stages, iteration, window_ms, title,
                   iteration_utilisation(events, iteration, num_stages))

    _timeline_legend(figure, axes, drawn, other_iterations)
    save_figure(figure, path)
