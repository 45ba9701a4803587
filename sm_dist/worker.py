"""StageWorker: one stage in its own process, running the plans the coordinator sends in order."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
from torch.futures import Future

from sm_dist.math.losses import evaluate_loss
from sm_dist.models import num_params
from sm_dist.schedule import FORWARD_KINDS, Action
from sm_dist.stage import PipelineStage
from sm_dist.timeline import TimelineEvent
from sm_dist.transport import RemoteFailure, Transport, current_failure
from sm_dist.updates import (
    ArmijoTrialUpdate,
    BlockCGUpdate,
    StageUpdateReport,
    SurrogateUpdate,
    TorchOptimizerUpdate,
)


def _lowest_priority() -> None:
    try:  # Linux gives each thread its own nice value; 19 is the lowest priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass  # not available here: fill steps then run at normal priority


class InputTimeout(RuntimeError):
    """A stage waited longer than the RPC timeout for a tensor from a neighbour."""


class Mailbox:
    """Tensors that neighbours sent, keyed by (plan, kind, microbatch), until the stage takes them.

    Deliveries arrive on RPC threads in any order; the executor takes them in schedule order.
    """

    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}
        self._ready = threading.Condition()

    def put(self, key: Hashable, value: Any) -> None:
        with self._ready:
            self._items[key] = value
            self._ready.notify_all()

    def take(self, key: Hashable, timeout: float, what: str) -> Any:
        with self._ready:
            if not self._ready.wait_for(lambda: key in self._items, timeout=timeout):
                raise InputTimeout(f"waited {timeout:.0f}s (run.rpc_timeout) for {what}")
            return self._items.pop(key)

    def contains(self, key: Hashable) -> bool:
        with self._ready:
            return key in self._items

    def has_later_plan(self, plan_id: int) -> bool:
        """Whether anything arrived for a plan after `plan_id` (the next iteration's input)."""
        with self._ready:
            return any(key[0] > plan_id for key in self._items)  # type: ignore[index]


@dataclass
class Plan:
    """One stage's share of one pipeline pass: its ordered actions and what it needs for them."""

    plan_id: int  # plans run in this order on every stage
    iteration: int
    actions: list[Action]
    inputs: dict[tuple[str, int], Tensor] = field(default_factory=dict)  # stage 0's x
    labels: dict[tuple[str, int], Tensor] = field(default_factory=dict)  # last stage's y
    n: int = 0  # samples in the batch, the loss's 1/n
    same_batch: bool = False
    trial_step: float | None = None  # GD+Armijo, SSO: set θ = θ − α·p.grad before the actions
    end_trial: bool | None = None  # GD+Armijo, SSO: keep (True) or undo (False) the last trial
    surrogate: bool = False  # SSO: the last stage evaluates q instead of the loss
    command: str | None = None  # a stage method to call after the actions (grad_sq_norm, ...)
    command_args: tuple = ()


@dataclass
class PlanResult:
    stage: int
    losses: dict[int, float] = field(default_factory=dict)  # last stage: F j -> Σ ℓ / n
    correct: dict[int, int] = field(default_factory=dict)
    sums: dict[tuple[str, int], tuple[float, int, int]] = field(default_factory=dict)  # E, T
    report: StageUpdateReport | None = None
    events: list[TimelineEvent] = field(default_factory=list)
    value: Any = None  # the command's result


class StageWorker:
    """Holds one PipelineStage and runs plans on it, one at a time, in plan order.

    RPC delivers calls on many threads; `run_plan` only queues, and a single executor thread
    runs the queued plans by plan id, so the stage sees exactly the schedule's order.
    Activations go up and gradients down straight to the neighbouring stage's mailbox.
    """

    def __init__(self, stage: PipelineStage, transport: Transport) -> None:
        self.stage = stage
        self.transport = transport
        self.rank = transport.info.rank
        self.mailbox = Mailbox()
        self._queue: dict[int, tuple[Plan, Future]] = {}
        self._queued = threading.Condition()
        self._next_plan = 0
        self._tops: dict[int, Any] = {}  # last stage: (g, c), or CGBlock's tangents, per microbatch
        self._held: dict[int, Tensor] = {}  # curvature: batch — gradients held until the end
        self._sends: list[Future] = []
        self._started = 0.0  # when the current action had its input and began computing
        # Fill steps run on a thread of the lowest CPU priority: where stage processes share
        # cores (more stages than cores) they take only time no other stage wants.
        self._filler = ThreadPoolExecutor(1, f"stage{self.rank}-fill", _lowest_priority)
        threading.Thread(target=self._run, name=f"stage{self.rank}-executor", daemon=True).start()

    # ------------------------------------------------------------------------ RPC surface
    def describe(self) -> dict[str, Any]:
        return {"stage": self.stage.index, "host": socket.gethostname(),
                "device": str(self.transport.device),
                "parameters": num_params(self.stage.module)}

    def deliver(self, key: Hashable, payload: Any) -> None:
        self.mailbox.put(key, payload)

    def run_plan(self, plan: Plan) -> Future:
        done: Future = Future()
        with self._queued:
            self._queue[plan.plan_id] = (plan, done)
            self._queued.notify_all()
        return done

    # --------------------------------------------------------------------------- executor
    def _run(self) -> None:
        while True:
            with self._queued:
                self._queued.wait_for(lambda: self._next_plan in self._queue)
                plan, done = self._queue.pop(self._next_plan)
            done.set_result(self._execute(plan))
            self._next_plan += 1

    def _execute(self, plan: Plan) -> PlanResult | RemoteFailure:
        try:
            return self._execute_actions(plan)
        except Exception:
            return current_failure()

    def _execute_actions(self, plan: Plan) -> PlanResult:
        stage = self.stage
        result = PlanResult(stage.index)
        if plan.trial_step is not None:
            assert isinstance(stage.update, ArmijoTrialUpdate)
            stage.update.set_step(plan.trial_step)
        if plan.end_trial is not None:
            stage.end_trial(plan.end_trial)
        for position, action in enumerate(plan.actions):
            self._started = time.time()  # moved on by _input: waiting for a tensor is idle
            detail = self._perform(plan, position, action, result)
            result.events.append(TimelineEvent(stage.index, plan.iteration, action.kind,
                                               action.index, self._started, time.time(),
                                               detail))
        for future in self._sends:  # a neighbour that died shows up here at the latest
            future.wait()
        self._sends.clear()
        if plan.command is not None:
            result.value = getattr(stage, plan.command)(*plan.command_args)
        return result

    def _perform(self, plan: Plan, position: int, action: Action, result: PlanResult) -> str:
        kind, j = action.kind, action.index
        if kind == "F":
            self.forward_microbatch(plan, j, result)
        elif kind == "B":
            last_backward = not any(a.kind == "B" for a in plan.actions[position + 1:])
            self.backward_microbatch(plan, j, last_backward)
        elif kind in ("E", "T"):
            self.forward_only(plan, action, result)
        elif kind == "J":
            self.tangent_forward(plan, action)
        elif kind == "H":
            self.tangent_backward(plan, action)
        elif kind == "C":
            self.cg_step()
        elif kind == "L":
            self.build_local_loss()
        elif kind == "I":
            return f"{self.run_inner_steps(j)} steps"
        elif kind == "W":
            return f"{self.fill_inner_steps(plan, position, j)} steps"
        elif kind == "A":
            result.report = self.apply_update()
        return ""

    # ------------------------------------------------------------------------------ verbs
    def _input(self, plan: Plan, kind: str, j: int) -> Tensor:
        if self.stage.is_first:
            return plan.inputs[(kind, j)]
        below = self.rank - 1
        x = self.mailbox.take((plan.plan_id, kind, j), self.transport.timeout,
                              f"the input of {kind}{j} from stage {below} (rank {below})")
        self._started = time.time()
        return x

    def _send(self, rank: int, key: tuple, payload: Any) -> None:
        self._sends.append(self.transport.call_async(rank, "deliver", key, payload))

    def forward_microbatch(self, plan: Plan, j: int, result: PlanResult) -> None:
        stage = self.stage
        x = self._input(plan, "F", j)
        z = stage.forward_microbatch(j, x, plan.labels.get(("F", j)))
        if stage.is_last and plan.surrogate:
            g, value = stage.surrogate_top(j)
            self._tops[j] = (g, None)
            result.losses[j], result.correct[j] = value, 0
        elif stage.is_last:
            g, c, loss, correct = stage.top_of_pipeline(j, plan.n)
            self._tops[j] = (g, c)
            result.losses[j], result.correct[j] = loss, correct
        else:
            self._send(self.rank + 1, (plan.plan_id, "F", j), z)

    def backward_microbatch(self, plan: Plan, j: int, last_backward: bool) -> None:
        stage = self.stage
        if stage.is_last:
            g, c = self._tops.pop(j)
        else:
            above = self.rank + 1
            g, c = self.mailbox.take((plan.plan_id, "B", j), self.transport.timeout,
                                     f"the gradient of B{j} from stage {above} (rank {above})")
            self._started = time.time()
        g_in, c_in = stage.backward_microbatch(j, g, c, plan.same_batch)
        if stage.is_first:
            return
        if stage.needs_curvature and c_in is None:  # curvature: batch — wait for the last one
            self._held[j] = g_in
            if last_backward:
                late = stage.finish_backward() or {}
                for k, held in self._held.items():
                    self._send(self.rank - 1, (plan.plan_id, "B", k), (held, late[k]))
                self._held.clear()
            return
        self._send(self.rank - 1, (plan.plan_id, "B", j), (g_in, c_in))

    def forward_only(self, plan: Plan, action: Action, result: PlanResult) -> None:
        stage = self.stage
        key = (action.kind, action.index)
        z = stage.forward_only(self._input(plan, action.kind, action.index))
        if stage.is_last and plan.surrogate:
            result.sums[key] = (stage.surrogate_value(action.index, z), 0, len(z))
        elif stage.is_last:
            assert stage.loss is not None
            loss_sum, correct = evaluate_loss(stage.loss, z, plan.labels[key].to(z.device))
            result.sums[key] = (loss_sum, correct, len(z))
        else:
            self._send(self.rank + 1, (plan.plan_id, *key), z)

    def tangent_forward(self, plan: Plan, action: Action) -> None:
        stage, key = self.stage, (plan.plan_id, "J", action.index, action.step)
        incoming: dict[int, Tensor] = {}
        if not stage.is_first:
            below = self.rank - 1
            incoming = self.mailbox.take(key, self.transport.timeout,
                                         f"the tangents of J{action.index} from stage {below} "
                                         f"(rank {below})")
            self._started = time.time()
        tangents = stage.tangent_forward(action.index, incoming)
        if stage.is_last:
            self._tops[action.index] = tangents  # the H pass starts from these
        else:
            self._send(self.rank + 1, key, tangents)

    def tangent_backward(self, plan: Plan, action: Action) -> None:
        stage, key = self.stage, (plan.plan_id, "H", action.index, action.step)
        if stage.is_last:
            incoming = self._tops.pop(action.index)
        else:
            above = self.rank + 1
            incoming = self.mailbox.take(key, self.transport.timeout,
                                         f"the tangents of H{action.index} from stage {above} "
                                         f"(rank {above})")
            self._started = time.time()
        down = stage.tangent_backward(action.index, incoming)
        if not stage.is_first:
            self._send(self.rank - 1, key, down)

    def cg_step(self) -> None:
        assert isinstance(self.stage.update, BlockCGUpdate)
        self.stage.update.advance()

    def build_local_loss(self) -> None:
        assert isinstance(self.stage.update, (SurrogateUpdate, BlockCGUpdate))
        self.stage.update.begin()

    def run_inner_steps(self, n: int) -> int:
        """n more inner steps of the current local loss (a second call continues the run)."""
        assert isinstance(self.stage.update, SurrogateUpdate)
        return self.stage.update.step(n)

    def fill_inner_steps(self, plan: Plan, position: int, limit: int) -> int:
        """Inner steps, one at a time, while the stage's next input has not arrived (or limit)."""
        waiting_for = next((a for a in plan.actions[position + 1:] if a.kind in FORWARD_KINDS),
                           None)
        def arrived() -> bool:
            if waiting_for is not None:  # evaluation follows in this plan
                return self.mailbox.contains((plan.plan_id, waiting_for.kind, waiting_for.index))
            return self.mailbox.has_later_plan(plan.plan_id)

        taken = 0
        while taken < limit and not arrived():
            if self._filler.submit(self.run_inner_steps, 1).result() == 0:
                break  # the solver has converged or stopped
            taken += 1
        return taken

    def apply_update(self) -> StageUpdateReport:
        rule = self.stage.update
        if isinstance(rule, (SurrogateUpdate, BlockCGUpdate)):
            report = rule.finish()
        else:
            assert isinstance(rule, TorchOptimizerUpdate)
            rule.step()
            report = rule.report()
        self.stage.end_iteration()
        return report
