"""`sm-dist compare`: train (or collect) every run of a grid, then write compare.md and
compare.png."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sm_dist.config.job import JobConfig, dump_job, load_job
from sm_dist.exit_codes import EXIT_OK, EXIT_RUNTIME
from sm_dist.report.compare_plot import plot_compare
from sm_dist.report.compare_tables import compare_markdown, group_results
from sm_dist.report.compare_time import pipeline_times, time_section
from sm_dist.report.grid import (
    CompareError,
    GridPoint,
    RunResult,
    check_list,
    default_at,
    expand_grid,
    given_options,
    grid_lines,
    plan_runs,
    run_path,
    split_overrides,
)
from sm_dist.report.run_data import ReportError, load_run
from sm_dist.report.simulate import SimulateError, parse_link
from sm_dist.report.summary import summarize
from sm_dist.run.run_dir import read_stop_note, unique_dir
from sm_dist.whole_files import write_text_whole

DEFAULT_LINK = "pcie4"  # the link compare's simulated pipeline time assumes
DEFAULT_REACH = (0.5, 0.3, 0.1)  # the losses whose simulated time to reach compare.md gives


def default_compare_dir(job: JobConfig) -> Path:
    """<run.runs_dir>/compare-<name>-<timestamp>, made unique within the second."""
    return unique_dir(Path(job.run.runs_dir), f"compare-{job.name}")


# ------------------------------------------------------------------------------ running
def set_aside(path: Path, out: Path) -> Path:
    """Move a run directory that is to be trained again to <out>/replaced/<label>-<k>/, so
    that nothing already written is lost; returns where it went."""
    target = out / "replaced" / path.name
    k = 1
    while target.exists():
        k += 1
        target = out / "replaced" / f"{path.name}-{k}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(target))
    return target


def train_command(job_file: Path, path: Path, single_process: bool) -> list[str]:
    """`sm-dist train` as a user would type it, with this interpreter."""
    command = [sys.executable, "-m", "sm_dist", "train", str(job_file), "--out", str(path),
               "--no-live"]
    return command + (["--single-process"] if single_process else [])


def _child_env() -> dict[str, str]:
    """This environment, with this sm_dist first on the path (the child runs the same code)."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def train_point(point: GridPoint, out: Path, single_process: bool) -> RunResult:
    """Write the point's job to <out>/jobs/<label>.yaml, train it with `sm-dist train` into
    <out>/runs/<label>/ with its output in <out>/logs/<label>.log, and read the run back."""
    path = run_path(out, point)
    job_file, log = out / "jobs" / f"{point.label}.yaml", out / "logs" / f"{point.label}.log"
    dump_job(point.job, job_file)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = train_command(job_file, path, single_process)
    with open(log, "w", encoding="utf-8") as handle:
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                    env=_child_env(), check=False).returncode
    result = RunResult(point, path, "failed", returncode=returncode, log=log)
    note = read_stop_note(path) if returncode == EXIT_RUNTIME else None
    if note is not None and note.kind == "diverged":
        # It diverged and stopped (run.on_nonfinite: stop): a result, not a failure.
        result.run, result.status = load_run(path), "stopped"
        return result
    if returncode != 0:
        result.reason = f"sm-dist train exited with {returncode}"
        return result
    try:
        result.run, result.status = load_run(path), "trained"
    except ReportError as err:
        result.reason = f"it exited with 0 but its run cannot be read: {err}"
    return result


def _outcome_text(result: RunResult) -> str:
    if result.run is None:
        return f"FAILED: {result.reason}" + (f"; see {result.log}" if result.log else "")
    summary = summarize(result.run)
    loss, acc, wall = (summary["final_train_loss"], summary["final_test_acc"],
                       summary["wall_time"])
    if result.run.stopped:
        return f"{result.status}: diverged at iteration {result.run.records[-1].iteration}"
    text = f"{result.status}: final loss {'non-finite' if loss is None else format(loss, '#.4g')}"
    if acc is not None:
        text += f", test acc {100 * acc:.1f}%"
    return text + ("" if wall is None else f", {wall:.1f} s")


def run_grid(points: Sequence[GridPoint], actions: Sequence[str], out: Path,
             single_process: bool, echo: Callable[..., Any] = print) -> list[RunResult]:
    """Train or collect every point, one after another, echoing one line per run; a run that
    fails is reported and the others go on."""
    results = []
    width = max(len(p.label) for p in points)
    for number, (point, action) in enumerate(zip(points, actions), start=1):
        path = run_path(out, point)
        echo(f"[{number:>{len(str(len(points)))}}/{len(points)}] {point.label:<{width}}  ",
             end="", flush=True)
        if action == "collect":
            try:
                result = RunResult(point, path, "collected", run=load_run(path))
            except ReportError as err:
                result = RunResult(point, path, "failed", reason=f"cannot be read: {err}")
        else:
            if action == "replace":
                echo(f"(earlier run kept in {set_aside(path, out)}) ", end="", flush=True)
            result = train_point(point, out, single_process)
        echo(_outcome_text(result), flush=True)
        results.append(result)
    return results


# ------------------------------------------------------------------------------ the command
def compare_main(job_path: str, overrides: Sequence[str], optimizers: Sequence[str], *,
                 inner_steps: Sequence[int] | None = None, depths: Sequence[int] | None = None,
                 lrs: Sequence[float] | None = None, at: Sequence[int] | None = None,
                 out: Path | None = None, single_process: bool = False, rerun: bool = False,
                 collect_only: bool = False, command_line: Sequence[str] = (),
                 link: str = DEFAULT_LINK, reach: Sequence[float] = DEFAULT_REACH) -> int:
    """`sm-dist compare`: check everything, run or collect the grid, write compare.md and
    compare.png. 0 when every run finished, 1 when some failed (the files cover the others);
    bad input raises ConfigError or CompareError before anything is trained."""
    base_sets, optimizer_sets = split_overrides(overrides)
    base = load_job(job_path, base_sets)
    try:
        parse_link(link)
    except SimulateError as err:
        raise CompareError(str(err)) from None
    notes: list[str] = []
    points = expand_grid(base, optimizers, inner_steps, depths, lrs, notes, optimizer_sets,
                         given_options(job_path, base_sets))
    for note in notes:
        print(f"sm-dist: note: {note}", file=sys.stderr, flush=True)
    iterations = base.run.iterations
    check_list("--at", at)
    if at is not None and not all(1 <= k <= iterations for k in at):
        bad = next(k for k in at if not 1 <= k <= iterations)
        raise CompareError(f"--at {bad}: the runs have iterations 1 to {iterations} "
                           "(run.iterations)")
    at = sorted(at) if at is not None else default_at(iterations)
    if collect_only and out is None:
        raise CompareError("--collect-only needs --out DIR, the directory of an earlier compare")
    out = out if out is not None else default_compare_dir(base)
    if out.exists() and not out.is_dir():
        raise CompareError(f"{out} exists and is not a directory; choose another --out")
    actions = plan_runs(points, out, rerun, collect_only)
    counts = {a: actions.count(a) for a in ("run", "replace", "collect")}
    print(f"sm-dist compare: {len(points)} runs of {job_path} ({counts['run'] + counts['replace']}"
          f" to train, {counts['collect']} to collect) -> {out}", flush=True)
    results = run_grid(points, actions, out, single_process)
    written = write_compare(
        results, out, at=at, job_path=job_path, overrides=overrides,
        grid=grid_lines(base, optimizers, inner_steps, depths, lrs),
        command_line=shlex.join(["sm-dist", *command_line]), link=link, reach=reach)
    print(f"sm-dist: comparison in {out}:")
    for path in written:
        print(f"  {path}")
    failed = [r for r in results if r.run is None]
    if failed:
        print(f"sm-dist: error: {len(failed)} of {len(results)} runs failed (the files cover "
              "the others):", file=sys.stderr)
        for result in failed:
            where = f"; log {result.log}" if result.log is not None else ""
            print(f"  {result.point.label}: {result.reason}{where}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def write_compare(results: Sequence[RunResult], out: Path, *, at: Sequence[int], job_path: str,
                  overrides: Sequence[str], grid: Sequence[str], command_line: str,
                  link: str = DEFAULT_LINK, reach: Sequence[float] = DEFAULT_REACH
                  ) -> list[Path]:
    """compare.md, and compare.png when a run finished, in `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    groups = group_results(results)
    times, schedules, missing = pipeline_times(results, link)
    text = compare_markdown(results, at=at, job_path=job_path, overrides=overrides, grid=grid,
                            command_line=command_line, out=out)
    if times:
        text = text.rstrip("\n") + "\n\n" + "\n".join(
            time_section(groups, times, link, reach, missing, schedules))
    markdown = out / "compare.md"
    write_text_whole(markdown, text)
    written = [markdown]
    if groups:
        order = list(dict.fromkeys(r.point.optimizer for r in results))
        plot_compare(groups, order, out / "compare.png", times, link)
        written.append(out / "compare.png")
    return written

