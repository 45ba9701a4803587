"""LocalPipeline: every stage in this process, run in pipeline order (the engine's oracle)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sm_dist.math.losses import evaluate_loss
from sm_dist.stage import PipelineStage
from sm_dist.updates import (
    ArmijoTrialUpdate,
    StageUpdateReport,
    SurrogateUpdate,
    TorchOptimizerUpdate,
)

Microbatches = list[tuple[Tensor, Tensor]]


@dataclass
class BatchResult:
    """What one forward pass measured: h at the iterate (Σ ℓ / n) and the correct predictions."""

    loss: float
    correct: int
    samples: int


class LocalPipeline:
    """Runs the stages of one pipeline in one process, in the order GPipe would.

    Forward of every microbatch through every stage, then the backward stage by stage from the
    top (microbatches in reverse order, as GPipe's drain does); within a stage that is the same
    order of gradient accumulation as the distributed schedule, so both give the same numbers.
    """

    def __init__(self, stages: list[PipelineStage]) -> None:
        self.stages = stages

    @property
    def last(self) -> PipelineStage:
        return self.stages[-1]

    def forward_backward(self, microbatches: Microbatches, n: int,
                         same_batch: bool) -> BatchResult:
        loss, correct = 0.0, 0
        grads: dict[int, Tensor | None] = {}
        curvatures: dict[int, Tensor | None] = {}
        for j, (x, y) in enumerate(microbatches):
            for stage in self.stages:
                x = stage.forward_microbatch(j, x, y if stage.is_last else None)
            g, c, part, right = self.last.top_of_pipeline(j, n)
            grads[j], curvatures[j] = g, c
            loss += part
            correct += right
        for stage in reversed(self.stages):
            for j in reversed(range(len(microbatches))):
                grads[j], curvatures[j] = stage.backward_microbatch(j, grads[j], curvatures[j],
                                                                    same_batch)
            late = stage.finish_backward()
            if late is not None:
                curvatures.update(late)
        return BatchResult(loss, correct, n)

    def sm_update(self, inner_steps: int) -> list[StageUpdateReport]:
        reports = []
        for stage in self.stages:
            rule = stage.update
            assert isinstance(rule, SurrogateUpdate)
            rule.begin()
            rule.step(inner_steps)
            reports.append(rule.finish())
        return reports

    def optimizer_step(self) -> None:
        for stage in self.stages:
            assert isinstance(stage.update, TorchOptimizerUpdate)
            stage.update.step()

    def grad_sq_norm(self) -> float:
        return sum(stage.grad_sq_norm() for stage in self.stages)

    def trial_loss(self, alpha: float, microbatches: Microbatches, n: int) -> BatchResult:
        """h(θ_t − α∇h) by one forward-only pass (GD+Armijo's trial step)."""
        for stage in self.stages:
            assert isinstance(stage.update, ArmijoTrialUpdate)
            stage.update.set_step(alpha)
        loss_sum, correct = 0.0, 0
        for x, y in microbatches:
            part, right = self._forward_only(x, y)
            loss_sum += part
            correct += right
        return BatchResult(loss_sum / n, correct, n)

    def end_trial(self, accept: bool) -> None:
        for stage in self.stages:
            assert isinstance(stage.update, ArmijoTrialUpdate)
            stage.update.end_trial(accept)

    def end_iteration(self) -> None:
        for stage in self.stages:
            stage.end_iteration()

    def evaluate(self, x: Tensor, y: Tensor, chunk: int = 8192) -> tuple[float, int]:
        """Summed loss and correct predictions over a data set, forward-only, in chunks."""
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), chunk):
            part, right = self._forward_only(x[start:start + chunk], y[start:start + chunk])
            loss_sum += part
            correct += right
        return loss_sum, correct

    def _forward_only(self, x: Tensor, y: Tensor) -> tuple[float, int]:
        with torch.no_grad():
            for stage in self.stages:
                x = stage.forward_only(x)
        assert self.last.loss is not None
        return evaluate_loss(self.last.loss, x, y)

    def reports(self) -> list[StageUpdateReport]:
        return [stage.update_report() for stage in self.stages]
