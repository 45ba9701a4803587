"""LocalPipeline: every stage in this process, run in pipeline order (the engine's oracle)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sm_dist.math.losses import evaluate_loss
from sm_dist.pipeline import (
    BatchResult,
    Done,
    IterationRequest,
    IterationResult,
    Microbatches,
    eval_chunks,
)
from sm_dist.stage import PipelineStage
from sm_dist.timeline import TimelineEvent
from sm_dist.updates import (
    ArmijoTrialUpdate,
    BlockCGUpdate,
    SurrogateUpdate,
    TorchOptimizerUpdate,
)


class LocalPipeline:
    """Runs the stages of one pipeline in one process, in the order GPipe would.

    Forward of every microbatch through every stage, then the backward stage by stage from the
    top (microbatches in reverse order, as GPipe's drain does); within a stage that is the same
    order of gradient accumulation as the distributed schedule, so both give the same numbers.
    There are no bubbles in one process, so `fill_bubbles` runs each stage's minimum.
    """

    def __init__(self, stages: list[PipelineStage]) -> None:
        self.stages = stages
        self.num_stages = len(stages)
        self.events: list[TimelineEvent] = []  # one process has no pipeline timeline

    @property
    def last(self) -> PipelineStage:
        return self.stages[-1]

    def submit(self, request: IterationRequest) -> Done:
        batch = self.forward_backward(request.microbatches, request.n, request.same_batch)
        update = request.update
        if update.kind == "cgblock":
            self.block_cg(update.steps, len(request.microbatches))
        for stage in self.stages:
            rule = stage.update
            if update.kind == "sm":
                assert isinstance(rule, SurrogateUpdate)
                rule.begin()
                rule.step(update.steps)
                rule.finish()
            elif update.kind == "step":
                assert isinstance(rule, TorchOptimizerUpdate)
                rule.step()
        reports = [stage.update_report() for stage in self.stages]
        if update.kind != "none":  # GD+Armijo keeps its gradient for the trial steps
            self.end_iteration()
        test = None
        if request.eval_data is not None:
            x, y = request.eval_data
            test = (*self.evaluate(request.iteration, x, y), len(x))
        return Done(IterationResult(batch, reports, test))

    def block_cg(self, steps: int, num_microbatches: int) -> None:
        """CGBlock's update: `steps` CG steps on every stage, one tangent pass each."""
        rules = [stage.update for stage in self.stages]
        assert all(isinstance(rule, BlockCGUpdate) for rule in rules)
        for rule in rules:
            rule.begin()  # type: ignore[union-attr]
        for _ in range(steps):
            self.tangent_pass(num_microbatches)
            for rule in rules:
                rule.advance()  # type: ignore[union-attr]
        for rule in rules:
            rule.finish()  # type: ignore[union-attr]

    def tangent_pass(self, num_microbatches: int) -> None:
        """Every stage's block product H_ss v_s for its current CG direction v_s, in the order
        the engine's J and H actions run (so the products are summed in the same order)."""
        tangents: dict[int, dict[int, Tensor]] = {}
        for j in range(num_microbatches):
            carried: dict[int, Tensor] = {}
            for stage in self.stages:
                carried = stage.tangent_forward(j, carried)
            tangents[j] = carried
        for stage in reversed(self.stages):
            for j in reversed(range(num_microbatches)):
                tangents[j] = stage.tangent_backward(j, tangents[j])

    def surrogate_pass(self, iteration: int, microbatches: Microbatches, n: int) -> BatchResult:
        """SSO: q at the current θ and its gradient in every stage's p.grad (one forward and
        one backward pass whose output gradient is the surrogate's)."""
        return self.forward_backward(microbatches, n, same_batch=False, surrogate=True)

    def forward_backward(self, microbatches: Microbatches, n: int, same_batch: bool,
                         surrogate: bool = False) -> BatchResult:
        loss, correct = 0.0, 0
        grads: dict[int, Tensor | None] = {}
        curvatures: dict[int, Tensor | None] = {}
        for j, (x, y) in enumerate(microbatches):
            for stage in self.stages:
                x = stage.forward_microbatch(j, x, y if stage.is_last else None)
            if surrogate:
                grads[j], loss_part = self.last.surrogate_top(j)
                curvatures[j] = None
                loss += loss_part
                continue
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

    def grad_sq_norm(self) -> float:
        return sum(stage.grad_sq_norm() for stage in self.stages)

    def trial_loss(self, iteration: int, alpha: float, microbatches: Microbatches,
                   n: int, surrogate: bool = False) -> BatchResult:
        """h(θ − α∇h) by one forward-only pass (GD+Armijo's trial step); with `surrogate`,
        SSO's q(θ − α∇q) instead."""
        self._set_step(alpha)
        if surrogate:
            with torch.no_grad():
                values = [self.last.surrogate_value(j, self._forward_stages(x))
                          for j, (x, _) in enumerate(microbatches)]
            return BatchResult(sum(values), 0, n)
        loss_sum, correct = 0.0, 0
        for x, y in microbatches:
            part, right = self._forward_only(x, y)
            loss_sum += part
            correct += right
        return BatchResult(loss_sum / n, correct, n)

    def take_step(self, iteration: int, alpha: float) -> None:
        """θ ← θ − α·(the gradient in p.grad), with no trial pass (SSO's fixed inner step)."""
        self._set_step(alpha)
        self.end_trial(iteration, True)

    def _set_step(self, alpha: float) -> None:
        for stage in self.stages:
            assert isinstance(stage.update, ArmijoTrialUpdate)
            stage.update.set_step(alpha)

    def end_trial(self, iteration: int, accept: bool) -> None:
        for stage in self.stages:
            stage.end_trial(accept)

    def end_iteration(self) -> None:
        for stage in self.stages:
            stage.end_iteration()

    def evaluate(self, iteration: int, x: Tensor, y: Tensor) -> tuple[float, int]:
        """Summed loss and correct predictions over a data set, forward-only, in chunks."""
        loss_sum, correct = 0.0, 0
        for xs, ys in eval_chunks(x, y):
            part, right = self._forward_only(xs, ys)
            loss_sum += part
            correct += right
        return loss_sum, correct

    def _forward_stages(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            for stage in self.stages:
                x = stage.forward_only(x)
        return x

    def _forward_only(self, x: Tensor, y: Tensor) -> tuple[float, int]:
        z = self._forward_stages(x)
        assert self.last.loss is not None
        return evaluate_loss(self.last.loss, z, y)

    def state_dicts(self) -> list[dict[str, Tensor]]:
        return [stage.state_dict() for stage in self.stages]

    def checkpoint(self) -> Done:
        return Done([stage.checkpoint_state() for stage in self.stages])

    def restore_checkpoint(self, states: list[dict[str, Any]]) -> None:
        for stage, state in zip(self.stages, states, strict=True):
            stage.restore_checkpoint(state)
