"""SSO (Lavington et al. 2023, spec §6): N gradient steps on one surrogate of the whole network,

    q(θ) = ⟨∇ℓ(z_p^t), f(θ) − z_p^t⟩ + (1/2η)‖f(θ) − z_p^t‖²,   1/η = sso_scale·L_loss/n,

built at θ_t by the iteration's forward pass. q(θ_t) = 0 and ∇q(θ_t) = ∇h(θ_t), so the
iteration's own backward gives the first step's gradient; every later step costs one forward
and one backward pass whose output gradient is ∇ℓ(z_p^t) + (f(θ) − z_p^t)/η (no new loss
evaluation). Step sizes: `inner_lr` if set, else an Armijo search on q (each trial one
forward-only pass) starting from twice the last accepted step, as GD+Armijo does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sm_dist.math.line_search import armijo_backtrack
from sm_dist.math.losses import TopOfPipeline
from sm_dist.math.stage_function import per_sample
from sm_dist.optim.base import Optimizer, SteeredStep, Steering
from sm_dist.optim.inner_loop import steps_text
from sm_dist.optim.metrics import metric
from sm_dist.optim.options import (
    ArmijoOptions,
    InnerLoopOptions,
    OptimizerOptions,
    check_inner_steps,
    fixed_inner_steps,
)
from sm_dist.optim.steered import (
    LineSearchMetrics,
    StepSizeState,
    TrialStepStageOptimizer,
    end_trial,
    take_step,
    trial_loss,
)
from sm_dist.pipeline.interface import Microbatches, Pipeline

SURROGATE = "surrogate"  # the last stage's top-of-pipeline mode for q


@dataclass(kw_only=True)
class SSOOptions(InnerLoopOptions, ArmijoOptions):
    """SSO's inner steps on its surrogate: a fixed step or Armijo's search, and its scale."""
    # A fixed step for the inner steps; None = Armijo search on the surrogate.
    inner_lr: float | None = field(default=None, metadata={"gt": 0})
    # The surrogate's curvature 1/η = sso_scale · L_loss / n (>= 1 keeps it an upper bound).
    sso_scale: float = field(default=1.0, metadata={"gt": 0})


@dataclass
class SSOMetrics(LineSearchMetrics):
    """The line search's metrics and the inner steps taken on the surrogate (the same on
    every stage: the steps are pipeline passes)."""

    inner_steps: list[int] | None = metric("inner", format=steps_text, heading="inner steps",
                                           per_stage=True, line=True, column=True, mean=True)
    inner_stopped: list[str | None] | None = metric("stopped", per_stage=True)

    @classmethod
    def line_parts(cls, section: Any) -> list[str]:
        inner = section.get("inner_steps")
        steps = [f"inner {','.join(str(s) for s in inner)}"] if inner is not None else []
        return steps + super().line_parts(section)


class SSOStageOptimizer(TrialStepStageOptimizer):
    """Trial steps on every stage; on the last stage also the anchor of q: (z_p^t, ∇ℓ(z_p^t),
    1/η per sample) of each microbatch, kept for the surrogate passes of the iteration."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.anchor: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def top_of_pipeline(self, j: int, out: Tensor, y: Tensor, n: int,
                        mode: str) -> TopOfPipeline:
        if mode == SURROGATE:  # q_j at the new output, and its output gradient
            residual, g, c = self._residual(j, out)
            return TopOfPipeline(_surrogate(residual, g, c), 0, g + c * residual, None)
        top = super().top_of_pipeline(j, out, y, n, mode)
        if j == 0:
            self.anchor.clear()
        scale = self.config.sso_scale  # type: ignore[attr-defined]
        self.anchor[j] = (out, top.grad, top.curvature * scale)
        return top

    def evaluate_top(self, j: int, z: Tensor, y: Tensor, mode: str) -> tuple[float, int]:
        if mode == SURROGATE:
            return _surrogate(*self._residual(j, z)), 0
        return super().evaluate_top(j, z, y, mode)

    def _residual(self, j: int, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, g, c = self.anchor[j]
        return out.to(z.device) - z, g, per_sample(c, z)


def _surrogate(residual: Tensor, g: Tensor, c: Tensor) -> float:
    """q_j = ⟨∇ℓ(z_p^t), f(θ) − z_p^t⟩ + (1/2η)‖f(θ) − z_p^t‖²."""
    return float((g * residual).sum() + 0.5 * (c * residual * residual).sum())


class SSOSteering(StepSizeState):
    """The coordinator's inner loop on q, one pipeline pass per gradient and per trial."""

    def __init__(self, optimizer: Optimizer) -> None:
        cfg = optimizer.config
        assert isinstance(cfg.inner_steps, int), "the config check requires a fixed count"
        self.steps = cfg.inner_steps
        self.fixed_step = cfg.inner_lr
        self.rule = cfg.armijo_rule()
        self.next_step = cfg.armijo_init
        self.num_stages = optimizer.num_stages

    def step(self, pipeline: Pipeline, iteration: int, microbatches: Microbatches, n: int,
             loss: float) -> SteeredStep:
        value, grad_sq = 0.0, pipeline.grad_sq_norm()
        first_grad_norm = math.sqrt(grad_sq)
        taken = trials = passes = 0
        step_size, stopped = 0.0, None
        for k in range(self.steps):
            if k > 0:
                # q at the current θ and its gradient in every stage's p.grad: a forward and
                # backward pass whose output gradient is the surrogate's.
                value = pipeline.forward_backward(microbatches, n, top=SURROGATE,
                                                  iteration=iteration).loss
                grad_sq = pipeline.grad_sq_norm()
                passes += 1
            if grad_sq == 0.0:
                stopped = "zero gradient"
                end_trial(pipeline, False)
                break
            if self.fixed_step is not None:
                take_step(pipeline, self.fixed_step)
                step_size = self.fixed_step
                taken += 1
                continue
            result = armijo_backtrack(
                lambda a: trial_loss(pipeline, iteration, a, microbatches, n, SURROGATE).loss,
                value, grad_sq, self.next_step, self.rule)
            trials += result.trials
            end_trial(pipeline, result.accepted)
            if not result.accepted:
                stopped = "line search failed"
                break
            self.next_step = 2.0 * result.step
            value, step_size = result.value, result.step
            taken += 1
        record: dict[str, Any] = {
            "inner_steps": [taken] * self.num_stages, "step_size": step_size,
            "line_search_trials": trials, "grad_norm": first_grad_norm,
            "inner_stopped": [stopped] * self.num_stages}
        if self.fixed_step is None:  # q(θ_{t+1}) bounds h(θ_{t+1}) − h(θ_t) when sso_scale ≥ 1
            record["predicted_decrease"] = value
        return SteeredStep(record, passes + trials, passes)


class SSO(Optimizer):
    name = "sso"
    summary = "one surrogate of the whole network, N steps on it, each a pipeline pass"
    Options = SSOOptions
    Metrics = SSOMetrics
    stage_optimizer = SSOStageOptimizer
    sweep = "inner_steps"

    @classmethod
    def check_config(cls, config: OptimizerOptions) -> list[str]:
        assert isinstance(config, SSOOptions)
        return check_inner_steps(config) + fixed_inner_steps(config)

    def steering(self, minibatches: bool) -> Steering:
        return SSOSteering(self)

    def schedule_note(self, minibatches: bool) -> str:
        return (f"SSO then takes {self.config.inner_steps} steps on its surrogate: each after "
                "the first is another forward and backward pass like this one (F, B), and each "
                "Armijo trial a forward-only pass (T); the coordinator steers them, so "
                "iterations do not overlap.")
