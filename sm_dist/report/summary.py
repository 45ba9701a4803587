"""Reports on finished runs: summaries, tables, plots and summary.json; `sm-dist report`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from sm_dist.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from sm_dist.pipeline.timeline import events_from_trace, slowest_replicas
from sm_dist.report.run_data import ReportError, RunData, load_run, load_runs
from sm_dist.report.stage_figures import memory_text, utilisation_text
from sm_dist.run.metrics import STEADY_FIELDS, IterationRecord, steady_means
from sm_dist.run.run_dir import unique_dir
from sm_dist.whole_files import write_json_whole


def _last(records: Sequence[IterationRecord], key: str) -> tuple[Any, int | None]:
    """The last non-null value of `key` and its iteration."""
    for record in reversed(records):
        if record.value(key) is not None:
            return record.value(key), record.iteration
    return None, None


def _best(records: Sequence[IterationRecord], key: str, lowest: bool
          ) -> tuple[Any, int | None]:
    """The lowest (or highest) non-null value of `key` and its first iteration."""
    found = [r for r in records if r.value(key) is not None]
    if not found:
        return None, None
    pick = min if lowest else max
    record = pick(found, key=lambda r: r.value(key))  # min/max keep the first of equals
    return record.value(key), record.iteration


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
    - `final_full_train_loss`, `final_full_train_acc`, `final_full_train_iteration`,
      `best_full_train_loss`: the whole training set's evaluations (run.eval_train_every)
    - `epochs`: passes over the training set (minibatch runs)
    - `forward_passes`, `backward_passes`: pipeline passes over the batch in all
    - `peak_memory_mb`, `training_memory_mb`: per stage process (engine) or for the one
      process (--single-process), MiB: the peak since training started and what training
      added to the memory held at its start; `memory_kind`: "resident" (a CPU process's
      resident memory) or "cuda_allocated" (CUDA tensors), see pipeline/memory.py
    - `stopped`: why the run stopped before its last iteration (a non-finite loss, a failure
      such as a full disk, a signal; its stop note), or None
    - `replicas`; `slowest_replica`: per stage, the replica that computed longest (trace)
    - means over the steady iterations (`SteadyMeans`: without the first, which includes
      start-up, and the last, which has no next input), as the live monitor shows them:
      `mean_bubble_fraction`, the pipeline's idle share; per stage `mean_busy_fraction`,
      `mean_turnaround_idle`, `mean_update_idle`, the share of the iteration the stage
      computed, was idle between its last forward and first backward, and between its last
      backward and its next forward (these four multi-process runs only); and the optimizer
      section's fields its Metrics average (`means_of`), e.g. `mean_inner_steps`, the inner
      steps each stage took (optimizers with an inner loop)
    """
    records, config = run.records, run.config
    balance = _section(config, "model").get("balance")
    final_loss, _ = _last(records[-1:], "train_loss")
    final_acc, _ = _last(records[-1:], "train_acc")
    best_loss, best_loss_at = _best(records, "train_loss", lowest=True)
    test_loss, test_at = _last(records, "test_loss")
    test_acc, _ = _last(records, "test_acc")
    best_acc, best_acc_at = _best(records, "test_acc", lowest=False)
    full_loss, full_at = _last(records, "full_train_loss")
    full_acc, _ = _last(records, "full_train_acc")
    best_full, _ = _best(records, "full_train_loss", lowest=True)
    section_means = run.metrics.means_of()
    means = steady_means(records, section_means)
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
        "final_full_train_loss": full_loss,
        "final_full_train_acc": full_acc,
        "final_full_train_iteration": full_at,
        "best_full_train_loss": best_full,
        "epochs": last.epoch,
        "forward_passes": last.forward_passes,
        "backward_passes": last.backward_passes,
        "peak_memory_mb": last.peak_memory_mb,
        "training_memory_mb": last.training_memory_mb,
        "memory_kind": last.memory_kind,
        "stopped": run.ended_early,
        "replicas": (replicas := _section(config, "model").get("replicas", 1)),
        "slowest_replica": None if run.trace is None or replicas == 1 else
        slowest_replicas(events_from_trace(run.trace), len(balance)),  # type: ignore[arg-type]
        **{f"mean_{key}": means[key] for key in STEADY_FIELDS + section_means},
    }


# ------------------------------------------------------------------------------ tables
COLUMNS = ("run", "optimizer", "stages", "iterations", "final loss", "best loss",
           "final test acc", "wall time", "passes F/B", "bubble")
LEFT_ALIGNED = ("run", "optimizer")
# The one-row-per-run table's headings on two lines: a row of short figures under one-word
# headings fits in fewer columns.
HEADINGS = {"final loss": "final\nloss", "best loss": "best\nloss",
            "final test acc": "final\ntest acc", "wall time": "wall\ntime",
            "passes F/B": "passes\nF/B"}


def _cells(summary: dict[str, Any]) -> list[str]:
    """One table row as text; a figure the run did not measure is a dash."""
    def number(value: Any, form: str) -> str:
        return "-" if value is None else format(value, form)

    # Minibatch runs that evaluate the whole training set: its loss, not one minibatch's.
    full = summary.get("final_full_train_loss") is not None
    final = summary["final_full_train_loss"] if full else summary["final_train_loss"]
    best = number(summary["best_full_train_loss" if full else "best_train_loss"], ".4g")
    if not full and summary["best_train_loss_iteration"] is not None:
        best += f" @{summary['best_train_loss_iteration']}"
    passes = "-"
    if summary["forward_passes"] is not None:
        passes = f"{summary['forward_passes']}/{summary['backward_passes']}"
    test_acc = summary["final_test_acc"]
    bubble = summary["mean_bubble_fraction"]
    return [str(summary["name"]), str(summary["optimizer"] or "-"),
            number(summary["stages"], "d"), number(summary["iterations"], "d"),
            number(final, ".4g"), best,
            "-" if test_acc is None else f"{100 * test_acc:.1f}%",
            "-" if summary["wall_time"] is None else f"{summary['wall_time']:.1f} s",
            passes, "-" if bubble is None else f"{100 * bubble:.0f}%"]


def _widths(rows: Sequence[Sequence[str]]) -> list[int]:
    """Each column's width: its widest line of any cell (cells may hold several lines)."""
    return [max(cell_len(line) for row in rows for line in row[i].split("\n"))
            for i in range(len(rows[0]))]


def _boxed(widths: list[int]) -> int:
    """A rich table's width for these column widths: a space each side, a rule between."""
    return sum(widths) + 3 * len(widths) + 1


def _plain(widths: list[int]) -> int:
    return sum(widths) + 2 * (len(widths) - 1)


def _transposed(rows: list[list[str]]) -> list[list[str]]:
    """One column per run (headed by its name), one row per figure (headed by its column)."""
    return [["", *(row[0] for row in rows)],
            *([column, *(row[i] for row in rows)] for i, column in enumerate(COLUMNS) if i)]


def _layout(rows: list[list[str]], width: int | None, frame: Callable[[list[int]], int],
            wide: list[str]) -> str:
    """The layout: "wide" (one row per run) when it fits in `width` (or no width is given),
    else "columns" (one column per run) when that fits, else "blocks" (one key-value block per
    run); `frame` gives a layout's width from its column widths. Only the blocks fold, and only
    a name wider than the screen: a figure is never cut."""
    if width is None or frame(_widths([wide, *rows])) <= width:
        return "wide"
    return "columns" if frame(_widths(_transposed(rows))) <= width else "blocks"


def summary_table(runs: Sequence[RunData], width: int | None = None) -> Table:
    """The runs as a rich table that fits in `width` columns (one row per run, one column per
    run, or one key-value block per run; see `_layout`), for a terminal."""
    rows = [_cells(summarize(run)) for run in runs]
    headings = [HEADINGS.get(column, column) for column in COLUMNS]
    layout = _layout(rows, width, _boxed, headings)
    table = Table(title="runs", title_justify="left", show_header=layout != "blocks")
    if layout == "wide":
        for column, heading in zip(COLUMNS, headings):
            table.add_column(heading, justify="left" if column in LEFT_ALIGNED else "right",
                             no_wrap=True)
        for row in rows:
            table.add_row(*row)
    elif layout == "columns":
        transposed = _transposed(rows)
        table.add_column("", no_wrap=True)
        for name in transposed[0][1:]:
            table.add_column(name, justify="right", no_wrap=True)
        for row in transposed[1:]:
            table.add_row(*row)
    else:
        table.add_column("", no_wrap=True, style="bold")
        table.add_column("", overflow="fold")  # only a long name folds: figures are short
        for row in rows:
            for position, (column, cell) in enumerate(zip(COLUMNS, row)):
                table.add_row(column, cell, end_section=position == len(COLUMNS) - 1)
    return table


def _plain_grid(rows: Sequence[Sequence[str]], left: set[int]) -> list[str]:
    """Fixed-width lines with a rule under the first row; the columns in `left` flush left."""
    widths = _widths(rows)

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    return [line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])]


def summary_text(runs: Sequence[RunData], width: int | None = None) -> str:
    """The summary as plain fixed-width text, for logs and pipes, in the layout that fits in
    `width` columns (see `_layout`; with no width, one row per run)."""
    rows = [_cells(summarize(run)) for run in runs]
    layout = _layout(rows, width, _plain, list(COLUMNS))
    if layout == "wide":
        lines = _plain_grid([list(COLUMNS), *rows],
                            {i for i, column in enumerate(COLUMNS) if column in LEFT_ALIGNED})
    elif layout == "columns":
        lines = _plain_grid(_transposed(rows), {0})
    else:
        key = max(len(column) for column in COLUMNS)
        lines = []
        for row in rows:
            lines += ([""] if lines else []) + [f"{column:<{key}}  {cell}"
                                                for column, cell in zip(COLUMNS, row)]
    return "\n".join(lines) + "\n"


def print_summary(runs: Sequence[RunData], console: Console) -> None:
    """The summary in the layout that fits the console: a rich table on a terminal, plain
    text elsewhere (box drawing in a log file or a pipe is noise)."""
    if console.is_terminal:
        console.print(summary_table(runs, console.width))
    else:
        console.print(summary_text(runs, console.width), markup=False, highlight=False,
                      soft_wrap=True, end="")


# ------------------------------------------------------------------------------ the report
def _file_name(name: str) -> str:
    """A run name made safe as part of a file name (a/out -> a_out)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_timeline(run: RunData, path: Path) -> bool:
    """The run's default iteration as a Gantt chart; False when it has no trace to draw."""
    if run.trace is None:
        return False
    from sm_dist.report.plots import default_timeline_iteration, plot_timeline

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
    # matplotlib is imported here, where a figure is drawn: the stage processes that never
    # draw one start 0.4 s sooner each (of about 2 s for torch and the package)
    from sm_dist.report.plots import plot_accuracy, plot_loss

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
    write_json_whole(summary_path, summaries[0] if len(runs) == 1 else summaries, indent=2)
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
    print_summary(runs, console)
    for run in runs:
        if run.ended_early:
            _say(console, f"{run.name} ended early: {run.ended_early}")
    _say(console, f"sm-dist: report in {out_dir}:")
    for path in written:
        _say(console, f"  {path}")
    return EXIT_OK


def _say(console: Console, text: str) -> None:
    """A line as it is: on a terminal wrapped at spaces (a path moves to a line of its own
    rather than breaking), elsewhere one line however long, for logs and greps."""
    console.print(text, markup=False, highlight=False, soft_wrap=not console.is_terminal)


def finish_run(out: Path, console: Console) -> None:
    """After training: summary.json, the plots, and the summary table with the run's path."""
    run = load_run(out)
    write_report([run], out)
    print_summary([run], console)
    summary = summarize(run)
    utilisation = utilisation_text(summary, console.width)
    if utilisation:
        _say(console, utilisation)
    memory = memory_text(summary)
    if memory:
        _say(console, memory)
    if run.ended_early:
        _say(console, f"stopped early: {run.ended_early}")
    _say(console, f"results in {out}")
