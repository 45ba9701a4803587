"""Plots of finished runs: loss and accuracy curves, and a Gantt chart of one pipeline iteration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The figure and the Agg canvas are used directly rather than through pyplot: no global backend
# to select, no display needed, and no figure registry that keeps figures alive.
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatter, MaxNLocator

from sm_dist.timeline import NAMES, TimelineEvent, iteration_utilisation

if TYPE_CHECKING:  # report.py imports this module: only the type checker may import it back
    from sm_dist.report import RunData

DPI = 120
FONT_SIZE = 10
# Phase colours of the Gantt chart (RGB hex), public so that tests can look for them.
FORWARD_COLOUR = "#4c72b0"  # F, E, T: inputs travelling up
BACKWARD_COLOUR = "#dd8452"  # B: gradients travelling down
UPDATE_COLOUR = "#3a923a"  # L, I, A: the update phase
FILL_COLOUR = "#a6d9a6"  # W: inner steps that fill a bubble, a lighter shade of the update
TANGENT_COLOUR = "#8172b3"  # J, H: CGBlock's tangent passes (second-order, both directions)
IDLE_COLOUR = "#e3e3e3"  # the lane behind the bars: what stays visible is idle time
KIND_COLOURS = {"F": FORWARD_COLOUR, "E": FORWARD_COLOUR, "T": FORWARD_COLOUR,
                "B": BACKWARD_COLOUR, "L": UPDATE_COLOUR, "I": UPDATE_COLOUR, "A": UPDATE_COLOUR,
                "W": FILL_COLOUR, "J": TANGENT_COLOUR, "H": TANGENT_COLOUR, "C": UPDATE_COLOUR}
LANE_HEIGHT = 0.8


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> None:
    figure.savefig(Path(path), dpi=DPI, bbox_inches="tight")


def _runs_title(what: str, runs: Sequence[RunData]) -> str:
    names = [run.name for run in runs]
    shown = ", ".join(names) if len(names) <= 3 else f"{len(names)} runs"
    return f"{what}: {shown}"


def _series(records: Sequence[dict[str, Any]], x_key: str, y_key: str
            ) -> tuple[list[float], list[float]]:
    """The (x, y) pairs of the records having both keys; nulls (non-finite values) are skipped."""
    xs, ys = [], []
    for record in records:
        x, y = record.get(x_key), record.get(y_key)
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


class _PlainLogFormatter(LogFormatter):
    """LogFormatter's choice of which ticks to label, written as plain numbers (0.9, 0.01)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _loss_figure(runs: Sequence[RunData], x_key: str, x_label: str, path: str | Path) -> None:
    figure = _new_figure(7.5, 4.5)
    axes = figure.add_subplot()
    for position, run in enumerate(runs):
        colour = _colour(position)
        xs, ys = _series(run.records, x_key, "train_loss")
        if xs:
            axes.plot(xs, ys, color=colour, linewidth=1.6, label=f"{run.name} (train)")
        xs, ys = _series(run.records, x_key, "test_loss")
        if xs:
            axes.plot(xs, ys, color=colour, linestyle="--", marker="o", markersize=4,
                      linewidth=1.0, label=f"{run.name} (test)")
    axes.set_yscale("log")
    # Plain numbers (0.9, not 9e-01): a short run's losses often span less than a decade, so the
    # labels sit on the minor ticks, which matplotlib only labels when few are in view.
    axes.yaxis.set_major_formatter(_PlainLogFormatter())
    axes.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False,
                                                      minor_thresholds=(2, 0.5)))
    if x_key == "iteration":
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(x_label, fontsize=FONT_SIZE)
    axes.set_ylabel("loss (log scale)", fontsize=FONT_SIZE)
    axes.set_title(_runs_title("Loss", runs), fontsize=FONT_SIZE + 1)
    axes.grid(True, which="major", alpha=0.3)
    axes.grid(True, which="minor", alpha=0.1)
    _legend_or_note(axes)
    _save(figure, path)


def plot_loss(runs: Sequence[RunData], path_iter: str | Path, path_time: str | Path) -> None:
    """Training loss (solid) and test loss (dashed, markers at the evaluations) of every run,
    against the iteration (to `path_iter`) and against wall time in seconds (to `path_time`)."""
    _loss_figure(runs, "iteration", "iteration", path_iter)
    _loss_figure(runs, "wall_time", "wall time (s)", path_time)


def plot_accuracy(runs: Sequence[RunData], path: str | Path) -> None:
    """Training accuracy (line) and test accuracy (markers) of every run against the iteration."""
    figure = _new_figure(7.5, 4.5)
    axes = figure.add_subplot()
    for position, run in enumerate(runs):
        colour = _colour(position)
        xs, ys = _series(run.records, "iteration", "train_acc")
        if xs:
            axes.plot(xs, [100 * y for y in ys], color=colour, linewidth=1.6,
                      label=f"{run.name} (train)")
        xs, ys = _series(run.records, "iteration", "test_acc")
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
    _save(figure, path)


# ------------------------------------------------------------------------------ the timeline
def events_from_trace(trace: dict[str, Any]) -> list[TimelineEvent]:
    """The events of a trace that `sm_dist.timeline.chrome_trace` wrote, times in seconds from the
    trace's first action (the trace keeps no wall-clock origin). Raises ValueError on an action
    that sm-dist does not write."""
    events = []
    for item in trace.get("traceEvents", []):
        if item.get("ph") != "X":  # metadata: the stages' row names
            continue
        name = str(item.get("name", ""))
        kind, number = name[:1], name[1:]
        if kind not in NAMES or not (number == "" or number.isdigit()):
            raise ValueError(f"unknown action {name!r} in the trace (expected e.g. F0, B3, L, W9)")
        args = item.get("args", {})
        start = float(item["ts"]) / 1e6
        events.append(TimelineEvent(stage=int(item["tid"]), iteration=int(args["iteration"]),
                                    kind=kind, index=int(number) if number else None,
                                    start=start, end=start + float(item["dur"]) / 1e6,
                                    detail=str(args.get("detail", ""))))
    return events


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
    if event.kind in ("F", "B", "E", "T"):
        candidates = [event.label, str(event.index)]
    else:  # an update's index is a step budget, not a microbatch: its letter says enough
        candidates = [event.kind]
    return next((text for text in candidates if _text_fits(text, width_px)), "")


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
    own = [e for e in events if e.iteration == iteration]
    if not own:
        raise ValueError(f"no actions of iteration {iteration} in the timeline")
    later = [e.start for e in events if e.iteration > iteration]
    lo = min(e.start for e in own)
    hi = min(later) if later else max(e.end for e in own)
    window_ms = max(hi - lo, 1e-9) * 1e3
    utilisation = iteration_utilisation(events, iteration, num_stages)

    figure = _new_figure(10.0, 1.6 + 0.55 * num_stages)
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
                         facecolors=KIND_COLOURS[event.kind], edgecolors="white",
                         linewidth=0.6, hatch="///" if foreign else None, zorder=2)
        text = _bar_label(event, width * px_per_ms)
        if text:
            dark = event.kind in ("F", "E", "T", "L", "I", "A")
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

    legend = [Patch(facecolor=FORWARD_COLOUR, label="forward (F, E, T)"),
              Patch(facecolor=BACKWARD_COLOUR, label="backward (B)"),
              Patch(facecolor=UPDATE_COLOUR, label="update (L, I, A, C)"),
              Patch(facecolor=FILL_COLOUR, label="fill inner steps (W)"),
              Patch(facecolor=IDLE_COLOUR, label="idle")]
    if any(event.kind in ("J", "H") for event in events):
        legend.insert(3, Patch(facecolor=TANGENT_COLOUR, label="tangent pass (J, H)"))
    if other_iterations:
        legend.append(Patch(facecolor="#999999", edgecolor="white", hatch="///",
                            label="another iteration"))
    # Below the x label: half an inch down, whatever the number of lanes makes the axes' height.
    below = -0.55 * DPI / axes.get_window_extent().height
    axes.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, below),
                ncol=len(legend), fontsize=FONT_SIZE - 1, frameon=False)
    _save(figure, path)
