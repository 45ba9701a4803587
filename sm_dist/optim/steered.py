"""What the optimizers the coordinator steers (GD+Armijo, SSO) share: trial steps on every
stage, and the passes that try them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sm_dist.optim.base import StageRule
from sm_dist.pipeline.actions import ActionKind
from sm_dist.pipeline.executor import Call
from sm_dist.pipeline.interface import BatchResult, Microbatches, Pipeline


class TrialStepRule(StageRule):
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
    return Call("set_step", (alpha,), on_rule=True)


def trial_loss(pipeline: Pipeline, iteration: int, alpha: float, microbatches: Microbatches,
               n: int, top: str = "loss") -> BatchResult:
    """h(θ − α∇h) by one forward-only pass (GD+Armijo's trial step); with another `top`, what
    the last stage's rule computes there instead (SSO's q, which is not divided by n)."""
    loss_sum, correct = pipeline.forward_pass(iteration, ActionKind.TRIAL, microbatches,
                                              before=(set_step(alpha),), top=top)
    return BatchResult(loss_sum / n if top == "loss" else loss_sum, correct, n)


def end_trial(pipeline: Pipeline, accept: bool) -> None:
    pipeline.command(Call("end_trial", (accept,), on_rule=True)).wait()


def take_step(pipeline: Pipeline, alpha: float) -> None:
    """θ ← θ − α·(the gradient in p.grad), with no trial pass (a fixed step)."""
    pipeline.command(Call("end_trial", (True,), on_rule=True), before=(set_step(alpha),)).wait()


class StepSizeState:
    """The coordinator's state of a steered optimizer: the next line search's first step."""

    next_step: float

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = state["next_step"]
