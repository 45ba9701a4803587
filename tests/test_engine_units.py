"""The engine's pieces in one process, over a loopback transport: plans in plan-id order,
mailbox keys, when fill mode stops stepping, failures named by stage and rank, and the
coordinator with its workers giving the single-process pipeline's numbers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from sm_dist.config.build import (
    build_local_pipeline,
    build_stage,
    build_stage_modules,
    load_job_data,
)
from sm_dist.config.job import JobConfig, job_from_dict
from sm_dist.data.batches import split_microbatches
from sm_dist.engine.coordinator import RpcPipeline
from sm_dist.engine.failures import StageError
from sm_dist.engine.worker import InputTimeout, Mailbox, StageWorker
from sm_dist.optim.fill_budget import FillBudget
from sm_dist.optim.sm import FILL, SMStageOptimizer
from sm_dist.optim.step_scale import Decision
from sm_dist.pipeline.actions import FORWARD, Action
from sm_dist.pipeline.executor import Call, Plan
from sm_dist.pipeline.local import LocalChannel
from sm_dist.run.trainer import train
from tests.conftest import synthetic_job
from tests.loopback import LoopbackWorld

CPU = torch.device("cpu")


def loopback_engine(job: JobConfig) -> tuple[RpcPipeline, LoopbackWorld]:
    """Every stage's StageWorker in this process, and the coordinator's pipeline over them."""
    num_stages = len(job.model.balance)
    world = LoopbackWorld(num_stages)
    for s, module in enumerate(build_stage_modules(job)):
        world.handlers[s] = StageWorker(build_stage(job, s, module, CPU), world.transport(s), s,
                                        host="loopback")
    return RpcPipeline(world.transport(0), num_stages), world


@pytest.fixture
def engine() -> Iterator[Callable[[dict], tuple[RpcPipeline, LoopbackWorld]]]:
    worlds: list[LoopbackWorld] = []

    def make(raw: dict) -> tuple[RpcPipeline, LoopbackWorld]:
        pipeline, world = loopback_engine(job_from_dict(raw))
        worlds.append(world)
        return pipeline, world

    yield make
    for world in worlds:
        world.close()


# ------------------------------------------------------------------------------- mailbox
def test_mailbox_keeps_each_plans_tensors_apart() -> None:
    box = Mailbox()
    box.put((1, "F", 0), "next iteration's F0")  # arrives early
    box.put((0, "F", 0), "this iteration's F0")
    assert box.take((0, "F", 0), 1.0, "x") == "this iteration's F0"
    assert not box.contains((0, "F", 0)) and box.contains((1, "F", 0))
    assert box.has_later_plan(0) and not box.has_later_plan(1)
    # When the first delivery of a later plan came: what ended plan 0's bubble.
    first = box.first_after(0)
    assert first is not None and box.first_after(1) is None
    box.put((1, "E", 0), "a later delivery of the same plan")
    assert box.first_after(0) == first
    with pytest.raises(InputTimeout, match=r"waited 0s \(run.rpc_timeout\) for the input of F1"):
        box.take((0, "F", 1), 0.05, "the input of F1")


def test_a_delivery_from_another_thread_wakes_the_taker() -> None:
    box = Mailbox()
    threading.Timer(0.05, box.put, ((3, "B", 2), "g")).start()
    assert box.take((3, "B", 2), 5.0, "the gradient of B2") == "g"


# --------------------------------------------------------------------------- plan order
class Recorder(SMStageOptimizer):
    """SM's stage part with one more method a command can call: note the plan that ran it."""

    seen: list[int] = []

    def note(self, tag: int) -> int:
        self.seen.append(tag)
        return tag


def test_plans_run_in_plan_id_order_whatever_order_they_arrive_in(engine) -> None:
    pipeline, world = engine(synthetic_job(model={"mlp": {"widths": [6, 3]}, "balance": [1]}))
    worker: StageWorker = world.handlers[0]
    stage = worker.stage
    part = Recorder(stage.optimizer.owner, stage)  # type: ignore[attr-defined]
    part.seen = []
    stage.optimizer = part
    futures = [worker.run_plan(Plan(plan_id, -1, [], command=Call("note", (plan_id,), True)))
               for plan_id in (2, 0, 3, 1)]  # ids 0..3 after the describe() of the pipeline
    assert [f.wait().value for f in futures] == [2, 0, 3, 1]
    assert part.seen == [0, 1, 2, 3]


# ------------------------------------------------------------------------------- fill mode
class ScriptedChannel(LocalChannel):
    """In-process tensors, and a next input that arrives after `after` fill steps."""

    def __init__(self, after: int) -> None:
        super().__init__([{}], 0)
        self.after, self.asked = after, 0

    def arrived(self, key: Any, plan_id: int) -> bool:
        self.asked += 1
        return self.asked > self.after


def fill_run(after: int, limit: int, job: dict) -> tuple[str, SMStageOptimizer]:
    """Stage 1 of a 2-stage SM pipeline after its backward: W<limit> with a scripted input."""
    parsed = job_from_dict(job)
    pipeline = build_local_pipeline(parsed, CPU)
    data = load_job_data(parsed)
    pipeline.forward_backward(split_microbatches(data.train_x, data.train_y, 2), 24)
    stage = pipeline.stages[1]
    part = stage.optimizer
    assert isinstance(part, SMStageOptimizer)
    part.begin()
    from sm_dist.pipeline.executor import StageExecutor

    run = StageExecutor(stage, ScriptedChannel(after)).start(
        Plan(7, 1, [Action(FILL, limit), Action(FORWARD, 0)]))
    run.perform(0)
    return run.result.events[0].detail, part


SM_JOB = synthetic_job(model={"mlp": {"widths": [6, 5, 3]}, "balance": [1, 1]},
                       optimizer={"name": "sm", "inner_steps": 1})


def test_fill_steps_stop_when_the_next_input_arrives() -> None:
    detail, part = fill_run(after=3, limit=50, job=SM_JOB)
    assert detail == "3 steps" and part.solver is not None and part.solver.steps == 3


def test_fill_steps_stop_at_the_limit_or_when_the_solver_stops() -> None:
    assert fill_run(after=10**6, limit=4, job=SM_JOB)[0] == "4 steps"
    detail, part = fill_run(after=10**6, limit=10**4, job=SM_JOB)  # CG converges in ≤ dim steps
    assert part.solver is not None and part.solver.stopped is not None
    assert detail == f"{part.solver.steps} steps" and part.solver.steps < 10**4


def test_a_fill_takes_no_step_that_would_end_past_the_measured_bubble() -> None:
    """The second fill knows the first one's bubble (its input arrived right when it began)
    and takes no step, where without that knowledge it would step until the input is there."""
    class Timed(ScriptedChannel):
        def arrival(self, plan_id: int) -> float | None:
            return part.budget.began  # the input came the moment the last fill began

    _, part = fill_run(after=10**6, limit=3, job=SM_JOB)
    assert part.budget.step > 0 and part.budget.bubble is None
    from sm_dist.pipeline.executor import StageExecutor

    run = StageExecutor(part.stage, Timed(10**6)).start(
        Plan(8, 2, [Action(FILL, 3), Action(FORWARD, 0)]))
    run.perform(0)
    assert run.result.events[0].detail == "0 steps" and part.budget.bubble == 0.0


def test_the_fill_budget_leaves_room_for_a_step_and_the_apply() -> None:
    budget = FillBudget()
    budget.begin(100.0, None)
    assert budget.allows(1e9)  # no bubble measured yet: until the input arrives
    budget.took(0.3)
    budget.took(0.1)
    budget.after = 0.2
    budget.begin(200.0, 1.0)
    assert budget.step == 0.3 and budget.bubble == 1.0
    assert budget.allows(200.5)  # 0.5 + 0.3 + 0.2 = 1.0: ends just in time
    assert not budget.allows(200.51)
    budget.begin(300.0, None)  # the last bubble unknown: the one before stands
    assert budget.bubble == 1.0 and not budget.allows(300.6)


# ---------------------------------------------------------------------------- failures
def test_a_remote_exception_names_its_stage_and_rank(engine) -> None:
    pipeline, _ = engine(synthetic_job())
    states = pipeline.checkpoint().wait()
    states[1]["module"] = {"not.a.parameter": torch.zeros(1)}  # only stage 1 fails
    with pytest.raises(StageError) as caught:
        pipeline.restore_checkpoint(states)
    err = caught.value
    assert (err.stage, err.rank) == (1, 1)
    assert str(err).startswith("stage 1 (rank 1 on loopback): RuntimeError: Error(s) in "
                               "loading state_dict")
    assert "Traceback" in str(err)  # the stage's own traceback comes with it


def test_a_dead_peer_becomes_a_stage_error_naming_it(engine) -> None:
    pipeline, world = engine(synthetic_job())
    world.dead.add(2)
    with pytest.raises(StageError) as caught:
        pipeline.command(Call("grad_sq_norm")).wait()
    assert (caught.value.stage, caught.value.rank) == (2, 2)
    assert "stopped answering (EOF: rank 2 is gone)" in str(caught.value)


# ----------------------------------------------------------------------- whole iterations
@pytest.mark.parametrize("optimizer", [
    {"name": "sm", "inner_steps": 3}, {"name": "sm", "inner_steps": 3, "curvature": "batch"},
    {"name": "gd_armijo"}, {"name": "sso", "inner_steps": 2}, {"name": "cgblock",
                                                                "inner_steps": 2},
    {"name": "adam", "lr": 0.05}])
def test_the_coordinator_and_workers_give_the_single_process_numbers(engine,
                                                                     optimizer: dict) -> None:
    raw = synthetic_job(optimizer=optimizer, data={"microbatches": 3},
                        run={"iterations": 3, "eval_every": 2})
    job = job_from_dict(raw)
    data = load_job_data(job)
    local = train(job, build_local_pipeline(job, CPU), data, lambda r: None)
    pipeline, _ = engine(raw)
    remote = train(job, pipeline, data, lambda r: None)
    assert [r.train_loss for r in remote] == [r.train_loss for r in local]
    assert [r.test_loss for r in remote] == [r.test_loss for r in local]
    assert [r.forward_passes for r in remote] == [r.forward_passes for r in local]
    assert all(len(r.busy_fraction or []) == 3 for r in remote)  # timed by the workers


def test_a_workers_delivery_hands_a_gradients_note_to_its_optimizer(engine) -> None:
    """StageWorker.deliver gives the note that comes down with a gradient to the stage's
    optimizer when it is delivered (note_arrived), once per gradient, before the backward that
    takes it: what lets stage 0 free the step held for acceptance before its first backward."""
    raw = synthetic_job(optimizer={"name": "sm_kron"}, data={"microbatches": 3},
                        run={"iterations": 3, "eval_every": 0})
    job = job_from_dict(raw)
    pipeline, world = engine(raw)
    optimizer = world.handlers[0].stage.optimizer
    notes: list[Any] = []
    arrived = optimizer.note_arrived

    def spied(note: Any) -> None:
        notes.append(note)
        arrived(note)

    optimizer.note_arrived = spied  # type: ignore[method-assign]
    train(job, pipeline, load_job_data(job), lambda r: None)
    assert len(notes) == 3 * 3  # every gradient stage 0 received
    assert all(isinstance(note, Decision) and note.accept for note in notes)
