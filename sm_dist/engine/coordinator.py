"""RpcPipeline: the coordinator's view of stages that live in other processes."""

from __future__ import annotations

from typing import Any, Protocol

from torch.futures import Future

from sm_dist.engine.layout import Layout
from sm_dist.engine.replicas import merge_results, split_plan
from sm_dist.pipeline.executor import Plan, PlanResult
from sm_dist.pipeline.interface import Pending, Pipeline


class CoordinatorTransport(Protocol):
    """What the coordinator needs of rank 0's endpoint (engine/transport.py, or a loopback)."""

    hosts: dict[int, str]

    def call(self, rank: int, method: str, *args: Any) -> Any: ...
    def run_async(self, rank: int, method: str, *args: Any) -> Future: ...
    def results(self, futures: dict[int, Future]) -> dict[int, Any]: ...


class _PendingPlans:
    """Plans running on the stages; `wait` gives their results in stage order (and keeps
    their timeline events), or raises the StageError of the first stage that failed."""

    def __init__(self, pipeline: RpcPipeline, futures: dict[int, Future],
                 command: str | None = None) -> None:
        self.pipeline, self.futures, self.command = pipeline, futures, command

    def wait(self) -> list[PlanResult]:
        results = self.pipeline.transport.results(self.futures)
        layout = self.pipeline.layout
        ordered = [merge_results([results[rank] for rank in layout.group(s)], self.command)
                   for s in range(self.pipeline.num_stages)]
        self.pipeline.events.add([e for result in ordered for e in result.events])
        return ordered


class RpcPipeline(Pipeline):
    """Sends each stage its plan for every pass; the stages pass tensors among themselves.

    Rank s·R + r holds replica r of stage s (R = 1: rank s holds stage s). Every plan id goes
    to every stage (with no actions where a stage has nothing to do), so that the ids stay
    aligned across stages; with replicas each gets its share of the data (engine/replicas.py).
    """

    measures_timeline = True

    def __init__(self, transport: CoordinatorTransport, num_stages: int,
                 layout: Layout | None = None) -> None:
        super().__init__(num_stages)
        self.transport = transport
        self.layout = layout or Layout(num_stages)
        self.ranks: dict[int, dict[str, Any]] = {
            rank: transport.call(rank, "describe") for rank in range(self.layout.world_size)}
        transport.hosts.update({rank: info["host"] for rank, info in self.ranks.items()})
        # Each stage as its first replica describes it (the others hold the same layers).
        self.stages = {s: self.ranks[self.layout.rank(s)] for s in range(num_stages)}

    def _dispatch(self, plans: list[Plan]) -> Pending[list[PlanResult]]:
        layout = self.layout
        futures = {}
        for s, plan in enumerate(plans):
            parts = [plan] if layout.replicas == 1 else split_plan(plan, layout.replicas)
            for r, part in enumerate(parts):
                futures[layout.rank(s, r)] = self.transport.run_async(
                    layout.rank(s, r), "run_plan", part)
        command = plans[0].command.method if plans and plans[0].command else None
        return _PendingPlans(self, futures, command)
