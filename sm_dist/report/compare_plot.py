"""compare.png: training loss against iteration, pipeline passes and wall time, per depth and N."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from sm_dist.report.compare_tables import DepthGroup, Row, figure_rows, pipeline_passes
from sm_dist.report.plots import (
    FONT_SIZE,
    new_figure,
    plain_log_ticks,
    save_figure,
    series,
)
from sm_dist.run.metrics import IterationRecord

PANEL_WIDTH, ROW_HEIGHT = 5.5, 3.4  # inches
# A diverging run would stretch the log axis over dozens of decades and flatten every other
# curve; the axis stops this many times above the highest starting loss and the run leaves it.
HEADROOM = 3.0


def _finite_losses(row: Row) -> list[float]:
    values = [r.train_loss for r in row.run.records]
    return [y for y in values if isinstance(y, (int, float)) and math.isfinite(y) and y > 0]


def y_limits(rows: Sequence[Row]) -> tuple[float, float] | None:
    """From a little below the lowest finite loss to HEADROOM times the highest first loss."""
    finite = [_finite_losses(row) for row in rows]
    starts = [ys[0] for ys in finite if ys]
    if not starts:
        return None
    top = HEADROOM * max(starts)
    bottom = min(min(ys) for ys in finite if ys)
    return 0.8 * min(bottom, top), top


def _x_of(x_key: str, row: Row, times: dict[Path, dict[int, float]] | None
          ) -> Callable[[IterationRecord], float | None] | None:
    """How a panel reads a record's x: a field, the pipeline passes, or simulated time."""
    if times is not None:
        run_times = times[row.run.path]
        return lambda record: run_times.get(record.iteration)
    return pipeline_passes if x_key == "pipeline_passes" else None


def _panel(axes: Axes, rows: Sequence[Row], x_key: str, colours: dict[str, str],
           times: dict[Path, dict[int, float]] | None = None) -> None:
    limits = y_limits(rows)
    for row in rows:
        xs, ys = series(row.run.records, x_key, "train_loss", _x_of(x_key, row, times))
        if xs:
            few = len(xs) <= 30  # short runs: mark the iterations, or a line hides them
            finite = _finite_losses(row)
            left = limits is not None and (len(finite) < len(row.run.records)
                                           or max(finite, default=0.0) > limits[1])
            axes.plot(xs, ys, color=colours[row.optimizer], linewidth=1.6,
                      label=row.name + (" (leaves the plot)" if left else ""),
                      marker="o" if few else None, markersize=3)
    if limits is not None:
        axes.set_ylim(*limits)
    if not axes.lines:
        axes.text(0.5, 0.5, "no finite values recorded", transform=axes.transAxes,
                  ha="center", va="center", fontsize=FONT_SIZE, color="0.4")
        return
    axes.set_yscale("log")
    plain_log_ticks(axes.yaxis)
    axes.grid(True, which="major", alpha=0.3)
    axes.grid(True, which="minor", alpha=0.1)


def plot_compare(groups: Sequence[DepthGroup], optimizers: Sequence[str], path: str | Path,
                 times: dict[Path, dict[int, float]] | None = None, link: str = "") -> None:
    """Per figure row, the training loss (log scale) against the iteration, the pipeline
    passes, wall time and (with `times`) the simulated pipeline time, one line per optimizer in
    the colour of its place in `optimizers` (the lr-swept ones at their best learning rate);
    the legend right of each row."""
    drawn = figure_rows(groups)
    colours = {name: f"C{i % 10}" for i, name in enumerate(optimizers)}
    panels = 4 if times else 3
    figure = new_figure(panels * PANEL_WIDTH + 2.5, ROW_HEIGHT * len(drawn) + 0.4)
    grid = figure.add_gridspec(len(drawn), panels, hspace=0.55, wspace=0.22)
    for index, (title, rows) in enumerate(drawn):
        by_iteration = figure.add_subplot(grid[index, 0])
        by_passes = figure.add_subplot(grid[index, 1], sharey=by_iteration)
        by_time = figure.add_subplot(grid[index, 2], sharey=by_iteration)
        _panel(by_iteration, rows, "iteration", colours)
        _panel(by_passes, rows, "pipeline_passes", colours)
        _panel(by_time, rows, "wall_time", colours)
        if times:
            by_sim = figure.add_subplot(grid[index, 3], sharey=by_iteration)
            _panel(by_sim, [r for r in rows if r.run.path in times], "simulated", colours,
                   times)
            by_sim.set_xlabel(f"simulated pipeline time (s), one device per stage, {link}",
                              fontsize=FONT_SIZE)
        by_iteration.xaxis.set_major_locator(MaxNLocator(integer=True))
        by_iteration.set_xlabel("iteration", fontsize=FONT_SIZE)
        if by_passes.lines:  # SSO makes ~100x the passes of SM: only a log scale shows both
            by_passes.set_xscale("log")
            plain_log_ticks(by_passes.xaxis, minor_decades=1.5)
        by_passes.set_xlabel("pipeline passes (forward + backward), log scale", fontsize=FONT_SIZE)
        by_time.set_xlabel("wall time (s)", fontsize=FONT_SIZE)
        by_iteration.set_ylabel("training loss (log scale)", fontsize=FONT_SIZE)
        by_iteration.set_title(title, fontsize=FONT_SIZE + 1, loc="left")
        last = figure.axes[-1]
        if last.lines:
            last.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=FONT_SIZE - 1,
                           frameon=False)
    save_figure(figure, path)
