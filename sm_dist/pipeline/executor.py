"""The one runtime of a schedule: each action kind mapped to the function that performs it.

A stage's plan (its actions for one pass) runs action by action on its `Stage`. Tensors to and
from the neighbouring stages go through a `Channel`: RPC in the engine
(`sm_dist.engine.worker`), an in-process mailbox in the single-process pipeline
(`sm_dist.pipeline.local`). The pipeline's own kinds (forward, backward, forward-only) are
handled here; an optimizer's kinds by its part on the stage (`StageOptimizer.handlers`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from sm_dist.pipeline.actions import (
    BACKWARD,
    EVALUATE,
    FORWARD,
    TRIAL,
    Action,
    ActionKind,
    Direction,
)
from sm_dist.pipeline.memory import MemoryReading
from sm_dist.pipeline.schedule import next_input
from sm_dist.pipeline.stage import Stage
from sm_dist.pipeline.timeline import TimelineEvent

MailKey = Hashable  # (plan id, kind letter, index, step)


@dataclass(frozen=True)
class Call:
    """A method of a stage, or of its optimizer's part, that a plan asks for (commands, trials)."""

    method: str
    args: tuple = ()
    on_optimizer: bool = False  # call stage.optimizer.<method> instead of stage.<method>

    def apply(self, stage: Stage) -> Any:
        return getattr(stage.optimizer if self.on_optimizer else stage, self.method)(*self.args)


@dataclass
class Plan:
    """One stage's share of one pipeline pass: its ordered actions and what it needs for them."""

    plan_id: int  # plans run in this order on every stage
    iteration: int
    actions: list[Action]
    inputs: dict[tuple[ActionKind, int], Tensor] = field(default_factory=dict)  # stage 0's x
    labels: dict[tuple[ActionKind, int], Tensor] = field(default_factory=dict)  # last y
    n: int = 0  # samples in the batch, the loss's 1/n
    same_batch: bool = False
    top: str = "loss"  # what the last stage computes: the loss, or an optimizer's own mode
    before: tuple[Call, ...] = ()  # calls before the actions (e.g. set a trial step)
    command: Call | None = None  # a call after the actions; its value is the plan's


@dataclass
class PlanResult:
    stage: int
    losses: dict[int, float] = field(default_factory=dict)  # last stage: F j -> Σ ℓ / n
    # Correct predictions per microbatch: a count, or for sequences the sum over samples of
    # the share of tokens right (losses.py), so that correct / n is the accuracy either way.
    correct: dict[int, float] = field(default_factory=dict)
    sums: dict[tuple[ActionKind, int], tuple[float, float, int]] = field(
        default_factory=dict)  # forward-only passes: (Σ loss, correct, samples) per chunk
    report: Any = None  # the stage optimizer's report of its last update
    memory: MemoryReading | None = None  # the stage process's memory after the plan
    events: list[TimelineEvent] = field(default_factory=list)
    value: Any = None  # the command's result


def payload_bytes(payload: Any) -> int:
    """The bytes of the tensors in a message (nested tuples, lists and dicts)."""
    if isinstance(payload, Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, (tuple, list)):
        return sum(payload_bytes(p) for p in payload)
    if isinstance(payload, dict):
        return sum(payload_bytes(p) for p in payload.values())
    return 0


class Channel(Protocol):
    """How a stage's executor exchanges tensors with its neighbours."""

    def receive(self, key: MailKey, source: int, what: str) -> Any:
        """Wait for what stage `source` sent under `key`; `what` names it in a timeout error."""
    def send(self, stage: int, key: MailKey, payload: Any) -> None: ...
    def flush(self) -> None:
        """Wait until every send of this plan is delivered (a dead neighbour shows here)."""
    def arrived(self, key: MailKey | None, plan_id: int) -> bool:
        """Whether `key` is there, or (key None) anything for a plan after `plan_id`."""
    def arrival(self, plan_id: int) -> float | None:
        """When (time.time()) the first input for a plan after `plan_id` arrived; None if
        none has, or if this channel has no idle time to measure (one process)."""
    def fill_step(self, step: Callable[[], int]) -> int:
        """Run one fill step (where stages share cores: at the lowest priority)."""


class PlanRun:
    """One plan being performed on one stage: what handlers see of the pipeline."""

    def __init__(self, executor: StageExecutor, plan: Plan) -> None:
        self.executor = executor
        self.stage = executor.stage
        self.channel = executor.channel
        self.plan = plan
        self.result = PlanResult(self.stage.index)
        self.position = 0
        self.started = 0.0  # when the current action had its input and began computing
        self.sent = 0
        for call in plan.before:
            call.apply(self.stage)

    # ------------------------------------------------------------------ for the handlers
    def _key(self, action: Action) -> MailKey:
        return (self.plan.plan_id, action.kind.letter, action.index, action.step)

    def from_below(self, action: Action, what: str) -> Any:
        """The tensor for `action` from the stage below (stage 0: its input from the plan)."""
        if self.stage.is_first:
            return self.plan.inputs[(action.kind, action.index)]
        below = self.stage.index - 1
        value = self.channel.receive(self._key(action), below, f"{what} of {action} from "
                                     f"stage {below} (rank {below})")
        self.started = time.time()
        return value

    def from_above(self, action: Action, what: str) -> Any:
        above = self.stage.index + 1
        value = self.channel.receive(self._key(action), above, f"{what} of {action} from "
                                     f"stage {above} (rank {above})")
        self.started = time.time()
        return value

    def send_up(self, action: Action, payload: Any) -> None:
        self.sent += payload_bytes(payload)
        self.channel.send(self.stage.index + 1, self._key(action), payload)

    def send_down(self, action: Action, payload: Any) -> None:
        self.sent += payload_bytes(payload)
        self.channel.send(self.stage.index - 1, self._key(action), payload)

    def input_key(self, position: int) -> MailKey | None:
        """What the action at `position` receives from a neighbour, if anything."""
        action = self.plan.actions[position]
        direction = action.kind.direction
        if (direction is Direction.UP and not self.stage.is_first) or (
                direction is Direction.DOWN and not self.stage.is_last):
            return self._key(action)
        return None

    def next_plan_arrival(self) -> float | None:
        """When the first input of a later plan arrived (fill mode's bubble), if it has."""
        return self.channel.arrival(self.plan.plan_id)

    def next_input_arrived(self) -> bool:
        """Fill mode: whether the input this stage waits for next is there (the next forward
        kind of this plan, else anything for a later plan)."""
        following = next_input(self.plan.actions, self.position)
        key = None if following is None else self._key(following)
        return self.channel.arrived(key, self.plan.plan_id)

    @property
    def tops(self) -> dict[Hashable, Any]:
        """The last stage's own hand-over from its forward kinds to the backward kinds."""
        return self.executor.tops

    # ------------------------------------------------------------------- for the runtimes
    def perform(self, position: int) -> None:
        self.position = position
        action = self.plan.actions[position]
        self.started = time.time()  # moved on when an input arrives: waiting is idle
        self.sent = 0  # bytes this action sends to its neighbours
        detail = self.executor.handler(action.kind)(self, action)
        if self.stage.device.type == "cuda":  # kernels run asynchronously: time them whole
            torch.cuda.synchronize(self.stage.device)
        self.result.events.append(TimelineEvent(self.stage.index, self.plan.iteration,
                                                action.kind, action.index, self.started,
                                                time.time(), detail, self.sent,
                                                plan=self.plan.plan_id))

    def finish(self) -> PlanResult:
        self.channel.flush()
        self.result.report = self.stage.optimizer.report()
        self.result.memory = self.stage.memory.reading()
        if self.plan.command is not None:
            self.result.value = self.plan.command.apply(self.stage)
        return self.result


# An action's implementation: it gets the running plan and the action, and returns a detail
# for the timeline (e.g. "12 steps"; "skipped" when it did nothing, which the simulator then
# replays as free).
Handler = Callable[[PlanRun, Action], str]


# ----------------------------------------------------------------------- generic handlers
def forward_microbatch(run: PlanRun, action: Action) -> str:
    stage, optimizer, j = run.stage, run.stage.optimizer, action.index
    assert j is not None
    received = run.from_below(action, "the input")
    # Stage 0's input comes from the plan; the others' with the note of the stage below.
    x, note = (received, None) if stage.is_first else received
    optimizer.take_forward_note(j, note)
    z = stage.forward_microbatch(j, x, run.plan.labels.get((FORWARD, j)))
    if stage.is_last:
        top = stage.top_of_pipeline(j, run.plan.n, run.plan.top)
        run.tops[(FORWARD, j)] = (top.grad, top.curvature)
        run.result.losses[j], run.result.correct[j] = float(top.loss), top.correct
    else:
        run.send_up(action, (z, optimizer.forward_note(j)))
    return ""


def backward_microbatch(run: PlanRun, action: Action) -> str:
    stage, optimizer, j = run.stage, run.stage.optimizer, action.index
    assert j is not None
    if stage.is_last:  # the top of the pipeline starts the notes that go down
        g, c = run.tops.pop((FORWARD, j))
        note = optimizer.backward_note(j, run.plan.same_batch)
    else:
        g, c, note = run.from_above(action, "the gradient")
    optimizer.take_backward_note(j, note)
    skipped = optimizer.skips_backward()
    g_in, c_in = stage.backward_microbatch(j, g, c, run.plan.same_batch)
    detail = "skipped" if skipped else _split_detail(optimizer.backward_split())
    if stage.is_first:
        return detail
    if optimizer.sends_curvature() and c_in is None:  # held back until the last backward
        run.executor.held[j] = (g_in, note)
        if not any(a.kind == BACKWARD for a in run.plan.actions[run.position + 1:]):
            late = optimizer.release_held()
            for k, (held, held_note) in run.executor.held.items():
                run.send_down(Action(BACKWARD, k), (held, late[k], held_note))
            run.executor.held.clear()
        return detail
    run.send_down(action, (g_in, c_in, note))
    return detail


def _split_detail(split: tuple[float, float] | None) -> str:
    """A split backward's halves for the timeline ('split INPUT_S WEIGHT_S'), else ''."""
    return "" if split is None else f"split {split[0]:.9f} {split[1]:.9f}"


def forward_only(run: PlanRun, action: Action) -> str:
    stage = run.stage
    key = (action.kind, action.index)
    z = stage.forward_only(run.from_below(action, "the input"))
    if stage.is_last:
        assert action.index is not None
        y = run.plan.labels[key].to(z.device)
        loss_sum, correct = stage.optimizer.evaluate_top(action.index, z, y, run.plan.top)
        run.result.sums[key] = (loss_sum, correct, len(z))
    else:
        run.send_up(action, z)
    return ""


PIPELINE_HANDLERS: dict[ActionKind, Handler] = {
    FORWARD: forward_microbatch, BACKWARD: backward_microbatch,
    EVALUATE: forward_only, TRIAL: forward_only,
}


class StageExecutor:
    """Performs plans on one stage: the pipeline's kinds here, the optimizer's by its part."""

    def __init__(self, stage: Stage, channel: Channel) -> None:
        self.stage = stage
        self.channel = channel
        self.tops: dict[Hashable, Any] = {}
        # Gradients (and their notes) an optimizer holds back until the stage's last backward
        # (SM's curvature over the whole batch needs every microbatch first).
        self.held: dict[int, tuple[Tensor | None, Any]] = {}
        self._handlers = {**PIPELINE_HANDLERS, **stage.optimizer.handlers()}

    def handler(self, kind: ActionKind) -> Handler:
        try:
            return self._handlers[kind]
        except KeyError:
            raise RuntimeError(f"stage {self.stage.index}: this optimizer has no action "
                               f"{kind.letter} ({kind.name})") from None

    def start(self, plan: Plan) -> PlanRun:
        return PlanRun(self, plan)

    def arrived(self, key: MailKey, payload: Any) -> None:
        """A neighbour's message was put in this stage's mailbox: a gradient's note goes to the
        optimizer at once (note_arrived), before the backward that takes it runs."""
        if key[1] == BACKWARD.letter:  # type: ignore[index]
            self.stage.optimizer.note_arrived(payload[2])

    def run(self, plan: Plan) -> PlanResult:
        """Perform a whole plan, action after action (the engine's way)."""
        run = self.start(plan)
        for position in range(len(plan.actions)):
            run.perform(position)
        return run.finish()
