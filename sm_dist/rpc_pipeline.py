"""RpcPipeline: the coordinator's view of stages that live in other processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.futures import Future

from sm_dist.pipeline import (
    BatchResult,
    IterationRequest,
    IterationResult,
    Microbatches,
    eval_chunks,
)
from sm_dist.schedule import Schedule, UpdatePhase, forward_only_schedule, gpipe_schedule
from sm_dist.timeline import TimelineEvent
from sm_dist.transport import Transport
from sm_dist.updates import StageUpdateReport
from sm_dist.worker import Plan, PlanResult


@dataclass
class PendingRpcIteration:
    """An iteration whose plans are running on the stages."""

    pipeline: RpcPipeline
    futures: dict[int, Future]
    n: int

    def wait(self) -> IterationResult:
        results = self.pipeline.results(self.futures)
        last = results[self.pipeline.num_stages - 1]
        batch = BatchResult(sum(last.losses[j] for j in sorted(last.losses)),
                            sum(last.correct.values()), self.n)
        evals = [last.sums[key] for key in sorted(last.sums) if key[0] == "E"]
        test = None
        if evals:
            test = (sum(e[0] for e in evals), sum(e[1] for e in evals), sum(e[2] for e in evals))
        reports = [results[s].report or StageUpdateReport()
                   for s in range(self.pipeline.num_stages)]
        return IterationResult(batch, reports, test)


@dataclass
class PendingCommand:
    """A command sent to every stage; `wait` gives its values in stage order."""

    pipeline: RpcPipeline
    futures: dict[int, Future]

    def wait(self) -> list[Any]:
        results = self.pipeline.results(self.futures)
        return [results[s].value for s in range(self.pipeline.num_stages)]


class RpcPipeline:
    """Sends each stage its plan for every pass; the stages pass tensors among themselves.

    Rank s holds stage s. Only stage 0 gets inputs from here and only the last stage labels;
    everything in between travels stage to stage.
    """

    def __init__(self, transport: Transport, num_stages: int) -> None:
        self.transport = transport
        self.num_stages = num_stages
        self._next_plan = 0
        self.events: list[TimelineEvent] = []  # every action of every stage, for the timeline
        self.stages: dict[int, dict[str, Any]] = {
            s: transport.call(s, "describe") for s in range(num_stages)}
        transport.hosts.update({s: info["host"] for s, info in self.stages.items()})

    def _send_plans(self, iteration: int, schedule: Schedule,
                    data: dict[tuple[str, int], tuple[Tensor, Tensor]],
                    per_stage_args: list[tuple] | None = None, **options: Any
                    ) -> dict[int, Future]:
        plan_id = self._next_plan
        self._next_plan += 1
        futures = {}
        for s, actions in enumerate(schedule):
            args = per_stage_args[s] if per_stage_args is not None else ()
            plan = Plan(plan_id, iteration, actions, command_args=args, **options)
            if s == 0:
                plan.inputs = {key: x for key, (x, _) in data.items()}
            if s == self.num_stages - 1:
                plan.labels = {key: y for key, (_, y) in data.items()}
            futures[s] = self.transport.run_async(s, "run_plan", plan)
        return futures

    def results(self, futures: dict[int, Future]) -> dict[int, PlanResult]:
        results: dict[int, PlanResult] = self.transport.results(futures)
        for s in range(self.num_stages):
            self.events.extend(results[s].events)
        return results

    def submit(self, request: IterationRequest) -> PendingRpcIteration:
        chunks = eval_chunks(*request.eval_data) if request.eval_data is not None else []
        schedule = gpipe_schedule(self.num_stages, len(request.microbatches), request.update,
                                  len(chunks))
        data = {("F", j): mb for j, mb in enumerate(request.microbatches)}
        data.update({("E", k): chunk for k, chunk in enumerate(chunks)})
        futures = self._send_plans(request.iteration, schedule, data, n=request.n,
                                   same_batch=request.same_batch)
        return PendingRpcIteration(self, futures, request.n)

    def _command(self, command: str | None, per_stage_args: list[tuple] | None = None,
                 **options: Any) -> PendingCommand:
        """A plan without actions on every stage: a stage method to call (or a GD+Armijo
        trial's end), run after everything sent before it; does not wait."""
        schedule: Schedule = [[] for _ in range(self.num_stages)]
        return PendingCommand(self, self._send_plans(-1, schedule, {}, per_stage_args,
                                                    command=command, **options))

    def grad_sq_norm(self) -> float:
        return sum(self._command("grad_sq_norm").wait())

    def _forward_only(self, iteration: int, kind: str, chunks: Microbatches,
                      **options: Any) -> tuple[float, int]:
        schedule = forward_only_schedule(self.num_stages, len(chunks), kind)
        data = {(kind, k): chunk for k, chunk in enumerate(chunks)}
        results = self.results(self._send_plans(iteration, schedule, data, **options))
        sums = results[self.num_stages - 1].sums
        ordered = [sums[(kind, k)] for k in range(len(chunks))]
        return sum(s[0] for s in ordered), sum(s[1] for s in ordered)

    def trial_loss(self, iteration: int, alpha: float, microbatches: Microbatches,
                   n: int, surrogate: bool = False) -> BatchResult:
        loss_sum, correct = self._forward_only(iteration, "T", microbatches, trial_step=alpha,
                                               surrogate=surrogate)
        return BatchResult(loss_sum if surrogate else loss_sum / n, correct, n)

    def end_trial(self, iteration: int, accept: bool) -> None:
        self._command(None, end_trial=accept).wait()

    def take_step(self, iteration: int, alpha: float) -> None:
        self._command(None, trial_step=alpha, end_trial=True).wait()

    def surrogate_pass(self, iteration: int, microbatches: Microbatches, n: int) -> BatchResult:
        schedule = gpipe_schedule(self.num_stages, len(microbatches), UpdatePhase("none"))
        data = {("F", j): mb for j, mb in enumerate(microbatches)}
        futures = self._send_plans(iteration, schedule, data, n=n, surrogate=True)
        return PendingRpcIteration(self, futures, n).wait().batch  # q where the loss would be

    def evaluate(self, iteration: int, x: Tensor, y: Tensor) -> tuple[float, int]:
        return self._forward_only(iteration, "E", eval_chunks(x, y))

    def state_dicts(self) -> list[dict[str, Tensor]]:
        return self._command("state_dict").wait()

    def checkpoint(self) -> PendingCommand:
        """Every stage's checkpoint state after the plans sent so far (does not wait)."""
        return self._command("checkpoint_state")

    def restore_checkpoint(self, states: list[dict[str, Any]]) -> None:
        self._command("restore_checkpoint", [(state,) for state in states]).wait()
