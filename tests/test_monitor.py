"""The monitor: plain lines, the live rich view, and the phase it infers for each stage."""

from __future__ import annotations

import dataclasses
import io

from rich.console import Console

from sm_dist.pipeline.timeline import TimelineEvent
from sm_dist.run.metrics import IterationRecord
from sm_dist.run.monitor import LiveMonitor, PlainMonitor, format_record, stage_phase

SM_RECORD = IterationRecord.from_json({
             "iteration": 3, "train_loss": 1.23456, "train_acc": 0.5, "wall_time": 4.2,
             "predicted_decrease": -0.0123, "inner_steps": [10, 12, 30],
             "local_loss": [-0.001, -0.002, -0.003], "curvature": [None, 0.01, 0.002],
             "actual_decrease_prev": -0.02, "decrease_ratio_prev": 2.0,
             "test_loss": 1.3, "test_acc": 0.61})
FINISHED = dataclasses.replace(SM_RECORD, iteration=2, busy_fraction=[0.5, 0.75, 0.9],
                               bubble_fraction=0.2833)


def test_plain_line() -> None:
    line = format_record(SM_RECORD, 30)
    assert line.startswith("iter  3/30")
    for part in ("loss 1.2346", "acc 0.500", "pred -1.230e-02", "inner 10,12,30",
                 "test_acc 0.610", "4.2s"):
        assert part in line
    armijo = format_record(IterationRecord.from_json(
        {"iteration": 1, "train_loss": 2.0, "train_acc": 0.1, "wall_time": 1.0,
         "step_size": 0.5, "line_search_trials": 3}), 5)
    assert "step 0.5 (3 trials)" in armijo and "pred" not in armijo


def test_plain_monitor_prints_one_line_per_iteration() -> None:
    out = io.StringIO()
    with PlainMonitor(30, out) as monitor:
        monitor.progress(SM_RECORD)
        monitor.record(FINISHED)
    assert out.getvalue().count("\n") == 1 and "iter  3/30" in out.getvalue()


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
    monitor = LiveMonitor("demo", 30, 3, events(), console, refresh_per_second=20)
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
    rejected = dataclasses.replace(SM_RECORD, step_scale=4.25, step_rejected=True)
    assert "scale 4.25 (step rejected)" in format_record(rejected, 30)
    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True)
    with LiveMonitor("demo", 30, 3, events(), console, refresh_per_second=20) as monitor:
        monitor.progress(rejected)
        monitor.progress(dataclasses.replace(rejected, iteration=4, step_rejected=False))
    assert "scale 4.25, 1 rejected" in console.export_text()
