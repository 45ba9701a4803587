"""What the training loop asks of a pipeline, in one process or many, and the plan-building
both kinds share: they differ only in how a pass's plans reach the stages (`_dispatch`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from torch import Tensor

from sm_dist.pipeline.actions import EVALUATE, FORWARD, ActionKind, Schedule
from sm_dist.pipeline.executor import Call, Plan, PlanResult
from sm_dist.pipeline.memory import MemoryReading
from sm_dist.pipeline.schedule import Pass, forward_only_schedule, gpipe_schedule
from sm_dist.pipeline.timeline import EventLog, TimelineEvent

Microbatches = list[tuple[Tensor, Tensor]]
EVAL_CHUNK = 8192  # rows per forward-only evaluation chunk
T = TypeVar("T")
U = TypeVar("U")


@dataclass
class BatchResult:
    """What one forward pass measured: h at the iterate (Σ ℓ / n) and the correct predictions."""

    loss: float
    correct: float  # a count, or summed token shares for sequences (executor.PlanResult)
    samples: int


@dataclass
class IterationRequest:
    """One pass of a batch: the schedule's forward, backward and update, maybe evaluation."""

    iteration: int
    microbatches: Microbatches
    n: int  # samples in the batch: the loss is Σ ℓ / n
    same_batch: bool  # the same samples as the previous iteration (power-iteration warm start)
    schedule: Schedule  # every stage's actions (E chunks last, one per eval chunk)
    eval_chunks: Microbatches | None = None  # evaluated after the update: test set first,
    test_chunks: int = 0  # this many of them; the rest are the training set's
    last: bool = False  # no iteration follows: nothing to wait for, so no bubble to fill
    top: str = "loss"  # what the last stage computes (an optimizer may define its own: SSO's)


@dataclass
class IterationResult:
    batch: BatchResult
    reports: list[Any]  # one per stage: its optimizer's report
    test: tuple[float, float, int] | None = None  # (Σ loss, correct, samples) after the update
    train: tuple[float, float, int] | None = None  # the same over the whole training set
    memory: list[MemoryReading | None] | None = None  # per stage, after the pass


class Pending(Protocol[T]):  # type: ignore[misc]
    def wait(self) -> T: ...


class Done(Generic[T]):
    """A result that is already there (the in-process pipeline)."""

    def __init__(self, result: T) -> None:
        self.result = result

    def wait(self) -> T:
        return self.result


class Then(Generic[T, U]):
    """A pending result with a function applied to it when it is waited for."""

    def __init__(self, pending: Pending[T], then: Callable[[T], U]) -> None:
        self.pending, self.then = pending, then

    def wait(self) -> U:
        return self.then(self.pending.wait())


def _totals(sums: list[tuple[float, float, int]]) -> tuple[float, float, int] | None:
    """(Σ loss, correct, samples) over evaluation chunks; None for none."""
    if not sums:
        return None
    return sum(e[0] for e in sums), sum(e[1] for e in sums), sum(e[2] for e in sums)


def eval_chunks(x: Tensor, y: Tensor) -> Microbatches:
    return [(x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK]) for i in range(0, len(x), EVAL_CHUNK)]


class Pipeline:
    """A pipeline of stages as the training loop and the steered optimizers drive it.

    Every pass becomes one plan per stage, numbered in order; a subclass sends them
    (`_dispatch`). Stage 0 gets the inputs and the last stage the labels; everything else
    travels between the stages. Every pass with actions is also handed to `dispatch_sink` as
    it is sent (plans.jsonl: what the simulator replays), marked as waiting when nothing sent
    before it was still unread.
    """

    num_stages: int
    events: EventLog  # what each stage did when, recent iterations (empty in one process)
    # Whether `events` is a real pipeline's timeline (stages in parallel); a pipeline that runs
    # actions one at a time sends them to `action_sink` instead, as measured costs.
    measures_timeline = False
    # Whether every stage runs in this one process (then one memory figure covers them all).
    shares_process = False
    action_sink: Callable[[list[TimelineEvent]], None] | None = None
    dispatch_sink: Callable[[int, Pass], None] | None = None

    def __init__(self, num_stages: int) -> None:
        self.num_stages = num_stages
        self.events = EventLog()
        self._next_plan = 0
        self._unread: set[int] = set()  # plans sent whose results nobody has waited for

    def _dispatch(self, plans: list[Plan]) -> Pending[list[PlanResult]]:
        raise NotImplementedError

    def _send(self, iteration: int, schedule: Schedule,
              data: dict[tuple[ActionKind, int], tuple[Tensor, Tensor]],
              per_stage_args: Sequence[tuple] | None = None, command: Call | None = None,
              **options: Any) -> Pending[list[PlanResult]]:
        plan_id, self._next_plan = self._next_plan, self._next_plan + 1
        if self.dispatch_sink is not None and any(schedule):
            self.dispatch_sink(plan_id, Pass(iteration, schedule, waits=not self._unread))
        self._unread.add(plan_id)
        plans = []
        for s, actions in enumerate(schedule):
            call = command
            if command is not None and per_stage_args is not None:
                call = Call(command.method, per_stage_args[s], command.on_optimizer)
            plan = Plan(plan_id, iteration, actions, command=call, **options)
            if s == 0:
                plan.inputs = {key: x for key, (x, _) in data.items()}
            if s == self.num_stages - 1:
                plan.labels = {key: y for key, (_, y) in data.items()}
            plans.append(plan)
        return Then(self._dispatch(plans), lambda results: self._read(plan_id, results))

    def _read(self, plan_id: int, results: list[PlanResult]) -> list[PlanResult]:
        self._unread.discard(plan_id)
        return results

    def submit(self, request: IterationRequest) -> Pending[IterationResult]:
        chunks = request.eval_chunks or []
        data = {(FORWARD, j): mb for j, mb in enumerate(request.microbatches)}
        data.update({(EVALUATE, k): chunk for k, chunk in enumerate(chunks)})
        pending = self._send(request.iteration, request.schedule, data, n=request.n,
                             same_batch=request.same_batch, top=request.top)

        def collect(results: list[PlanResult]) -> IterationResult:
            last = results[-1]
            batch = BatchResult(sum(last.losses[j] for j in sorted(last.losses)),
                                sum(last.correct.values()), request.n)
            evals = [last.sums[(EVALUATE, k)] for k in range(len(chunks))]
            return IterationResult(batch, [r.report for r in results],
                                   _totals(evals[:request.test_chunks]),
                                   _totals(evals[request.test_chunks:]),
                                   [r.memory for r in results])

        return Then(pending, collect)

    def forward_backward(self, microbatches: Microbatches, n: int, same_batch: bool = False,
                         top: str = "loss", iteration: int = 0) -> BatchResult:
        """A forward and backward pass with no update: the gradient stays in every stage's
        p.grad (and the optimizer keeps what its backward keeps) until `end_iteration`."""
        schedule = gpipe_schedule(self.num_stages, len(microbatches))
        request = IterationRequest(iteration, microbatches, n, same_batch, schedule, top=top)
        return self.submit(request).wait().batch

    def end_iteration(self) -> None:
        """Every stage drops its gradient and the iteration's state (after forward_backward)."""
        self.command(Call("end_iteration")).wait()

    def forward_pass(self, iteration: int, kind: ActionKind, chunks: Microbatches, *,
                     before: tuple[Call, ...] = (), top: str = "loss") -> tuple[float, int]:
        """A forward-only pass of `chunks`: the last stage's summed values and correct count."""
        schedule = forward_only_schedule(self.num_stages, len(chunks), kind)
        data = {(kind, k): chunk for k, chunk in enumerate(chunks)}
        results = self._send(iteration, schedule, data, before=before, top=top).wait()
        sums = results[-1].sums
        ordered = [sums[(kind, k)] for k in range(len(chunks))]
        return sum(s[0] for s in ordered), sum(s[1] for s in ordered)

    def perform(self, schedule: Schedule, iteration: int = 0) -> list[PlanResult]:
        """A schedule whose actions need no data from the coordinator (e.g. a tangent pass)."""
        return self._send(iteration, schedule, {}).wait()

    def command(self, call: Call, per_stage_args: Sequence[tuple] | None = None,
                before: tuple[Call, ...] = ()) -> Pending[list[Any]]:
        """A plan without actions on every stage, run after everything sent before it: the
        call's value per stage, in stage order (does not wait)."""
        schedule: Schedule = [[] for _ in range(self.num_stages)]
        return Then(self._send(-1, schedule, {}, per_stage_args, call, before=before),
                    lambda results: [r.value for r in results])

    def evaluate(self, iteration: int, x: Tensor, y: Tensor) -> tuple[float, int]:
        """Summed loss and correct predictions over a data set, forward-only, in chunks."""
        return self.forward_pass(iteration, EVALUATE, eval_chunks(x, y))

    def start_memory_measurement(self) -> None:
        """Every stage's memory peak from now on (training starts)."""
        self.command(Call("start_memory_measurement")).wait()

    def grad_sq_norm(self) -> float:
        return sum(self.command(Call("grad_sq_norm")).wait())

    def state_dicts(self) -> list[dict[str, Tensor]]:
        return self.command(Call("state_dict")).wait()

    def checkpoint(self) -> Pending[list[Any]]:
        """Every stage's checkpoint state after the passes sent so far (does not wait)."""
        return self.command(Call("checkpoint_state"))

    def restore_checkpoint(self, states: list[dict[str, Any]]) -> None:
        self.command(Call("restore_checkpoint"), [(state,) for state in states]).wait()
