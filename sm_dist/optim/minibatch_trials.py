"""sm_adaptive's step acceptance on minibatches: a forward-only trial of the same minibatch.

In full batch the next iteration's forward pass measures a step for free; with minibatches it
measures the next batch, so it cannot judge the step. Here the coordinator measures the step
on the minibatch that proposed it, after the update: the loss h_B(θ_t + α·d) against the
h_B(θ_t) the iteration's forward measured. A rise beyond `accept_tolerance` moves every stage
to θ_t + α'·d with α' = retry_scale(...) and measures again, up to `minibatch_trials` trials;
when none is accepted the stages go back to θ_t. The next α comes from `scale_rule`, as in
full batch. One forward-only pass per iteration when the step holds; iterations no longer
overlap (the next one waits for the decision).
"""

from __future__ import annotations

from typing import Any

from sm_dist.optim.base import Optimizer, SteeredStep
from sm_dist.optim.step_scale import judge_step
from sm_dist.pipeline.actions import TRIAL
from sm_dist.pipeline.executor import Call
from sm_dist.pipeline.interface import Microbatches, Pipeline


class MinibatchTrials:
    """The coordinator's trials of each minibatch step (sm_adaptive, batches that change)."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.config: Any = optimizer.config  # sm_adaptive's SMAdaptiveOptions

    def step(self, pipeline: Pipeline, iteration: int, microbatches: Microbatches, n: int,
             loss: float) -> SteeredStep:
        cfg = self.config
        models = pipeline.command(Call("step_model", on_optimizer=True)).wait()
        model = sum(m[0] for m in models)  # Σ_s L_s(d_s), at unit scale
        slope = sum(m[1] for m in models)  # Σ_s g_s·d_s
        scale = models[-1][2]  # the α the update applied
        before: tuple[Call, ...] = ()
        rejected: list[float] = []
        for trial in range(1, cfg.minibatch_trials + 1):
            loss_sum, _ = pipeline.forward_pass(iteration, TRIAL, microbatches, before=before)
            measured = loss_sum / n
            decision = judge_step(cfg, scale, loss, measured, model, slope)
            if decision.accept:
                return self._end(pipeline, trial, scale, decision.scale, measured, rejected,
                                 model)
            rejected.append(measured)
            scale = decision.scale
            before = (Call("retry_step", (scale,), on_optimizer=True),)
        # No trial held: back to θ_t; the next iteration starts from the last, smaller α.
        pipeline.command(Call("retry_step", (0.0,), on_optimizer=True)).wait()
        return self._end(pipeline, cfg.minibatch_trials, 0.0, scale, None, rejected, model)

    @staticmethod
    def _end(pipeline: Pipeline, trials: int, applied: float, following: float,
             measured: float | None, rejected: list[float], model: float) -> SteeredStep:
        pipeline.command(Call("end_step_trials", (following,), on_optimizer=True)).wait()
        record: dict[str, Any] = {"step_scale": applied, "step_rejected": bool(rejected),
                                  "line_search_trials": trials, "trial_loss": measured,
                                  "predicted_decrease": applied * model}
        if rejected:
            record["rejected_loss"] = rejected[0]
        return SteeredStep(record, trials, 0)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the scale lives in the stages' optimizer parts (and their checkpoints)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
