"""The monitor: plain lines, the live rich view, the phase it infers for each stage, its header,
its columns per optimizer, and its steady means (the summary's)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import torch
from rich.console import Console

from sm_dist.config.build import build_local_pipeline
from sm_dist.config.job import job_from_dict
from sm_dist.optim.inner_loop import InnerLoopMetrics
from sm_dist.optim.sm_adaptive import AdaptiveMetrics
from sm_dist.optim.steered import LineSearchMetrics
from sm_dist.pipeline.timeline import TimelineEvent
from sm_dist.report.run_data import RunData
from sm_dist.report.summary import summarize
from sm_dist.run.metrics import IterationRecord, steady_means
from sm_dist.run.monitor import (
    PLAIN_LINES,
    LiveMonitor,
    PlainMonitor,
    StageInfo,
    format_record,
    log_interval,
    run_header,
    stage_infos,
    stage_phase,
)
from tests.conftest import run_cli, synthetic_job, write_job

SM_RECORD = IterationRecord.from_json({
             "iteration": 3, "train_loss": 1.23456, "train_acc": 0.5, "wall_time": 4.2,
             "predicted_decrease": -0.0123, "inner_steps": [10, 12, 30],
             "local_loss": [-0.001, -0.002, -0.003], "curvature": [None, 0.01, 0.002],
             "actual_decrease_prev": -0.02, "decrease_ratio_prev": 2.0,
             "test_loss": 1.3, "test_acc": 0.61})
FINISHED = dataclasses.replace(SM_RECORD, iteration=2, busy_fraction=[0.5, 0.75, 0.9],
                               bubble_fraction=0.2833)


def with_section(record: IterationRecord, **fields: object) -> IterationRecord:
    """The record with more fields in its optimizer's section."""
    return dataclasses.replace(record, optimizer={**record.optimizer, **fields})


def test_records_keep_the_section_apart() -> None:
    """The optimizer's fields are the record's section, under `optimizer` in metrics.jsonl."""
    assert SM_RECORD.optimizer["inner_steps"] == [10, 12, 30]
    assert SM_RECORD.to_json()["optimizer"]["local_loss"] == [-0.001, -0.002, -0.003]
    assert "inner_steps" not in SM_RECORD.to_json()
    assert IterationRecord.from_json(SM_RECORD.to_json()) == SM_RECORD


def test_plain_line() -> None:
    line = format_record(SM_RECORD, 30, InnerLoopMetrics)
    assert line.startswith("iter  3/30")
    for part in ("loss 1.2346", "acc 0.500", "pred -1.230e-02", "inner 10,12,30",
                 "test_acc 0.610", "4.2s"):
        assert part in line
    armijo = format_record(IterationRecord.from_json(
        {"iteration": 1, "train_loss": 2.0, "train_acc": 0.1, "wall_time": 1.0,
         "step_size": 0.5, "line_search_trials": 3}), 5, LineSearchMetrics)
    assert "step 0.5 (3 trials)" in armijo and "pred" not in armijo


def test_plain_monitor_prints_one_line_per_iteration_of_a_short_run() -> None:
    out = io.StringIO()
    with PlainMonitor(30, out, InnerLoopMetrics) as monitor:
        monitor.progress(SM_RECORD)
        monitor.record(FINISHED)
    assert out.getvalue().count("\n") == 1 and "iter  3/30" in out.getvalue()


def iterations_printed(iterations: int, every: int = 0, ended_after: int | None = None
                       ) -> list[int]:
    """The iterations whose line a plain monitor prints for a run of `iterations`
    (run.log_every `every`) that finishes, or ends after `ended_after`."""
    out = io.StringIO()
    with PlainMonitor(iterations, out, InnerLoopMetrics, every=every) as monitor:
        for t in range(1, (ended_after or iterations) + 1):
            monitor.progress(dataclasses.replace(SM_RECORD, iteration=t))
    return [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()]


def test_plain_monitor_prints_every_log_every_iterations_and_the_last() -> None:
    """2,000 iterations print 200 lines by default (every 10th; the last is one), at most
    PLAIN_LINES whatever the run's length; run.log_every sets the interval, the last line
    always comes, and a run that ends early prints where it got to."""
    assert log_interval(200) == 1 and log_interval(201) == 2 and log_interval(2000) == 10
    assert iterations_printed(2000) == list(range(10, 2001, 10))
    assert len(iterations_printed(12_345)) <= PLAIN_LINES + 1
    assert iterations_printed(2000)[-1] == 2000 and iterations_printed(12_345)[-1] == 12_345
    assert iterations_printed(23, every=5) == [5, 10, 15, 20, 23]
    assert iterations_printed(100, every=7, ended_after=30) == [7, 14, 21, 28, 30]
    assert iterations_printed(3, every=1) == [1, 2, 3]


def events() -> list[TimelineEvent]:
    """Stage 0 in iteration 1: F 0-1 s, B 2-3 s, update 3-5 s; reported at 5 s."""
    return [TimelineEvent(0, 1, "F", 0, 0.0, 1.0), TimelineEvent(0, 1, "B", 0, 2.0, 3.0),
            TimelineEvent(0, 1, "I", 10, 3.0, 5.0)]


def test_stage_phase_repeats_the_last_reported_iteration() -> None:
    timeline = events()
    # After its report at t = 5 s the stage is taken to start the next iteration at once.
    assert stage_phase(timeline, 0, 5.5) == "forward"
    assert stage_phase(timeline, 0, 6.5) == "idle"
    assert stage_phase(timeline, 0, 7.5) == "backward"
    assert stage_phase(timeline, 0, 8.5) == "update"
    assert stage_phase(timeline, 0, 20.0) == "idle"  # overdue: waiting for input
    assert stage_phase(timeline, 1, 5.5) == "starting"  # nothing reported yet


def test_live_view_renders_into_a_recorded_console() -> None:
    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True)
    monitor = LiveMonitor("demo", 30, 3, events(), console, refresh_per_second=20,
                          metrics=InnerLoopMetrics)
    with monitor:
        monitor.progress(SM_RECORD)
        monitor.record(FINISHED)
    text = console.export_text()
    for part in ("demo", "3/30", "loss 1.2346", "acc 0.500", "test acc 0.610 (iter 3)",
                 "-2.00e-02 / -1.00e-02", "bubble 28%", "inner steps", "curvature sent"):
        assert part in text, part
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    stage_rows = [row for row in rows if row[0] in {"0", "1", "2"} and len(row) >= 6]
    assert [row[0] for row in stage_rows[-3:]] == ["0", "1", "2"]
    assert stage_rows[-1][1:] == ["done", "30", "-3.000e-03", "2.000e-03", "90%"]
    assert stage_rows[-3][4] == "-"  # stage 0 sends no curvature down


def test_the_adaptive_scale_and_rejections_show() -> None:
    rejected = with_section(SM_RECORD, step_scale=4.25, step_rejected=True)
    assert "scale 4.25 (step rejected)" in format_record(rejected, 30, AdaptiveMetrics)
    tried = with_section(rejected, line_search_trials=2, trial_loss=0.5)  # minibatches
    assert "scale 4.25 (2 trials, step rejected)" in format_record(tried, 30, AdaptiveMetrics)
    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True)
    with LiveMonitor("demo", 30, 3, events(), console, refresh_per_second=20,
                     metrics=AdaptiveMetrics) as monitor:
        monitor.progress(rejected)
        monitor.progress(with_section(dataclasses.replace(rejected, iteration=4),
                                      step_rejected=False))
    assert "scale 4.25, 1 rejected" in console.export_text()


# ------------------------------------------------------------------------------ steady means
def utilisation(iteration: int, busy: list[float], inner: list[int],
                update_idle: list[float | None]) -> IterationRecord:
    """A finished record with hand-picked utilisation (binary fractions: sums are exact)."""
    return IterationRecord(iteration, 1.0, 0.5, busy_fraction=busy,
                           bubble_fraction=1 - sum(busy) / len(busy),
                           turnaround_idle=[0.0, 0.0], update_idle=update_idle,
                           optimizer={"inner_steps": inner})


# Iteration 1 includes start-up and iteration 4 is the last (no next input, `min` inner steps):
# the steady iterations are 2 and 3.
HAND_MADE = [utilisation(1, [0.25, 0.5], [10, 10], [0.5, 0.5]),
             utilisation(2, [0.5, 0.75], [10, 50], [0.25, 0.5]),
             utilisation(3, [0.75, 1.0], [10, 71], [0.5, None]),
             utilisation(4, [0.125, 0.25], [10, 10], [0.0, None])]


def test_steady_means_leave_out_the_first_and_the_last_iteration() -> None:
    means = steady_means(HAND_MADE, ("inner_steps",))
    assert means["busy_fraction"] == [0.625, 0.875]
    assert means["bubble_fraction"] == 0.25  # the mean over all four would be 0.484375
    assert means["inner_steps"] == [10.0, 60.5]  # the last iteration's would be 10
    assert means["update_idle"] == [0.375, 0.5]  # nulls left out
    assert means["turnaround_idle"] == [0.0, 0.0]
    # Fewer than three records: there is no steady one, so all of them count.
    assert steady_means(HAND_MADE[:2])["busy_fraction"] == [0.375, 0.625]
    assert steady_means(HAND_MADE[:1], ("inner_steps",))["inner_steps"] == [10.0, 10.0]
    assert steady_means([IterationRecord(1, 1.0)])["bubble_fraction"] is None


def test_the_last_live_frame_shows_the_summary_figures(tmp_path: Path) -> None:
    console = Console(record=True, width=80, file=io.StringIO(), force_terminal=True)
    with LiveMonitor("demo", 4, 2, events(), console, refresh_per_second=20,
                     metrics=InnerLoopMetrics) as monitor:
        for record in HAND_MADE:
            monitor.progress(record)
            monitor.record(record)
    summary = summarize(RunData(tmp_path, "demo", {"optimizer": {"name": "sm"}}, HAND_MADE,
                                None))
    assert monitor.means["busy_fraction"] == summary["mean_busy_fraction"] == [0.625, 0.875]
    assert monitor.means["bubble_fraction"] == summary["mean_bubble_fraction"] == 0.25
    assert monitor.means["inner_steps"] == summary["mean_inner_steps"] == [10.0, 60.5]
    frame = last_frame(console.export_text())
    assert "bubble 25%" in frame
    rows = stage_rows(frame, 2)
    assert rows[0] == ["0", "done", "10", "62%"] and rows[1] == ["1", "done", "60.5", "88%"]
    assert "means over steady iterations" in frame


def last_frame(text: str) -> str:
    """The text of the live view's last frame (each frame starts with the progress bar)."""
    return text[text.rindex("demo"):]


def stage_rows(frame: str, stages: int) -> list[list[str]]:
    rows = [line.split() for line in frame.splitlines() if line.strip()[:1].isdigit()]
    return [row for row in rows if row[0] in {str(s) for s in range(stages)}][-stages:]


# ------------------------------------------------------------------------------ narrow screens
def test_the_live_view_fits_80_columns() -> None:
    console = Console(record=True, width=80, file=io.StringIO(), force_terminal=True)
    with LiveMonitor("demo", 30, 3, events(), console, refresh_per_second=20,
                     metrics=AdaptiveMetrics) as monitor:
        monitor.progress(with_section(SM_RECORD, step_scale=4.25))
        monitor.record(FINISHED)
    frame = last_frame(console.export_text())
    lines = frame.splitlines()
    assert all(len(line.rstrip()) <= 80 for line in lines)
    # Each figure whole on one line: the decrease does not wrap over three lines any more.
    for part in ("decrease actual/predicted -2.00e-02 / -1.00e-02", "test acc 0.610 (iter 3)",
                 "scale 4.25, 0 rejected", "bubble 28%"):
        assert any(part in line for line in lines), part
    assert "…" not in frame


def test_the_header_wraps_at_spaces_and_names_each_stage() -> None:
    path = "/scratch/someone/runs/quickstart-20261129-002231"
    header = (f"sm-dist: quickstart: 4 stage processes on node-a, node-b, sm, 2000 training "
              f"samples -> {path}")
    stages = [StageInfo("cuda:0", 407_050, "node-a"), StageInfo("cuda:1", 262_656, "node-a"),
              StageInfo("cuda:0", 262_656, "node-b"), StageInfo("cpu", 5_130, "node-b")]
    console = Console(record=True, width=80, file=io.StringIO())
    console.print(run_header(header, stages))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert f"-> {path}" in lines  # the run directory whole, on a line of its own
    # Broken at spaces only: the words are the header's, in order, none cut.
    header_lines = lines[:lines.index(f"-> {path}") + 1]
    assert " ".join(header_lines).split() == header.split()
    for part in ("stage 0: node-a cuda:0, 407,050 parameters",
                 "stage 3: node-b cpu, 5,130 parameters"):
        assert any(part in line for line in lines), part
    # One host: no host names in the stage list.
    console = Console(record=True, width=80, file=io.StringIO())
    console.print(run_header("sm-dist: tiny -> out", [StageInfo("cpu", 58), StageInfo("cpu", 30)]))
    assert console.export_text().splitlines() == [
        "sm-dist: tiny -> out", "stage 0: cpu, 58 parameters   stage 1: cpu, 30 parameters"]


def test_stage_infos_of_both_pipelines(tmp_path: Path) -> None:
    job = job_from_dict(synthetic_job())
    local = build_local_pipeline(job, torch.device("cpu"))
    widths = [6, 5, 4, 3]
    assert stage_infos(local) == [StageInfo("cpu", widths[s] * widths[s + 1] + widths[s + 1])
                                  for s in range(3)]

    class Engine:  # what RpcPipeline.stages holds: each stage's answer to `describe`
        stages = {1: {"stage": 1, "host": "b", "device": "cuda:1", "parameters": 7},
                  0: {"stage": 0, "host": "a", "device": "cuda:0", "parameters": 9}}

    assert stage_infos(Engine()) == [StageInfo("cuda:0", 9, "a"), StageInfo("cuda:1", 7, "b")]


# ------------------------------------------------------------------------------ per optimizer
def test_torch_optimizers_show_their_learning_rate_and_no_sm_columns() -> None:
    job = job_from_dict(synthetic_job(optimizer={"name": "adam", "lr": 0.003}))
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    console = Console(record=True, width=80, file=io.StringIO(), force_terminal=True)
    adam = IterationRecord.from_json({"iteration": 1, "train_loss": 1.5, "train_acc": 0.25,
                                      "wall_time": 0.5})
    with LiveMonitor.for_job(job, pipeline, console) as monitor:
        monitor.progress(adam)
        monitor.record(adam)
    frame = console.export_text()
    frame = frame[frame.rindex("tiny"):]
    assert "lr 0.003" in frame and "loss 1.5000" in frame
    for absent in ("inner steps", "local loss", "curvature sent", "predicted"):
        assert absent not in frame, absent
    header = next(line for line in frame.splitlines() if line.startswith("stage"))
    assert header.split() == ["stage", "phase", "busy"]
    # SM's job: no learning rate (its steps come from its local models).
    sm = LiveMonitor.for_job(job_from_dict(synthetic_job()), pipeline, console)
    assert sm.notes == [] and sm.metrics is InnerLoopMetrics


def test_line_searches_show_their_step_and_gradient_norm() -> None:
    console = Console(record=True, width=80, file=io.StringIO(), force_terminal=True)
    armijo = IterationRecord.from_json({"iteration": 1, "train_loss": 1.5, "train_acc": 0.25,
                                        "step_size": 0.5, "line_search_trials": 3,
                                        "grad_norm": 0.0123})
    with LiveMonitor("demo", 5, 2, [], console, refresh_per_second=20,
                     metrics=LineSearchMetrics) as monitor:
        monitor.progress(armijo)
    frame = last_frame(console.export_text())
    assert "step 0.5 (3 trials)" in frame and "grad norm 1.230e-02" in frame
    assert "inner steps" not in frame and "lr " not in frame


def test_no_live_prints_a_line_every_log_every_iterations(tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", synthetic_job(run={"iterations": 10,
                                                               "log_every": 4}))
    result = run_cli("train", str(path), "--single-process", "--no-live", "--out", "run",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("iter ")]
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]
