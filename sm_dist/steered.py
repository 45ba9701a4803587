"""Optimizers the coordinator steers pass by pass after each backward: GD+Armijo and SSO."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sm_dist.config import JobConfig
from sm_dist.math.line_search import ArmijoRule, armijo_backtrack
from sm_dist.pipeline import Microbatches, Pipeline


@dataclass
class SteeredStep:
    """What the steps after an iteration's backward did, and the passes they cost."""

    record: dict[str, Any]
    forward_passes: int  # forward-only trials and forward halves of surrogate passes
    backward_passes: int


class GlobalArmijo:
    """GD+Armijo: θ ← θ − α∇h; each trial α is a forward-only pass; α doubles per iteration."""

    def __init__(self, job: JobConfig) -> None:
        cfg = job.optimizer
        self.rule = ArmijoRule(c=cfg.armijo_c, beta=cfg.armijo_beta)
        self.next_step = cfg.armijo_init

    def step(self, pipeline: Pipeline, iteration: int, microbatches: Microbatches, n: int,
             loss: float) -> SteeredStep:
        grad_sq = pipeline.grad_sq_norm()
        result = armijo_backtrack(
            lambda a: pipeline.trial_loss(iteration, a, microbatches, n).loss,
            loss, grad_sq, self.next_step, self.rule)
        # The last trial evaluated is the accepted one, so its parameters are already in place.
        pipeline.end_trial(iteration, result.accepted)
        if result.accepted:
            self.next_step = 2.0 * result.step
        record = {"step_size": result.step if result.accepted else 0.0,
                  "line_search_trials": result.trials, "grad_norm": math.sqrt(grad_sq)}
        return SteeredStep(record, result.trials, 0)


class SurrogateSteps:
    """SSO (Lavington et al. 2023): N gradient steps on one surrogate of the whole network,

        q(θ) = ⟨∇ℓ(z_p^t), f(θ) − z_p^t⟩ + (1/2η)‖f(θ) − z_p^t‖²,   1/η = sso_scale·L_loss/n,

    built at θ_t by the iteration's forward pass. q(θ_t) = 0 and ∇q(θ_t) = ∇h(θ_t), so the
    iteration's own backward gives the first step's gradient; every later step costs one
    forward and one backward pass whose output gradient is ∇ℓ(z_p^t) + (f(θ) − z_p^t)/η (no new
    loss evaluation). Step sizes: `inner_lr` if set, else an Armijo search on q (each trial one
    forward-only pass) starting from twice the last accepted step, as GD+Armijo does.
    """

    def __init__(self, job: JobConfig, num_stages: int) -> None:
        cfg = job.optimizer
        assert isinstance(cfg.inner_steps, int), "the config check requires a fixed count"
        self.steps = cfg.inner_steps
        self.fixed_step = cfg.inner_lr
        self.rule = ArmijoRule(c=cfg.armijo_c, beta=cfg.armijo_beta)
        self.next_step = cfg.armijo_init
        self.num_stages = num_stages

    def step(self, pipeline: Pipeline, iteration: int, microbatches: Microbatches, n: int,
             loss: float) -> SteeredStep:
        value, grad_sq = 0.0, pipeline.grad_sq_norm()
        first_grad_norm = math.sqrt(grad_sq)
        taken = trials = passes = 0
        step_size, stopped = 0.0, None
        for k in range(self.steps):
            if k > 0:
                value = pipeline.surrogate_pass(iteration, microbatches, n).loss
                grad_sq = pipeline.grad_sq_norm()
                passes += 1
            if grad_sq == 0.0:
                stopped = "zero gradient"
                pipeline.end_trial(iteration, False)
                break
            if self.fixed_step is not None:
                pipeline.take_step(iteration, self.fixed_step)
                step_size = self.fixed_step
                taken += 1
                continue
            result = armijo_backtrack(
                lambda a: pipeline.trial_loss(iteration, a, microbatches, n, surrogate=True).loss,
                value, grad_sq, self.next_step, self.rule)
            trials += result.trials
            pipeline.end_trial(iteration, result.accepted)
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


def make_steered(job: JobConfig, num_stages: int) -> GlobalArmijo | SurrogateSteps | None:
    """The coordinator's loop for optimizers that need it; None for those that update
    inside the pipeline (their next iteration can be submitted before this one ends)."""
    if job.optimizer.name == "gd_armijo":
        return GlobalArmijo(job)
    if job.optimizer.name == "sso":
        return SurrogateSteps(job, num_stages)
    return None
