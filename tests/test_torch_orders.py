"""`sm-dist simulate --schedule`: the device orders are torch.distributed.pipelining's own, each
schedule's bubble on equal costs is the one it is known for, and on real runs the command
refuses what an optimizer or a run cannot do and reports the rest."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch.distributed.pipelining import schedules
from torch.distributed.pipelining.stage import PipelineStage

from sm_dist.cli import main
from sm_dist.pipeline.actions import (
    APPLY,
    BACKWARD,
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    Action,
    ActionKind,
)
from sm_dist.pipeline.schedule import Pass, gpipe_schedule
from sm_dist.pipeline.simulator import LINKS, simulate
from sm_dist.pipeline.torch_orders import SCHEDULES, placement, rescheduled, torch_order
from sm_dist.report.run_data import load_run
from sm_dist.report.simulate import (
    MeasuredCosts,
    Replay,
    Simulation,
    replay_cost,
    simulate_run,
)
from tests.conftest import metric_rows, synthetic_job, write_job

# The torch class of each schedule and its virtual stages per device, written out here (not
# read from torch_orders) so that a wrong class or chunk count there fails.
TORCH_CLASSES: dict[str, tuple[type, int]] = {
    "gpipe": (schedules.ScheduleGPipe, 1),
    "1f1b": (schedules.Schedule1F1B, 1),
    "interleaved": (schedules.ScheduleInterleaved1F1B, 2),
    "zb": (schedules.ScheduleInterleavedZeroBubble, 1),
    "zbv": (schedules.ScheduleZBVZeroBubble, 2),
}
KIND_OF = {schedules._ComputationType.FORWARD: FORWARD,
           schedules._ComputationType.FULL_BACKWARD: BACKWARD,
           schedules._ComputationType.BACKWARD_INPUT: BACKWARD_INPUT,
           schedules._ComputationType.BACKWARD_WEIGHT: BACKWARD_WEIGHT}
SHAPES = [(2, 4), (3, 5), (4, 4), (4, 8)]  # (devices, microbatches)


def torch_rows(name: str, devices: int, microbatches: int) -> list[list[Any]]:
    """Each device's compute actions in the `pipeline_order` of the torch class, built on a
    mocked stage (no process group) as torch's own schedule visualiser builds it."""
    cls, chunks = TORCH_CLASSES[name]
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = 0, devices, None
    stage.num_stages = devices * chunks
    single = issubclass(cls, schedules.PipelineScheduleSingle)
    built = cls(stage if single else [stage] * chunks, microbatches)
    return [[a for a in built.pipeline_order[d] if a is not None and a.computation_type in KIND_OF]
            for d in range(devices)]


@pytest.mark.parametrize("devices,microbatches", SHAPES)
@pytest.mark.parametrize("name", list(TORCH_CLASSES))
def test_orders_are_torchs_pipeline_order(name: str, devices: int, microbatches: int) -> None:
    """torch_order(name) is, device by device, the torch class's compute actions in its order:
    the same kinds (I, W as D, P), the same virtual stage (the device's c-th as chunk c), the
    same microbatch, except where torch numbers a kind's microbatches other than 0..M−1 (1F1B's
    last device in torch 2.14: F1..FM), which are renumbered in the order they come."""
    rows = torch_rows(name, devices, microbatches)
    ours = torch_order(name, devices, microbatches)
    assert len(ours) == devices
    on_device = {a.stage_index: d for d, row in enumerate(rows) for a in row}
    assert tuple(on_device[v] for v in range(len(on_device))) == placement(name, devices)
    for d, (theirs, mine) in enumerate(zip(rows, ours, strict=True)):
        stages = sorted({a.stage_index for a in theirs})
        assert [(KIND_OF[a.computation_type], stages.index(a.stage_index)) for a in theirs] == \
            [(a.kind, a.chunk) for a in mine], d
        groups: dict[tuple[ActionKind, int], list[tuple[int, int]]] = {}
        for a, b in zip(theirs, mine, strict=True):
            groups.setdefault((b.kind, b.chunk), []).append((a.microbatch_index, b.index))
        for key, pairs in groups.items():
            raw = [t for t, _ in pairs]
            if sorted(raw) == list(range(microbatches)):
                assert [o for _, o in pairs] == raw, (d, key)
            else:  # torch's numbers in order, shifted: ours are 0..M−1 in the same order
                assert raw == list(range(raw[0], raw[0] + microbatches)), (d, key, raw)
                assert [o for _, o in pairs] == list(range(microbatches)), (d, key)


@pytest.mark.parametrize("devices,microbatches", SHAPES)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_microbatch_once_per_chunk(name: str, devices: int, microbatches: int) -> None:
    """Each device runs, on each of its virtual stages, F and B (zero bubble: F, D and P) of
    every microbatch exactly once, and nothing else; a microbatch's backward after its
    forward, its weight gradient after its input gradient."""
    chunks = SCHEDULES[name].chunks
    split = name in ("zb", "zbv")
    kinds = (FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT) if split else (FORWARD, BACKWARD)
    expected = Counter((k, j, c) for k in kinds for j in range(microbatches)
                       for c in range(chunks))
    for lane in torch_order(name, devices, microbatches):
        assert Counter((a.kind, a.index, a.chunk) for a in lane) == expected
        where = {(a.kind, a.index, a.chunk): i for i, a in enumerate(lane)}
        for j in range(microbatches):
            for c in range(chunks):
                first_backward = BACKWARD_INPUT if split else BACKWARD
                assert where[(FORWARD, j, c)] < where[(first_backward, j, c)]
                if split:
                    assert where[(BACKWARD_INPUT, j, c)] < where[(BACKWARD_WEIGHT, j, c)]


def test_a_pass_is_rescheduled_with_its_update_after_and_its_evaluation_apart() -> None:
    """rescheduled(): the GPipe pass the engine sent becomes torch's order, then each stage's
    own update actions (A), and its evaluation chunks a pass of their own."""
    sent = gpipe_schedule(3, 4, lambda s: [Action(APPLY)], eval_chunks=2)
    ordered, evals = rescheduled(sent, "zbv")
    assert [lane[:-1] for lane in ordered] == torch_order("zbv", 3, 4)
    assert all(lane[-1] == Action(APPLY) for lane in ordered)
    assert evals == [[Action("E", 0), Action("E", 1)]] * 3


# --------------------------------------------------------------- bubbles on equal costs
def simulated(name: str, devices: int, microbatches: int, costs: dict[str, float],
              passes: int = 4) -> Simulation:
    """`passes` training passes back to back on schedule `name`, as `sm-dist simulate` replays
    them (rescheduled, placed, each action at its kind's cost per stage through replay_cost,
    a free link), every stage costing the same."""
    sent = gpipe_schedule(devices, microbatches, lambda s: [Action(APPLY)])
    where = placement(name, devices) if SCHEDULES[name].chunks > 1 else None
    plan = [Pass(t, rescheduled(sent, name)[0], False, where) for t in range(1, passes + 1)]
    measured = MeasuredCosts({(s, letter): seconds for s in range(devices)
                              for letter, seconds in {**costs, "A": 0.0}.items()}, {},
                             "synthetic")
    model = replay_cost(measured, Replay(plan, set()), 1.0, SCHEDULES[name].chunks)
    events = simulate(plan, model, LINKS["none"])
    return Simulation(events, list(range(1, passes + 1)), "none", LINKS["none"], microbatches,
                      measured, name)


def gpipe_bubble(p: int, m: int) -> float:
    return (p - 1) / (m + p - 1)


EQUAL = {"F": 1.0, "B": 1.0, "D": 0.5, "P": 0.5}  # every F and B alike
THIRDS = {"F": 1.0, "B": 2.0, "D": 1.0, "P": 1.0}  # F, input and weight gradients alike


@pytest.mark.parametrize("costs", [EQUAL, THIRDS], ids=["F=B", "F=D=P"])
@pytest.mark.parametrize("devices,microbatches", [(2, 4), (3, 6), (4, 4), (4, 8), (8, 16)])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_bubble_is_the_textbook_one(name: str, devices: int, microbatches: int,
                                                    costs: dict[str, float]) -> None:
    """Equal stages, a free link: the steady passes' bubble is (p−1)/(M+p−1)."""
    use = simulated(name, devices, microbatches, costs).utilisation()
    assert use["iterations"] == [2, 3]
    assert use["bubble_fraction"] == pytest.approx(gpipe_bubble(devices, microbatches),
                                                   abs=0.02)


@pytest.mark.parametrize("devices,microbatches", [(2, 4), (3, 6), (4, 4), (4, 8)])
def test_interleaved_and_zero_bubble_shrink_the_bubble_as_known(devices: int,
                                                                microbatches: int) -> None:
    """With F, D and P alike (B = D + P): interleaved 1F1B's bubble is (p−1)/(vM+p−1) with v = 2
    virtual stages, ZB-H1's (p−1)(F+D−P) of idle time per (p−1)(F+D−P) + M(F+D+P)."""
    p, m = devices, microbatches
    interleaved = simulated("interleaved", p, m, THIRDS).utilisation()["bubble_fraction"]
    assert interleaved == pytest.approx((p - 1) / (2 * m + p - 1), abs=0.02)
    zb = simulated("zb", p, m, THIRDS).utilisation()["bubble_fraction"]
    assert zb == pytest.approx((p - 1) / ((p - 1) + 3 * m), abs=0.02)
    assert zb < interleaved < gpipe_bubble(p, m)


@pytest.mark.parametrize("devices,microbatches", [(2, 4), (3, 6), (4, 8), (4, 16)])
def test_zbv_has_no_bubble_in_steady_state(devices: int, microbatches: int) -> None:
    """ZB-V with F, D and P alike and M ≥ 2p microbatches: the steady passes keep every device
    busy (under 2 points idle), where GPipe idles (p−1)/(M+p−1) of the time."""
    sim = simulated("zbv", devices, microbatches, THIRDS)
    use = sim.utilisation()
    assert use["bubble_fraction"] < 0.02
    assert all(busy > 0.98 for busy in use["busy_fraction"])
    gpipe = simulated("gpipe", devices, microbatches, THIRDS)
    assert max(sim.end_times().values()) < max(gpipe.end_times().values())


# --------------------------------------------------------------- sm-dist simulate on runs
def four_stage_job(optimizer: dict[str, Any], **run: Any) -> dict[str, Any]:
    """4 stages of one layer each, 8 microbatches of 4 samples, 10 iterations (the medians of
    the once-per-iteration update's cost need a few)."""
    return synthetic_job(
        name="sched", model={"mlp": {"widths": [6, 5, 5, 4, 3], "activation": "tanh"},
                             "balance": [1, 1, 1, 1]},
        data={"microbatches": 8, "synthetic": {"features": 6, "classes": 3, "train_size": 32,
                                               "test_size": 8}},
        optimizer=optimizer, run={"iterations": 10, "eval_every": 0, **run})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Single-process runs of the 4-stage job: adam with and without run.split_backward, and
    the tiny 3-stage job under sm and sm_adaptive."""
    root = tmp_path_factory.mktemp("runs")
    jobs = {"adam-split": four_stage_job({"name": "adam", "lr": 0.05}, split_backward=True),
            "adam": four_stage_job({"name": "adam", "lr": 0.05}),
            "sm": synthetic_job(),
            "sm_adaptive": synthetic_job(optimizer={"name": "sm_adaptive", "inner_steps": 3})}
    for name, job in jobs.items():
        path = write_job(root / f"{name}.yaml", job)
        assert main(["train", str(path), "--single-process", "--no-live",
                     "--out", str(root / name)]) == 0
    return {name: root / name for name in jobs}


def simulate_json(run: Path, schedule: str, capsys: pytest.CaptureFixture[str],
                  *extra: str) -> dict[str, Any]:
    """`sm-dist simulate RUN --json --schedule SCHEDULE`'s figures."""
    capsys.readouterr()
    assert main(["simulate", str(run), "--json", "--schedule", schedule, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_zero_bubble_schedules_beat_gpipe_on_adams_measured_costs(
        runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Adam's 4-stage run with split backwards, 8 microbatches: every schedule replays, and on
    the run's own measured costs ZB-V's and ZB-H1's iterations are shorter than GPipe's."""
    figures = {s: simulate_json(runs["adam-split"], s, capsys) for s in SCHEDULES}
    for schedule, f in figures.items():
        assert f["schedule"] == schedule and f["microbatches"] == 8
        assert len(f["busy_fraction"]) == 4 and f["iteration_time"] > 0
        assert 0 <= f["bubble_fraction"] < 1 and f["iterations"] == [2, 9]
        assert f["costs_from"] == "actions.json"
    assert figures["zbv"]["iteration_time"] < figures["gpipe"]["iteration_time"]
    assert figures["zb"]["iteration_time"] < figures["gpipe"]["iteration_time"]


@functools.cache
def busy_seconds(run: Path, schedule: str) -> list[float]:
    """Each device's seconds of work over the whole simulated run on `schedule`."""
    events = simulate_run(load_run(str(run)), schedule=schedule).events
    return [sum(e.end - e.start for e in events if e.stage == s) for s in range(4)]


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "zb", "zbv"])
def test_a_schedule_reorders_the_measured_work_without_changing_it(runs: dict[str, Path],
                                                                   schedule: str) -> None:
    """On the measured costs of one run, every schedule gives each device GPipe's amount of
    work (the same forwards and backwards, in another order; a virtual stage half its
    device's): the per-device busy seconds agree within 1 %."""
    gpipe = busy_seconds(runs["adam-split"], "gpipe")
    assert busy_seconds(runs["adam-split"], schedule) == pytest.approx(gpipe, rel=0.01)


def test_simulate_zbv_prints_the_utilisation_and_draws_the_timeline(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The printed report of ZB-V: the schedule, the virtual-stage note, an iteration time and
    bubble that are the JSON's, a row per stage, and the timeline's picture."""
    figures = simulate_json(runs["adam-split"], "zbv", capsys)
    picture = tmp_path / "zbv.png"
    assert main(["simulate", str(runs["adam-split"]), "--schedule", "zbv",
                 "--out", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "ZB-V" in out and "2 virtual stages" in out and "8 microbatches" in out
    assert f"iteration time {figures['iteration_time'] * 1e3:.2f} ms" in out
    assert f"bubble {figures['bubble_fraction']:.1%}" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"],
                                                                                ["2"], ["3"])]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert [float(r[1].rstrip("%")) for r in rows] == pytest.approx(
        [100 * b for b in figures["busy_fraction"]], abs=0.051)
    assert picture.is_file() and picture.stat().st_size > 0


def test_split_backward_changes_the_timing_not_the_numbers(runs: dict[str, Path]) -> None:
    """run.split_backward times a backward's halves apart: Adam's records and final model are
    those of the unsplit run, bit for bit, and every backward's event carries its halves."""
    split, whole = metric_rows(runs["adam-split"]), metric_rows(runs["adam"])
    assert [r["train_loss"] for r in split] == [r["train_loss"] for r in whole]
    model_split = torch.load(runs["adam-split"] / "model.pt", weights_only=True)["stages"]
    model_whole = torch.load(runs["adam"] / "model.pt", weights_only=True)["stages"]
    for a, b in zip(model_split, model_whole, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    events = json.loads((runs["adam-split"] / "actions.json").read_text())["traceEvents"]
    backwards = [e for e in events if e.get("cat") == "backward"]
    assert backwards and all(e["args"]["detail"].startswith("split ") for e in backwards)


@pytest.mark.parametrize("optimizer", ["sm", "sm_adaptive"])
def test_sm_family_may_not_use_a_schedule_that_splits_or_moves_its_backward(
        runs: dict[str, Path], optimizer: str, capsys: pytest.CaptureFixture[str]) -> None:
    """SM's update needs each stage's whole backward: zb, zbv and interleaved are exit 2 with a
    message naming the schedules it may use; 1f1b replays (with as many microbatches as
    stages, which torch's 1F1B needs)."""
    for schedule in ("zb", "zbv", "interleaved"):
        capsys.readouterr()
        assert main(["simulate", str(runs[optimizer]), "--schedule", schedule]) == 2
        err = capsys.readouterr().err
        assert f"--schedule {schedule}: {optimizer} runs on gpipe and 1f1b only" in err, err
        assert "Traceback" not in err
    figures = simulate_json(runs[optimizer], "1f1b", capsys, "--microbatches", "4")
    assert figures["schedule"] == "1f1b" and figures["microbatches"] == 4


def test_sm_family_refuses_split_backward_in_the_job(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """run.split_backward with sm: the job is bad input (exit 2), the message says to unset it."""
    path = write_job(tmp_path / "job.yaml", synthetic_job(run={"split_backward": True}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run.split_backward" in err and "run.split_backward: false" in err


def test_zero_bubble_needs_a_run_that_split_its_backwards(
        runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Adam without run.split_backward: zb and zbv are exit 2 saying to set it; the schedules
    that run whole backwards replay the same run."""
    for schedule in ("zb", "zbv"):
        capsys.readouterr()
        assert main(["simulate", str(runs["adam"]), "--schedule", schedule]) == 2
        err = capsys.readouterr().err
        assert f"--schedule {schedule} runs each backward as two halves" in err, err
        assert "--set run.split_backward=true" in err and "Traceback" not in err
    for whole in ("1f1b", "interleaved"):
        assert simulate_json(runs["adam"], whole, capsys)["schedule"] == whole
