"""Reports on finished runs: summaries, tables, plots and summary.json; `sm-dist report`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sm_dist.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from sm_dist.pipeline.timeline import events_from_trace
from sm_dist.report.plots import (
    default_timeline_iteration,
    plot_accuracy,
    plot_loss,
    plot_timeline,
)
from sm_dist.report.run_data import ReportError, RunData, load_run, load_runs
from sm_dist.run.metrics import IterationRecord
from sm_dist.run.run_dir import unique_dir


def _last(records: Sequence[IterationRecord], key: str) -> tuple[Any, int | None]:
    """The last non-null value of `key` and its iteration."""
    for record in reversed(records):
        if getattr(record, key) is not None:
            return getattr(record, key), record.iteration
    return None, None


def _best(records: Sequence[IterationRecord], key: str, lowest: bool
          ) -> tuple[Any, int | None]:
    """The lowest (or highest) non-null value of `key` and its first iteration."""
    found = [r for r in records if getattr(r, key) is not None]
    if not found:
        return None, None
    pick = min if lowest else max
    record = pick(found, key=lambda r: getattr(r, key))  # min/max keep the first of equals
    return getattr(record, key), record.iteration


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def summarize(run: RunData) -> dict[str, Any]:
    """Final and best figures of a run, a plain JSON-able dict (training writes it as
    summary.json). Figures a run did not measure are None (null). Keys:

    - `name`: the run's name (its directory's); `job`: the job's `name`; `path`: the directory
    - `optimizer`: optimizer.name; `stages`: pipeline stages; `microbatches`: per batch
    - `iterations`: the last finished iteration; `wall_time`: seconds from start to its end
    - `final_train_loss`, `final_train_acc`: measured by the last iteration's forward pass
      (at the iterate before its update)
    - `best_train_loss`, `best_train_loss_iteration`: the lowest training loss and where
    - `final_test_loss`, `final_test_acc`, `final_test_iteration`: the last evaluation
    - `best_test_acc`, `best_test_acc_iteration`: the highest test accuracy and where
    - `forward_passes`, `backward_passes`: pipeline passes over the batch in all
    - `mean_bubble_fraction`: the pipeline's idle share averaged over iterations (multi-process
      runs only; the first iteration's includes start-up)
    - `stopped`: why the run stopped before its last iteration (a non-finite loss), or None
    - `mean_busy_fraction`, `mean_turnaround_idle`, `mean_update_idle`: per stage, averaged
      over the steady iterations (without the first, which includes start-up, and the last,
      which has no next input): the share of the iteration the stage computed, was idle
      between its last forward and first backward, and between its last backward and its
      next forward (multi-process runs only)
    """
    records, config = run.records, run.config
    balance = _section(config, "model").get("balance")
    final_loss, _ = _last(records[-1:], "train_loss")
    final_acc, _ = _last(records[-1:], "train_acc")
    best_loss, best_loss_at = _best(records, "train_loss", lowest=True)
    test_loss, test_at = _last(records, "test_loss")
    test_acc, _ = _last(records, "test_acc")
    best_acc, best_acc_at = _best(records, "test_acc", lowest=False)
    bubbles = [r.bubble_fraction for r in records if r.bubble_fraction is not None]
    last = records[-1]
    return {
        "name": run.name,
        "job": config.get("name"),
        "path": str(run.path),
        "optimizer": _section(config, "optimizer").get("name"),
        "stages": len(balance) if isinstance(balance, list) else None,
        "microbatches": _section(config, "data").get("microbatches"),
        "iterations": last.iteration,
        "wall_time": last.wall_time,
        "final_train_loss": final_loss,
        "final_train_acc": final_acc,
        "best_train_loss": best_loss,
        "best_train_loss_iteration": best_loss_at,
        "final_test_loss": test_loss,
        "final_test_acc": test_acc,
        "final_test_iteration": test_at,
        "best_test_acc": best_acc,
        "best_test_acc_iteration": best_acc_at,
        "forward_passes": last.forward_passes,
        "backward_passes": last.backward_passes,
        "mean_bubble_fraction": sum(bubbles) / len(bubbles) if bubbles else None,
        "stopped": run.stopped,
        **{f"mean_{key}": _stage_means(records, key)
           for key in ("busy_fraction", "turnaround_idle", "update_idle")},
    }


def _stage_means(records: Sequence[IterationRecord], key: str) -> list[float | None] | None:
    """Per-stage mean of a per-stage list over the steady iterations, None where unmeasured."""
    steady = records[1:-1] if len(records) > 2 else records
    rows = [getattr(r, key) for r in steady if isinstance(getattr(r, key), list)]
    if not rows:
        return None
    columns = [[v for v in column if v is not None] for column in zip(*rows)]
    return [sum(c) / len(c) if c else None for c in columns]


def utilisation_text(summary: dict[str, Any]) -> str | None:
    """The pipeline's busy and idle shares per stage, as printed at the end of a run."""
    busy = summary.get("mean_busy_fraction")
    if not busy:
        return None

    def row(values: list[float | None]) -> str:
        return " ".join("   -" if v is None else f"{v:4.0%}" for v in values)

    lines = [f"pipeline (means over steady iterations; bubble "
             f"{summary['mean_bubble_fraction']:.0%}):",
             f"  stage               {' '.join(f'{s:>4}' for s in range(len(busy)))}",
             f"  busy                {row(busy)}"]
    if summary.get("mean_turnaround_idle"):
        lines.append(f"  idle forward->back  {row(summary['mean_turnaround_idle'])}")
    if summary.get("mean_update_idle"):
        lines.append(f"  idle back->forward  {row(summary['mean_update_idle'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ tables
COLUMNS = ("run", "optimizer", "stages", "iterations", "final loss", "best loss",
           "final test acc", "wall time", "passes F/B", "bubble")
LEFT_ALIGNED = ("run", "optimizer")


def _cells(summary: dict[str, Any]) -> list[str]:
    """One table row as text; a figure the run did not measure is a dash."""
    def number(value: Any, form: str) -> str:
        return "-" if value is None else format(value, form)

    best = number(summary["best_train_loss"], ".4g")
    if summary["best_train_loss_iteration"] is not None:
        best += f" @{summary['best_train_loss_iteration']}"
    passes = "-"
    if summary["forward_passes"] is not None:
        passes = f"{summary['forward_passes']}/{summary['backward_passes']}"
    test_acc = summary["final_test_acc"]
    bubble = summary["mean_bubble_fraction"]
    return [str(summary["name"]), str(summary["optimizer"] or "-"),
            number(summary["stages"], "d"), number(summary["iterations"], "d"),
            number(summary["final_train_loss"], ".4g"), best,
            "-" if test_acc is None else f"{100 * test_acc:.1f}%",
            "-" if summary["wall_time"] is None else f"{summary['wall_time']:.1f} s",
            passes, "-" if bubble is None else f"{100 * bubble:.0f}%"]


def summary_table(runs: Sequence[RunData]) -> Table:
    """One row per run, for a terminal."""
    table = Table(title="runs", title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in LEFT_ALIGNED else "right",
                         no_wrap=column == "run")
    for run in runs:
        table.add_row(*_cells(summarize(run)))
    return table


def summary_text(runs: Sequence[RunData]) -> str:
    """The summary table as plain fixed-width text, for logs and pipes."""
    rows = [list(COLUMNS)] + [_cells(summarize(run)) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(row: list[str]) -> str:
        return "  ".join(cell.ljust(width) if column in LEFT_ALIGNED else cell.rjust(width)
                         for cell, width, column in zip(row, widths, COLUMNS)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])]) + "\n"


# ------------------------------------------------------------------------------ the report
def _file_name(name: str) -> str:
    """A run name made safe as part of a file name (a/out -> a_out)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_timeline(run: RunData, path: Path) -> bool:
    """The run's default iteration as a Gantt chart; False when it has no trace to draw."""
    if run.trace is None:
        return False
    events = events_from_trace(run.trace)
    iteration = default_timeline_iteration(events)
    if iteration is None:
        return False
    summary = summarize(run)
    num_stages = max([summary["stages"] or 0] + [e.stage + 1 for e in events])
    title = (f"{run.name}: iteration {iteration} of {summary['iterations']} "
             f"({summary['optimizer']}, {num_stages} stages)")
    plot_timeline(events, iteration, num_stages, path, title)
    return True


def write_report(runs: Sequence[RunData], out_dir: str | Path) -> list[Path]:
    """Plots and summary.json of `runs` in `out_dir` (created if needed); the paths written.

    loss_vs_iteration.png, loss_vs_time.png and accuracy.png hold every run; each run with a
    trace gets timeline.png (timeline-<run name>.png when there are several runs); summary.json
    is `summarize` of the run, or a list of them."""
    if not runs:
        raise ValueError("write_report needs at least one run")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "loss_vs_iteration.png", out_dir / "loss_vs_time.png"]
    plot_loss(runs, written[0], written[1])
    written.append(out_dir / "accuracy.png")
    plot_accuracy(runs, written[-1])
    for run in runs:
        name = "timeline.png" if len(runs) == 1 else f"timeline-{_file_name(run.name)}.png"
        if _write_timeline(run, out_dir / name):
            written.append(out_dir / name)
    summaries = [summarize(run) for run in runs]
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summaries[0] if len(runs) == 1 else summaries, indent=2)
                            + "\n", encoding="utf-8")
    written.append(summary_path)
    return written


def default_report_dir(runs: Sequence[RunData]) -> Path:
    """One run: its own directory. Several: report-<timestamp>/ in their common parent."""
    if len(runs) == 1:
        return runs[0].path
    return unique_dir(Path(os.path.commonpath([run.path.resolve().parent for run in runs])),
                      "report")


def report_main(run_dirs: Sequence[str], out: str | None = None,
                console: Console | None = None) -> int:
    """`sm-dist report RUN_DIR... [--out DIR]`: writes the report, prints the summary and the
    files written. Exit code 0, or 2 (with a message on stderr) for a bad directory."""
    console = console if console is not None else Console()
    if not run_dirs:
        print("sm-dist: error: give at least one run directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        runs = load_runs(run_dirs)
    except ReportError as err:
        print(f"sm-dist: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out_dir = Path(out) if out is not None else default_report_dir(runs)
    try:
        written = write_report(runs, out_dir)
    except OSError as err:
        print(f"sm-dist: error: cannot write the report to {out_dir}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if console.is_terminal:
        console.print(summary_table(runs))
    else:  # box drawing in a log file or a pipe is noise: the plain table reads the same
        console.print(summary_text(runs), markup=False, highlight=False, soft_wrap=True, end="")
    console.print(f"sm-dist: report in {out_dir}:", markup=False, highlight=False)
    for path in written:
        console.print(f"  {path}", markup=False, highlight=False, soft_wrap=True)
    return EXIT_OK


def finish_run(out: Path, console: Console) -> None:
    """After training: summary.json, the plots, and the summary table with the run's path."""
    run = load_run(out)
    write_report([run], out)
    if console.is_terminal:
        console.print(summary_table([run]))
    else:
        print(summary_text([run]))
    utilisation = utilisation_text(summarize(run))
    if utilisation:
        print(utilisation)
    if run.stopped:
        console.print(f"stopped early: {run.stopped}", highlight=False, soft_wrap=True)
    console.print(f"results in {out}", highlight=False, soft_wrap=True)
