"""StageWorker: one stage in its own process, running the plans the coordinator sends in order."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from torch.futures import Future

from sm_dist.engine.failures import RemoteFailure
from sm_dist.engine.layout import SINGLE, Layout
from sm_dist.models.build import num_params
from sm_dist.pipeline.actions import BACKWARD, Action, ActionKind
from sm_dist.pipeline.executor import Handler, MailKey, Plan, PlanResult, PlanRun, StageExecutor
from sm_dist.pipeline.stage import Stage


def _lowest_priority() -> None:
    try:  # Linux gives each thread its own nice value; 19 is the lowest priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass  # not available here: fill steps then run at normal priority


class InputTimeout(RuntimeError):
    """A stage waited longer than the RPC timeout for a tensor from a neighbour."""


class WorkerTransport(Protocol):
    """What a worker needs of its process's endpoint (engine/transport.py, or a loopback)."""

    timeout: float
    device: Any

    def call_async(self, rank: int, method: str, *args: Any) -> Future: ...


class Mailbox:
    """Tensors that neighbours sent, keyed by (plan, kind, microbatch), until the stage takes them.

    Deliveries arrive on RPC threads in any order; the executor takes them in schedule order.
    """

    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}
        self._ready = threading.Condition()
        self._first: dict[int, float] = {}  # plan -> when its first delivery came (time.time)

    def put(self, key: Hashable, value: Any) -> None:
        with self._ready:
            self._items[key] = value
            plan = key[0]  # type: ignore[index]
            self._first.setdefault(plan, time.time())
            for old in [p for p in self._first if p < plan - 4]:  # a few plans back suffice
                del self._first[old]
            self._ready.notify_all()

    def take(self, key: Hashable, timeout: float, what: str) -> Any:
        with self._ready:
            if not self._ready.wait_for(lambda: key in self._items, timeout=timeout):
                raise InputTimeout(f"waited {timeout:.0f}s (run.rpc_timeout) for {what}")
            return self._items.pop(key)

    def contains(self, key: Hashable) -> bool:
        with self._ready:
            return key in self._items

    def first_after(self, plan_id: int) -> float | None:
        """When the first delivery for a plan after `plan_id` came, if one has."""
        with self._ready:
            times = [t for plan, t in self._first.items() if plan > plan_id]
            return min(times) if times else None

    def has_later_plan(self, plan_id: int) -> bool:
        """Whether anything arrived for a plan after `plan_id` (the next iteration's input)."""
        with self._ready:
            return any(key[0] > plan_id for key in self._items)  # type: ignore[index]


class RpcChannel:
    """A stage's tensors to and from its neighbours: sent as `deliver` calls to their workers,
    received from this worker's mailbox (with the RPC timeout as the deadline)."""

    def __init__(self, transport: WorkerTransport, mailbox: Mailbox, rank: int,
                 layout: Layout = SINGLE) -> None:
        self.transport = transport
        self.mailbox = mailbox
        # The neighbours are the stages above and below in this replica's own pipeline.
        self.layout, self.replica = layout, layout.replica_of(rank)
        self._sends: list[Future] = []
        # Fill steps run on a thread of the lowest CPU priority: where stage processes share
        # cores (more stages than cores) they take only time no other stage wants.
        self._filler = ThreadPoolExecutor(1, f"stage{rank}-fill", _lowest_priority)

    def receive(self, key: MailKey, source: int, what: str) -> Any:
        if self.layout.replicas > 1:  # name the neighbour's replica and its real rank
            rank = self.layout.rank(source, self.replica)
            what = what.replace(f"stage {source} (rank {source})",
                                f"{self.layout.name(rank)} (rank {rank})")
        return self.mailbox.take(key, self.transport.timeout, what)

    def send(self, stage: int, key: MailKey, payload: Any) -> None:
        rank = self.layout.rank(stage, self.replica)
        self._sends.append(self.transport.call_async(rank, "deliver", key, payload))

    def flush(self) -> None:
        for future in self._sends:  # a neighbour that died shows up here at the latest
            future.wait()
        self._sends.clear()

    def arrived(self, key: MailKey | None, plan_id: int) -> bool:
        if key is not None:  # evaluation follows in this plan
            return self.mailbox.contains(key)
        return self.mailbox.has_later_plan(plan_id)

    def arrival(self, plan_id: int) -> float | None:
        return self.mailbox.first_after(plan_id)

    def fill_step(self, step: Callable[[], int]) -> int:
        return self._filler.submit(step).result()


class ReplicaExecutor(StageExecutor):
    """A replica's executor: after a pass's last backward the stage's gradient is summed over
    its replicas (the stage optimizer's `after_backward`), before any update or command reads
    it."""

    def handler(self, kind: ActionKind) -> Handler:
        perform = super().handler(kind)
        if kind != BACKWARD:
            return perform

        def backward_then_reduce(run: PlanRun, action: Action) -> str:
            detail = perform(run, action)
            later = run.plan.actions[run.position + 1:]
            if not any(a.kind == BACKWARD for a in later):
                run.stage.optimizer.after_backward()
            return detail

        return backward_then_reduce


class StageWorker:
    """Holds one Stage and runs plans on it, one at a time, in plan order.

    RPC delivers calls on many threads; `run_plan` only queues, and a single executor thread
    runs the queued plans by plan id, so the stage sees exactly the schedule's order.
    Activations go up and gradients down straight to the neighbouring stage's mailbox.
    """

    def __init__(self, stage: Stage, transport: WorkerTransport, rank: int,
                 host: str | None = None, layout: Layout = SINGLE) -> None:
        self.stage = stage
        self.transport = transport
        self.rank = rank
        self.layout = layout
        self.replica = layout.replica_of(rank) if layout.replicas > 1 else None
        self.host = host or socket.gethostname()
        self.mailbox = Mailbox()
        channel = RpcChannel(transport, self.mailbox, rank, layout)
        executor = ReplicaExecutor if layout.replicas > 1 else StageExecutor
        self.executor = executor(stage, channel)
        # With replicas, the coordinator's first call (describe) waits for the stage group.
        self._ready = threading.Event()
        if layout.replicas == 1:
            self._ready.set()
        self._queue: dict[int, tuple[Plan, Future]] = {}
        self._queued = threading.Condition()
        self._next_plan = 0
        self._closed = False
        threading.Thread(target=self._run, name=f"stage{rank}-executor", daemon=True).start()

    def attach_group(self, reducer: Any) -> None:
        """The stage's replicas as its optimizer's reducer; from now on the stage takes plans."""
        self.stage.optimizer.reducer = reducer  # type: ignore[attr-defined]
        self._ready.set()

    # ------------------------------------------------------------------------ RPC surface
    def describe(self) -> dict[str, Any]:
        if not self._ready.wait(self.transport.timeout):
            raise RuntimeError("the stage group did not form within run.rpc_timeout")
        return {"stage": self.stage.index, "replica": self.replica or 0, "host": self.host,
                "device": str(self.transport.device),
                "parameters": num_params(self.stage.module)}

    def ping(self) -> int:
        """The heartbeat: answered by the RPC threads, also while the executor works."""
        return self.rank

    def deliver(self, key: Hashable, payload: Any) -> None:
        self.mailbox.put(key, payload)
        # On this RPC thread: a gradient's note may free what the optimizer holds for its
        # decision, which nothing reads again before this stage's next update (a later plan).
        self.executor.arrived(key, payload)

    def run_plan(self, plan: Plan) -> Future:
        done: Future = Future()
        with self._queued:
            self._queue[plan.plan_id] = (plan, done)
            self._queued.notify_all()
        return done

    def close(self) -> None:
        """Stop the executor thread (it would otherwise go on checking on the coordinator)."""
        with self._queued:
            self._closed = True
            self._queued.notify_all()

    # --------------------------------------------------------------------------- executor
    def _run(self) -> None:
        while True:
            with self._queued:
                while not self._queued.wait_for(
                        lambda: self._closed or self._next_plan in self._queue,
                        timeout=self.transport.timeout):
                    self._check_coordinator()
                if self._closed:
                    return
                plan, done = self._queue.pop(self._next_plan)
            done.set_result(self._execute(plan))
            self._next_plan += 1

    def _check_coordinator(self) -> None:
        """No plan for run.rpc_timeout: leave if the coordinator (rank 0) stopped answering,
        rather than wait for it forever."""
        if self.rank == 0:
            return
        try:
            self.transport.call_async(0, "ping").wait()
        except Exception as err:
            text = str(err).strip().splitlines()
            print(f"sm-dist: error: {self.layout.name(self.rank)} (rank {self.rank} on "
                  f"{self.host}): the coordinator (rank 0) stopped answering "
                  f"({text[0] if text else type(err).__name__}); leaving", file=sys.stderr,
                  flush=True)
            os._exit(1)

    def _execute(self, plan: Plan) -> PlanResult | RemoteFailure:
        try:
            return self.executor.run(plan)
        except Exception:
            return RemoteFailure.capture(self.stage.index, self.rank, self.host, self.replica)
