"""What the optimizers the coordinator steers by line searches (GD+Armijo, SSO) share: trial
steps on every stage, the passes that try them, and the line search's metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sm_dist.optim.base import BaseStageOptimizer
from sm_dist.optim.metrics import OptimizerMetrics, Section, metric
from sm_dist.pipeline.actions import TRIAL
from sm_dist.pipeline.executor import Call
from sm_dist.pipeline.interface import BatchResult, Microbatches, Pipeline


@dataclass
class LineSearchMetrics(OptimizerMetrics):
    """The step the line search accepted (0 when none was), its trial passes, and the norm of
    the gradient it searched along."""

    step_size: float | None = metric("step", format=".3g")
    line_search_trials: int | None = metric("trials")
    grad_norm: float | None = metric("grad norm", format=".3e")

    @classmethod
    def line_parts(cls, section: Section) -> list[str]:
        """"step 0.5 (3 trials)"."""
        if section.get("step_size") is None:
            return []
        return [f"step {section['step_size']:.3g} ({section.get('line_search_trials')} trials)"]

    @classmethod
    def summary_items(cls, section: Section, counts: dict[str, int]) -> list[str]:
        items = cls.line_parts(section)
        if section.get("grad_norm") is not None:
            items.append(f"grad norm {section['grad_norm']:.3e}")
        return items


class TrialStepStageOptimizer(BaseStageOptimizer):
    """θ = θ_t − α·(the gradient in p.grad) for the trial steps the coordinator chooses."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.base: list[Tensor] | None = None

    def set_step(self, alpha: float) -> None:
        params = self.stage.params
        with torch.no_grad():
            if self.base is None:
                self.base = [p.detach().clone() for p in params]
            for p, base in zip(params, self.base):
                torch.add(base, p.grad, alpha=-alpha, out=p)

    def end_trial(self, accept: bool) -> None:
        """Keep the last trial step, or go back to θ_t; then the iteration is over."""
        if self.base is not None and not accept:
            with torch.no_grad():
                for p, base in zip(self.stage.params, self.base):
                    p.copy_(base)
        self.base = None
        self.stage.end_iteration()


def set_step(alpha: float) -> Call:
    return Call("set_step", (alpha,), on_optimizer=True)


def trial_loss(pipeline: Pipeline, iteration: int, alpha: float, microbatches: Microbatches,
               n: int, top: str = "loss") -> BatchResult:
    """h(θ − α∇h) by one forward-only pass (GD+Armijo's trial step); with another `top`, what
    the last stage's optimizer part computes there instead (SSO's q, not divided by n)."""
    loss_sum, correct = pipeline.forward_pass(iteration, TRIAL, microbatches,
                                              before=(set_step(alpha),), top=top)
    return BatchResult(loss_sum / n if top == "loss" else loss_sum, correct, n)


def end_trial(pipeline: Pipeline, accept: bool) -> None:
    pipeline.command(Call("end_trial", (accept,), on_optimizer=True)).wait()


def take_step(pipeline: Pipeline, alpha: float) -> None:
    """θ ← θ − α·(the gradient in p.grad), with no trial pass (a fixed step)."""
    pipeline.command(Call("end_trial", (True,), on_optimizer=True),
                     before=(set_step(alpha),)).wait()


class StepSizeState:
    """The coordinator's state of a steered optimizer: the next line search's first step."""

    next_step: float

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = state["next_step"]
