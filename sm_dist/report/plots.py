"""Plots of finished runs: loss and accuracy curves, and a Gantt chart of one pipeline iteration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The figure and the Agg canvas are used directly rather than through pyplot: no global backend
# to select, no display needed, and no figure registry that keeps figures alive.
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter, MaxNLocator

from sm_dist.pipeline.actions import IDLE_COLOUR, ActionKind
from sm_dist.pipeline.timeline import (
    TimelineEvent,
    events_from_trace,
    iteration_utilisation,
    iteration_window,
)
from sm_dist.report.run_data import RunData
from sm_dist.run.metrics import IterationRecord

DPI = 120
FONT_SIZE = 10
LANE_HEIGHT = 0.8


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> None:
    figure.savefig(Path(path), dpi=DPI, bbox_inches="tight")


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
        x = x_of(record) if x_of is not None else getattr(record, x_key)
        y = getattr(record, y_key)
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
    # Plain numbers (0.9, not 9e-01): a short run's losses often span less than a decade, so the
    # labels sit on the minor ticks, which matplotlib only labels when few are in view.
    axes.yaxis.set_major_formatter(PlainLogFormatter())
    axes.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False,
                                                      minor_thresholds=(2, 0.5)))
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
    """The text drawn inside a bar: the action (F0, B1, W) if it fits, else its index, else none."""
    if event.kind.info.legend in ("forward", "backward"):
        candidates = [event.label, str(event.index)]
    else:  # an update's index is a step budget, not a microbatch: its letter says enough
        candidates = [event.kind]
    return next((text for text in candidates if _text_fits(text, width_px)), "")


def _legend_groups() -> list[tuple[str, str, list[str]]]:
    """(group, colour, letters) of the action kinds, in the order the legend shows them."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for kind in ActionKind:
        colour, letters = groups.setdefault(kind.info.legend, (kind.info.colour, []))
        letters.append(kind.value)
    return [(group, colour, letters) for group, (colour, letters) in groups.items()]


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
    utilisation = iteration_utilisation(events, iteration, num_stages)

    figure = new_figure(10.0, 1.6 + 0.55 * num_stages)
    axes = figure.add_subplot()
    axes.set_xlim(0, window_ms)
    axes.set_ylim(num_stages - 0.5, -0.5)  # stage 0 at the top
    figure.canvas.draw()  # fixes the axes' size in pixels, needed to decide which labels fit
    px_per_ms = axes.get_window_extent().width / window_ms
    other_iterations = False
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
        axes.broken_barh([(x, width)], (event.stage - LANE_HEIGHT / 2, LANE_HEIGHT),
                         facecolors=event.kind.info.colour, edgecolors="white",
                         linewidth=0.6, hatch="///" if foreign else None, zorder=2)
        text = _bar_label(event, width * px_per_ms)
        if text:
            dark = event.kind.info.legend in ("forward", "update")
            axes.text(x + width / 2, event.stage, text, ha="center", va="center",
                      fontsize=FONT_SIZE - 2, color="white" if dark else "black", zorder=3,
                      clip_on=True)

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

    drawn = {event.kind for event in events}
    legend = [Patch(facecolor=colour, label=f"{group} ({', '.join(letters)})")
              for group, colour, letters in _legend_groups()
              if group != "tangent" or drawn & set(letters)]
    legend.append(Patch(facecolor=IDLE_COLOUR, label="idle"))
    if other_iterations:
        legend.append(Patch(facecolor="#999999", edgecolor="white", hatch="///",
                            label="another iteration"))
    # Below the x label: half an inch down, whatever the number of lanes makes the axes' height.
    below = -0.55 * DPI / axes.get_window_extent().height
    axes.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, below),
                ncol=len(legend), fontsize=FONT_SIZE - 1, frameon=False)
    save_figure(figure, path)
