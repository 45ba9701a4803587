"""Reports: plots and summaries of real run directories, the timeline chart, and bad input."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axis import Axis
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import imread
from rich.console import Console

from sm_dist.pipeline.actions import (
    BACKWARD_COLOUR,
    FILL_COLOUR,
    FORWARD_COLOUR,
    IDLE_COLOUR,
    UNKNOWN_COLOUR,
    UPDATE_COLOUR,
)
from sm_dist.pipeline.timeline import (
    TimelineEvent,
    chrome_trace,
    events_from_trace,
    iteration_utilisation,
)
from sm_dist.report import compare_plot, plots
from sm_dist.report.compare_tables import DepthGroup, Row
from sm_dist.report.plots import (
    _bar_label,
    default_timeline_iteration,
    plot_timeline,
)
from sm_dist.report.run_data import ReportError, RunData, load_run, load_runs
from sm_dist.report.stage_figures import utilisation_text
from sm_dist.report.summary import (
    report_main,
    summarize,
    summary_table,
    summary_text,
    write_report,
)
from sm_dist.run.metrics import IterationRecord
from tests.conftest import metric_rows, run_cli, run_here, synthetic_job, write_job

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ITERATIONS = 4


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished runs of the same tiny job, trained for real: one process per stage (with a
    trace) and --single-process (without). Made once: the first takes seconds."""
    root = tmp_path_factory.mktemp("runs")
    job = write_job(root / "job.yaml", synthetic_job(
        optimizer={"name": "sm", "inner_steps": {"min": 2, "max": 20, "fill_bubbles": True}},
        run={"iterations": ITERATIONS, "eval_every": 2, "threads": 1, "rpc_timeout": 60}))
    dirs = {"pipeline": root / "pipeline", "single": root / "single"}
    for kind, extra in (("pipeline", []), ("single", ["--single-process"])):
        runner = run_here if extra else run_cli  # the single-process one in this process
        result = runner("train", str(job), "--no-live", *extra, "--out", str(dirs[kind]),
                        cwd=root)
        assert result.returncode == 0, result.stderr
    return dirs


def raw_records(run_dir: Path) -> list[dict]:
    return metric_rows(run_dir)


def assert_png(path: Path, min_pixels: int = 200) -> np.ndarray:
    """The image at `path`, checked to be a real PNG of a readable size."""
    assert path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.shape[0] >= min_pixels and image.shape[1] >= min_pixels, (path, image.shape)
    return image


def colour_pixels(image: np.ndarray, colour: str, tolerance: float = 2 / 255) -> int:
    """How many pixels of an RGB(A) image in [0, 1] have `colour`."""
    return int(np.all(np.abs(image[..., :3] - np.array(to_rgb(colour))) <= tolerance,
                      axis=-1).sum())


# ------------------------------------------------------------------------------ real runs
def test_one_run_report_writes_every_file(run_dirs: dict[str, Path], tmp_path: Path) -> None:
    run = load_run(run_dirs["pipeline"])
    assert run.trace is not None and len(run.records) == ITERATIONS
    written = write_report([run], tmp_path / "report")
    names = ["loss_vs_iteration.png", "loss_vs_time.png", "accuracy.png", "timeline.png",
             "summary.json"]
    assert [p.name for p in written] == names
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(names)
    for path in written[:-1]:
        assert_png(path)
    assert json.loads(written[-1].read_text()) == summarize(run)


def test_summary_equals_the_figures_of_metrics_jsonl(run_dirs: dict[str, Path]) -> None:
    for kind in ("pipeline", "single"):
        records = raw_records(run_dirs[kind])
        summary = summarize(load_run(run_dirs[kind]))
        json.dumps(summary, allow_nan=False)  # plain JSON, as summary.json
        losses = [r["train_loss"] for r in records]
        evaluated = [r for r in records if "test_acc" in r]
        assert summary["name"] == kind and summary["job"] == "tiny"
        assert summary["optimizer"] == "sm" and summary["stages"] == 3
        assert summary["iterations"] == ITERATIONS
        assert summary["final_train_loss"] == losses[-1]
        assert summary["best_train_loss"] == min(losses)
        assert summary["best_train_loss_iteration"] == records[losses.index(min(losses))][
            "iteration"]
        assert summary["final_train_acc"] == records[-1]["train_acc"]
        assert summary["final_test_acc"] == evaluated[-1]["test_acc"]
        assert summary["final_test_iteration"] == ITERATIONS
        assert summary["best_test_acc"] == max(r["test_acc"] for r in evaluated)
        assert summary["forward_passes"] == records[-1]["forward_passes"] == ITERATIONS
        assert summary["backward_passes"] == records[-1]["backward_passes"] == ITERATIONS
        assert summary["wall_time"] == records[-1]["wall_time"]
        steady = records[1:-1]  # without the first (start-up) and the last (no next input)
        steps = [sum(r["inner_steps"][s] for r in steady) / len(steady) for s in range(3)]
        assert summary["mean_inner_steps"] == pytest.approx(steps)
        if kind == "pipeline":
            bubbles = [r["bubble_fraction"] for r in steady]
            assert summary["mean_bubble_fraction"] == pytest.approx(sum(bubbles) / len(bubbles))
            busy = [sum(r["busy_fraction"][s] for r in steady) / len(steady) for s in range(3)]
            assert summary["mean_busy_fraction"] == pytest.approx(busy)
        else:
            assert summary["mean_bubble_fraction"] is None


def test_two_run_report_draws_both(run_dirs: dict[str, Path], tmp_path: Path) -> None:
    runs = load_runs([run_dirs["pipeline"], run_dirs["single"]])
    written = write_report(runs, tmp_path)
    # Only the multi-process run has a trace, so only it has a timeline.
    assert sorted(p.name for p in written) == sorted(
        ["loss_vs_iteration.png", "loss_vs_time.png", "accuracy.png", "timeline-pipeline.png",
         "summary.json"])
    summaries = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summaries] == ["pipeline", "single"]
    for name in ("loss_vs_iteration.png", "loss_vs_time.png", "accuracy.png"):
        image = assert_png(tmp_path / name)
        # One colour per run: matplotlib's first two cycle colours both drawn.
        assert colour_pixels(image, "C0") > 20 and colour_pixels(image, "C1") > 20, name
    text = summary_text(runs)
    assert "pipeline" in text and "single" in text and len(text.splitlines()) == 4
    assert summary_table(runs).row_count == 2


def test_report_main_writes_into_the_run_directory(run_dirs: dict[str, Path],
                                                   tmp_path: Path) -> None:
    run_dir = shutil.copytree(run_dirs["pipeline"], tmp_path / "run")
    printed = io.StringIO()
    assert report_main([str(run_dir)], None, Console(file=printed, width=200)) == 0
    assert (run_dir / "timeline.png").is_file() and (run_dir / "summary.json").is_file()
    output = printed.getvalue()
    assert "final loss" in output and "run" in output  # the plain table: not a terminal
    assert str(run_dir / "timeline.png") in output


def test_same_directory_names_are_told_apart(run_dirs: dict[str, Path], tmp_path: Path) -> None:
    first = shutil.copytree(run_dirs["single"], tmp_path / "a" / "out")
    second = shutil.copytree(run_dirs["single"], tmp_path / "b" / "out")
    assert [run.name for run in load_runs([first, second])] == ["a/out", "b/out"]
    written = write_report(load_runs([first, second]), tmp_path / "report")
    assert len(written) == 4  # no traces: three plots and summary.json


def test_events_from_trace_reads_back_a_real_trace(run_dirs: dict[str, Path]) -> None:
    trace = json.loads((run_dirs["pipeline"] / "trace.json").read_text())
    events = events_from_trace(trace)
    assert {e.iteration for e in events} == set(range(1, ITERATIONS + 1))
    assert {e.stage for e in events} == {0, 1, 2}
    again = chrome_trace(events)
    actions = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in again["traceEvents"] if e["ph"] == "X"] == [
        e["name"] for e in actions]
    assert [e["ts"] for e in again["traceEvents"] if e["ph"] == "X"] == pytest.approx(
        [e["ts"] for e in actions], abs=1e-3)
    assert default_timeline_iteration(events) == ITERATIONS - 1


# ------------------------------------------------------------------------------ unit checks
def test_events_from_trace_inverts_chrome_trace() -> None:
    origin = 1_700_000_000.25  # epoch seconds: the trace keeps times from its first action
    events = [TimelineEvent(0, 1, "F", 0, origin, origin + 0.002),
              TimelineEvent(1, 1, "B", 3, origin + 0.003, origin + 0.0045),
              TimelineEvent(1, 1, "L", None, origin + 0.005, origin + 0.0051),
              TimelineEvent(1, 1, "W", 9, origin + 0.0051, origin + 0.009, "4 steps"),
              TimelineEvent(2, 2, "E", 0, origin + 0.01, origin + 0.011)]
    back = events_from_trace(chrome_trace(events, {0: "node-a"}))
    assert len(back) == len(events)
    for got, want in zip(back, events):
        assert (got.stage, got.iteration, got.kind, got.index, got.detail) == (
            want.stage, want.iteration, want.kind, want.index, want.detail)
        assert got.start == pytest.approx(want.start - origin, abs=1e-9)
        assert got.end == pytest.approx(want.end - origin, abs=1e-9)
    with pytest.raises(ValueError, match="7Q"):
        events_from_trace({"traceEvents": [{"name": "7Q", "ph": "X", "tid": 0, "ts": 0,
                                            "dur": 1, "args": {"iteration": 1}}]})
    # A letter no loaded optimizer registers (a plugin's) is a kind of its own, drawn in grey.
    (other,) = events_from_trace({"traceEvents": [{"name": "Z7", "ph": "X", "tid": 0, "ts": 0,
                                                   "dur": 1, "args": {"iteration": 1}}]})
    assert (other.kind.letter, other.index, other.kind.colour) == ("Z", 7, UNKNOWN_COLOUR)


def test_default_timeline_iteration() -> None:
    def at(iteration: int) -> TimelineEvent:
        return TimelineEvent(0, iteration, "F", 0, iteration, iteration + 0.5)

    assert default_timeline_iteration([at(1), at(2), at(3), at(4)]) == 3
    assert default_timeline_iteration([at(5)]) == 5
    assert default_timeline_iteration([]) is None


def test_a_directory_without_metrics_is_refused_by_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(ReportError, match="has no metrics.jsonl: is it a run directory") as err:
        load_run(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "missing")
    assert report_main([str(empty)], None, Console(file=io.StringIO())) == 2
    assert str(empty) in capsys.readouterr().err
    assert not any(empty.iterdir())  # nothing written


def test_a_cut_short_metrics_line_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("name: cut\noptimizer: {name: adam}\n")
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "train_loss": 2.0}\n{"iterat')
    run = load_run(tmp_path)
    assert len(run.records) == 1 and summarize(run)["optimizer"] == "adam"
    (tmp_path / "metrics.jsonl").write_text('{"iterat\n{"iteration": 1, "train_loss": 2.0}\n')
    with pytest.raises(ReportError, match="line 1 is not JSON"):
        load_run(tmp_path)


def two_stage_events() -> list[TimelineEvent]:
    """A hand-made GPipe iteration, in ms: stage 0 idles from 2 to 5 (turnaround), stage 1 from
    0 to 1 (fill); stage 1 fills its update bubble with W until iteration 2 starts at 12."""
    ms = 1e-3
    layout = [(0, "F", 0, 0, 1), (0, "F", 1, 1, 2), (0, "B", 1, 5, 7), (0, "B", 0, 7, 9),
              (0, "L", None, 9, 9.5), (0, "I", 5, 9.5, 11.5), (0, "A", None, 11.5, 12),
              (1, "F", 0, 1, 2), (1, "F", 1, 2, 3), (1, "B", 1, 3, 5), (1, "B", 0, 5, 7),
              (1, "L", None, 7, 7.5), (1, "I", 5, 7.5, 9), (1, "W", 20, 9, 13),
              (1, "A", None, 13, 13.2)]
    events = [TimelineEvent(s, 1, kind, j, a * ms, b * ms) for s, kind, j, a, b in layout]
    return events + [TimelineEvent(0, 2, "F", 0, 12 * ms, 13 * ms)]


def test_plot_timeline_draws_every_phase(tmp_path: Path) -> None:
    events = two_stage_events()
    path = tmp_path / "timeline.png"
    plot_timeline(events, 1, 2, path, "hand-made")
    image = assert_png(path)
    for colour in (FORWARD_COLOUR, BACKWARD_COLOUR, UPDATE_COLOUR, FILL_COLOUR, IDLE_COLOUR):
        assert colour_pixels(image, colour) > 100, colour
    # Stage 1's forward row is one lane below stage 0's: the forward colour is in both halves.
    forward = np.all(np.abs(image[..., :3] - np.array(to_rgb(FORWARD_COLOUR))) <= 2 / 255,
                     axis=-1)
    rows = np.nonzero(forward.any(axis=1))[0]
    assert rows.max() - rows.min() > image.shape[0] / 5
    utilisation = iteration_utilisation(events, 1, 2)
    assert utilisation is not None and utilisation.bubble_fraction == pytest.approx(4 / 24)


def test_plot_timeline_takes_a_trace_dict(tmp_path: Path) -> None:
    path = tmp_path / "from-trace.png"
    plot_timeline(chrome_trace(two_stage_events()), 1, 2, path, "from a trace")
    assert_png(path)
    with pytest.raises(ValueError, match="iteration 7"):
        plot_timeline(two_stage_events(), 7, 2, tmp_path / "none.png", "none")


def test_empty_run_data_plots_without_error(tmp_path: Path) -> None:
    # A run whose losses were all non-finite (written as null) still gets its plots.
    run = RunData(tmp_path, "diverged", {}, [IterationRecord.from_json(
        {"iteration": 1, "train_loss": None, "train_acc": None, "wall_time": 0.1})], None)
    written = write_report([run], tmp_path / "out")
    assert len(written) == 4 and summarize(run)["best_train_loss"] is None


# ------------------------------------------------------------------------------ readable plots
def captured_figures(monkeypatch: pytest.MonkeyPatch, module: object) -> list[Figure]:
    """The figures `module` saves from now on, drawn (so that their tick labels are set)."""
    figures: list[Figure] = []

    def keep(figure: Figure, path: str | Path) -> None:
        figure.canvas.draw()
        figures.append(figure)

    monkeypatch.setattr(module, "save_figure", keep)
    return figures


def tick_labels(axis: Axis) -> list[str]:
    return [t.get_text() for t in axis.get_majorticklabels() + axis.get_minorticklabels()
            if t.get_text()]


def short_forward_events() -> list[TimelineEvent]:
    """One stage: a 5 µs forward, then 40 ms of backward and update."""
    ms = 1e-3
    return [TimelineEvent(0, 1, "F", 0, 0.0, 0.005 * ms), TimelineEvent(0, 1, "B", 0, 1 * ms,
                                                                         20 * ms),
            TimelineEvent(0, 1, "L", None, 20 * ms, 21 * ms),
            TimelineEvent(0, 1, "I", 5, 21 * ms, 40 * ms, "5 steps"),
            TimelineEvent(0, 1, "A", None, 40 * ms, 40.01 * ms)]


def test_a_short_action_is_still_drawn(tmp_path: Path) -> None:
    path = tmp_path / "short.png"
    plot_timeline(short_forward_events(), 1, 1, path, "short")
    # 5 µs of 40 ms is a tenth of a pixel: drawn at the minimum width, it shows.
    assert colour_pixels(assert_png(path, min_pixels=100), FORWARD_COLOUR) > 20


def test_bar_labels_are_whole_or_absent() -> None:
    forward = TimelineEvent(0, 1, "F", 12, 0.0, 1.0)
    fill = TimelineEvent(0, 1, "W", 40, 0.0, 1.0, "37 steps")
    assert _bar_label(forward, 200) == "F12"
    assert _bar_label(forward, 12) == ""  # no bare "12" any more
    assert _bar_label(fill, 400) == "W 37 steps" and _bar_label(fill, 20) == "W"
    assert _bar_label(fill, 3) == ""


def test_the_legend_names_every_action_drawn(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    figures = captured_figures(monkeypatch, plots)
    plot_timeline(two_stage_events(), 1, 2, tmp_path / "t.png", "hand-made")
    (legend,) = [axes.get_legend() for axes in figures[0].axes if axes.get_legend()]
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == ["F forward", "B backward", "A apply update, L build local loss, "
                      "I inner steps", "W fill inner steps", "idle"]


def test_log_axes_have_plain_tick_labels(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    figures = captured_figures(monkeypatch, plots)
    # Losses within one decade (1.6 to 2.4): the labels are on minor ticks.
    records = [IterationRecord(k, loss, 0.5, wall_time=0.1 * k)
               for k, loss in enumerate([2.4, 2.1, 1.9, 1.6], start=1)]
    plots.plot_loss([RunData(tmp_path, "r", {}, records, None)], tmp_path / "a.png",
                    tmp_path / "b.png")
    for figure in figures:
        labels = tick_labels(figure.axes[0].yaxis)
        assert "2" in labels and not any("10^" in label or "times" in label
                                         for label in labels), labels
    # compare.png: its pipeline-passes axis is a log scale too (2 to 8 passes here).
    figures = captured_figures(monkeypatch, compare_plot)
    for k, record in enumerate(records, start=1):
        record.forward_passes = record.backward_passes = k
    row = Row("sm (N=3)", "sm", 3, RunData(tmp_path, "r", {}, records, None))
    compare_plot.plot_compare([DepthGroup(None, "tiny", [], [row])], ["sm"], tmp_path / "c.png")
    for axes in figures[0].axes:
        for axis in (axes.xaxis, axes.yaxis):
            labels = tick_labels(axis)
            assert not any("10^" in label or "times" in label for label in labels), labels
    assert "2" in tick_labels(figures[0].axes[1].xaxis)


def test_log_tick_labels_never_run_together(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """A passes axis over three decades (2 to 700, as a 60-iteration GD+Armijo run makes)
    once printed 200, 300, 400 and 600 on top of one another: no two labels may overlap."""
    figures = captured_figures(monkeypatch, compare_plot)
    passes = [2, 5, 20, 60, 150, 300, 700]
    records = [IterationRecord(k, 2.0 / k, 0.5, wall_time=0.1 * k)
               for k in range(1, len(passes) + 1)]
    for record, count in zip(records, passes, strict=True):
        record.forward_passes = record.backward_passes = count / 2
    row = Row("gd_armijo", "gd_armijo", None, RunData(tmp_path, "r", {}, records, None))
    compare_plot.plot_compare([DepthGroup(None, "tiny", [], [row])], ["gd_armijo"],
                              tmp_path / "c.png")
    figure = figures[0]
    renderer = figure.canvas.get_renderer()
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            shown = [t for t in axis.get_majorticklabels() + axis.get_minorticklabels()
                     if t.get_text() and t.get_visible()]
            boxes = [t.get_window_extent(renderer) for t in shown]
            inside = [(b, t.get_text()) for b, t in zip(boxes, shown, strict=True)
                      if axes.get_window_extent(renderer).x0 - 5 <= b.x0
                      and b.x1 <= axes.get_window_extent(renderer).x1 + 5]
            for i, (a, text_a) in enumerate(inside):
                for b, text_b in inside[i + 1:]:
                    assert not a.overlaps(b), (text_a, text_b)
    assert {"10", "100"} <= set(tick_labels(figure.axes[1].xaxis))


def test_utilisation_text_fits_the_width() -> None:
    busy = [0.5] * 16
    summary = {"mean_busy_fraction": busy, "mean_bubble_fraction": 0.5,
               "mean_turnaround_idle": [0.25] * 16, "mean_update_idle": [None] + [0.25] * 15}
    text = utilisation_text(summary, 80)
    assert text is not None and all(len(line) <= 80 for line in text.splitlines())
    stage_lines = [line.split()[1:] for line in text.splitlines() if line.startswith("  stage")]
    assert len(stage_lines) == 2 and sum(stage_lines, []) == [str(s) for s in range(16)]
    assert utilisation_text(summary).count("\n") == 4  # no width: one block of four rows
