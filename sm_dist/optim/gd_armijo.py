"""GD+Armijo (spec §6): θ ← θ − α∇h, α from a backtracking search on the whole network's loss,
each trial a forward-only pipeline pass; α doubles before each iteration."""

from __future__ import annotations

import math

from sm_dist.math.line_search import armijo_backtrack
from sm_dist.optim.base import Optimizer, SteeredStep, Steering
from sm_dist.optim.options import ArmijoOptions
from sm_dist.optim.steered import (
    LineSearchMetrics,
    StepSizeState,
    TrialStepStageOptimizer,
    end_trial,
    trial_loss,
)
from sm_dist.pipeline.interface import Microbatches, Pipeline


class ArmijoSteering(StepSizeState):
    """The coordinator's line search: trials until Armijo's test holds, the last one kept."""

    def __init__(self, optimizer: Optimizer) -> None:
        cfg = optimizer.config
        self.rule = cfg.armijo_rule()
        self.next_step = cfg.armijo_init

    def step(self, pipeline: Pipeline, iteration: int, microbatches: Microbatches, n: int,
             loss: float) -> SteeredStep:
        grad_sq = pipeline.grad_sq_norm()
        result = armijo_backtrack(
            lambda a: trial_loss(pipeline, iteration, a, microbatches, n).loss,
            loss, grad_sq, self.next_step, self.rule)
        # The last trial evaluated is the accepted one, so its parameters are already in place.
        end_trial(pipeline, result.accepted)
        if result.accepted:
            self.next_step = 2.0 * result.step
        record = {"step_size": result.step if result.accepted else 0.0,
                  "line_search_trials": result.trials, "grad_norm": math.sqrt(grad_sq)}
        return SteeredStep(record, result.trials, 0)


class GDArmijo(Optimizer):
    name = "gd_armijo"
    summary = "gradient descent with an Armijo line search on the loss (forward-only trials)"
    Options = ArmijoOptions
    Metrics = LineSearchMetrics
    stage_optimizer = TrialStepStageOptimizer

    def steering(self, minibatches: bool) -> Steering:
        return ArmijoSteering(self)

    def schedule_note(self, minibatches: bool) -> str:
        return ("GD+Armijo then runs forward-only trial passes (T) until its line search "
                "accepts a step; they depend on the loss, so iterations do not overlap.")
