"""RpcPipeline: the coordinator's view of stages that live in other processes."""

from __future__ import annotations

from typing import Any, Protocol

from torch.futures import Future

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

    def __init__(self, pipeline: RpcPipeline, futures: dict[int, Future]) -> None:
        self.pipeline, self.futures = pipeline, futures

    def wait(self) -> list[PlanResult]:
        results = self.pipeline.transport.results(self.futures)
        ordered = [results[s] for s in range(self.pipeline.num_stages)]
        self.pipeline.events.add([e for result in ordered for e in result.events])
        return ordered


class RpcPipeline(Pipeline):
    """Sends each stage its plan for every pass; the stages pass tensors among themselves.

    Rank s holds stage s. Every plan id goes to every stage (with no actions where a stage has
    nothing to do), so that the ids stay aligned across stages.
    """

    measures_timeline = True

    def __init__(self, transport: CoordinatorTransport, num_stages: int) -> None:
        super().__init__(num_stages)
        self.transport = transport
        self.stages: dict[int, dict[str, Any]] = {
            s: transport.call(s, "describe") for s in range(num_stages)}
        transport.hosts.update({s: info["host"] for s, info in self.stages.items()})

    def _dispatch(self, plans: list[Plan]) -> Pending[list[PlanResult]]:
        futures = {s: self.transport.run_async(s, "run_plan", plan)
                   for s, plan in enumerate(plans)}
        return _PendingPlans(self, futures)
