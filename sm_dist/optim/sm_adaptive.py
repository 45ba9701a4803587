"""SM with an adaptive model scale and step acceptance (extensions of the paper, spec §8).

Each stage minimises its local loss as in `sm` (optionally by Steihaug-Toint CG within a trust
radius, warm-started from its previous step) and applies α·d, where α, one scale for the
whole pipeline, is the local models' scale: α·d minimises the models with their curvature
divided by α, and their predicted change is α·Σ_s L_s(d_s). The next iteration's forward pass
measures what the step did. Its last stage compares the loss with the last accepted one:

- a rise (beyond `accept_tolerance`) rejects the step: every stage goes back to θ_t, skips
  the rest of the iteration (its backward and inner loop) and tries θ_t + α'·d with a smaller
  α' instead, which the following forward pass measures in turn;
- otherwise the step is accepted and `scale_rule` sets the next α from the measurement.

What the decision needs travels with the pipeline's own messages, so the common case costs
nothing and iterations still overlap: each stage adds its L_s(d_s) and g_s·d_s to the note
that goes up with microbatch 0's activation; the top of the pipeline sends the decision and
the new α down with the gradients. With minibatches the next forward pass sees another batch
and cannot judge the step: the coordinator measures it on its own minibatch instead, by
forward-only trials (optim/minibatch_trials.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sm_dist.math.local_loss import LocalLoss, flatten, unflatten
from sm_dist.math.losses import TopOfPipeline
from sm_dist.math.solvers import GradientDescentArmijo, TruncatedCG
from sm_dist.optim.base import MicrobatchStash, Optimizer, StageReport
from sm_dist.optim.inner_loop import BUILD, InnerLoopMetrics, InnerLoopReport
from sm_dist.optim.metrics import Section, metric
from sm_dist.optim.minibatch_trials import MinibatchTrials
from sm_dist.optim.options import OptimizerOptions
from sm_dist.optim.sm import FILL, INNER, SM, SMOptions, SMStageOptimizer, sm_update_actions
from sm_dist.optim.step_scale import SCALE_RULES, Decision, judge_step
from sm_dist.pipeline.actions import APPLY, Action, ActionKind
from sm_dist.pipeline.executor import Handler, PlanRun
from sm_dist.pipeline.schedule import UpdateActions
from sm_dist.pipeline.stage import Stage


@dataclass(kw_only=True)
class SMAdaptiveOptions(SMOptions):
    """sm_adaptive's extensions; each can be switched off to get back towards `sm`."""
    accept_steps: bool = True  # reject a step whose loss rises, and retry a smaller one
    accept_tolerance: float = field(default=0.0, metadata={"min": 0})  # relative rise allowed
    scale_rule: str = field(default="secant", metadata={"choices": SCALE_RULES})
    step_scale: float = field(default=1.0, metadata={"gt": 0})  # α at the start
    scale_growth: float = field(default=2.0, metadata={"gt": 1})  # at most ×/÷ this per step
    scale_max: float = field(default=1000.0, metadata={"gt": 0})
    # Steihaug-Toint CG: ‖d_s‖ ≤ trust_radius·‖θ_s‖ on every stage; null: plain CG.
    trust_radius: float | None = field(default=0.1, metadata={"gt": 0})
    warm_start: float = field(default=0.0, metadata={"min": 0, "max": 1})  # CG from w·d_{t-1}
    # γ: the curvature the top of the pipeline sends down is γ·L_loss/n (1: the spec's bound).
    loss_curvature_scale: float = field(default=0.1, metadata={"gt": 0})
    # Minibatches: forward-only trials of the same minibatch that judge each step, at most
    # this many per iteration (optim/minibatch_trials.py); 0 accepts every step unmeasured.
    minibatch_trials: int = field(default=3, metadata={"min": 0})


@dataclass
class AdaptiveReport(InnerLoopReport):
    """A stage's report with the pipeline-wide step decision the top of it made."""

    scale: float = 1.0  # α of the step applied at the end of this iteration
    rejected: bool = False  # this iteration measured a rejected step
    actual: float | None = None  # what the measured step changed (last stage only)
    ratio: float | None = None  # actual / predicted (last stage only)
    predicted: float | None = None  # α·Σ L_s of the step applied now (last stage only)
    loss: float | None = None  # the accepted iterate's loss and accuracy (last stage only)
    acc: float | None = None
    trial_loss: float | None = None  # the rejected step's measured loss (last stage only)


@dataclass
class AdaptiveMetrics(InnerLoopMetrics):
    """The inner loops' section, and the pipeline's step decision: the scale α of the step
    applied; whether this iteration's forward pass measured a step that was rejected (the
    record's train_loss is then the accepted iterate's, and rejected_loss what the rejected
    step measured); on minibatches, the minibatch's loss after the step kept (trial_loss) and
    the forward-only trials that judged it."""

    counted = ("step_rejected",)
    step_scale: float | None = metric("scale", format=".3g")
    step_rejected: bool | None = metric("step rejected")
    rejected_loss: float | None = metric("rejected loss", format=".4g")
    trial_loss: float | None = metric("trial loss", format=".4g")
    line_search_trials: int | None = metric("trials")

    @classmethod
    def line_parts(cls, section: Section) -> list[str]:
        """"scale 4.25 (2 trials, step rejected)" after the inner loops' parts."""
        parts = super().line_parts(section)
        if section.get("step_scale") is not None:
            trials = section.get("line_search_trials")
            notes = [f"{trials} trials"] if trials else []
            notes += ["step rejected"] if section.get("step_rejected") else []
            parts.append(f"scale {section['step_scale']:.3g}"
                         + (f" ({', '.join(notes)})" if notes else ""))
        return parts

    @classmethod
    def summary_items(cls, section: Section, counts: dict[str, int]) -> list[str]:
        if section.get("step_scale") is None:
            return []
        return [f"scale {section['step_scale']:.3g}, {counts.get('step_rejected', 0)} rejected"]


class AdaptiveStageOptimizer(SMStageOptimizer):
    """SM on one stage plus the step held for acceptance, the scale, and the notes."""

    def __init__(self, owner: Optimizer, stage: Stage) -> None:
        super().__init__(owner, stage)
        self.adaptive: SMAdaptiveOptions = owner.config  # type: ignore[assignment]
        self.scale = self.adaptive.step_scale
        self.base: list[Tensor] | None = None  # θ before the step last applied
        self.last_d: Tensor | None = None  # that step's direction d (flat, unit scale)
        self.last_model = 0.0  # L_s(d) of it
        self.last_slope = 0.0  # g_s·d of it
        self.last_scale = 1.0  # the α it was applied with
        self.pending = False  # a step was applied that no forward pass has measured yet
        self.accepted_loss: float | None = None  # last stage: h at the accepted iterate
        self.accepted_acc: float | None = None
        self._below = (0.0, 0.0)  # Σ_{r<s} (L_r, g_r·d_r), from the stage below
        self._loss, self._correct, self._samples = 0.0, 0, 0  # last stage, this iteration
        self._decision: Decision | None = None

    # ------------------------------------------------------------------------- notes
    def forward_note(self, j: int) -> Any:
        if j != 0:
            return None
        model, slope = self._below
        return (model + self.last_model, slope + self.last_slope)

    def take_forward_note(self, j: int, note: Any) -> None:
        if j == 0:
            self._below = note if note is not None else (0.0, 0.0)
            self._loss, self._correct, self._samples = 0.0, 0, 0
            self._decision = None

    def top_of_pipeline(self, j: int, out: Tensor, y: Tensor, n: int,
                        mode: str) -> TopOfPipeline:
        top = super().top_of_pipeline(j, out, y, n, mode)
        top.curvature = top.curvature * self.adaptive.loss_curvature_scale
        self._loss += float(top.loss)
        self._correct += top.correct
        self._samples = n
        return top

    def backward_note(self, j: int, same_batch: bool) -> Any:
        if self._decision is None:
            self._decision = self._decide(same_batch)
            self._release_if_accepted(self._decision)
        return self._decision

    def take_backward_note(self, j: int, note: Any) -> None:
        self._decision = note
        self._release_if_accepted(note)

    def note_arrived(self, note: Any) -> None:
        # The decision frees the held step as soon as it is delivered: stage 0 would otherwise
        # hold it beside every gradient that arrives before its first backward runs.
        self._release_if_accepted(note)

    def _release_if_accepted(self, decision: Decision | None) -> None:
        """An accepted step is never undone: θ before it, and its direction unless CG starts
        from it, are freed before the drain rather than held through it (two parameter-sized
        tensors, the largest of stage 0's backward peak beside sm_kron's Gram inverse)."""
        if isinstance(decision, Decision) and decision.accept:
            self.base = None
            if not self.adaptive.warm_start:
                self.last_d = None

    # ---------------------------------------------------------------------- decision
    def _decide(self, same_batch: bool) -> Decision:
        """Top of the pipeline: accept or reject the step this forward pass measured (with
        replicas, from the whole batch's loss, so that every replica decides the same)."""
        if self.reducer.size > 1:
            total = self.reducer.all_reduce_sum(torch.tensor(
                [self._loss, float(self._correct)], dtype=torch.float64, device=self.stage.device))
            self._loss, self._correct = float(total[0]), float(total[1])
        loss, acc = self._loss, self._correct / max(self._samples, 1)
        if not (self.pending and same_batch and self.accepted_loss is not None):
            self._accept(loss, acc)  # nothing to judge: the first step, or a new batch
            return Decision(True, self.scale)
        decision = judge_step(self.adaptive, self.last_scale, self.accepted_loss, loss,
                              self._below[0] + self.last_model, self._below[1] + self.last_slope)
        if decision.accept:
            self._accept(loss, acc)
        return decision

    def _accept(self, loss: float, acc: float) -> None:
        self.accepted_loss, self.accepted_acc = loss, acc

    @property
    def rejected(self) -> bool:
        return self._decision is not None and not self._decision.accept

    # ------------------------------------------------------------------------ backward
    def backward(self, j: int, entry: MicrobatchStash, g_out: Tensor, c_out: Tensor | None,
                 same_batch: bool) -> tuple[Tensor | None, Tensor | None]:
        if self.rejected:  # nothing of this iteration is needed: drop its graph at once
            return None, None
        return super().backward(j, entry, g_out, c_out, same_batch)

    def sends_curvature(self) -> bool:
        return not self.rejected

    def skips_backward(self) -> bool:
        return self.rejected

    # -------------------------------------------------------------------------- update
    def make_solver(self, loss: LocalLoss) -> TruncatedCG | GradientDescentArmijo:
        cfg = self.adaptive
        if cfg.inner_solver != "cg":
            return super().make_solver(loss)
        radius = None
        if cfg.trust_radius is not None:
            norm = float(flatten([p.detach() for p in self.stage.params]).norm())
            radius = cfg.trust_radius * norm
        start = None
        if cfg.warm_start and self.last_d is not None:
            start = cfg.warm_start * self.last_d
        return TruncatedCG(loss, tol=cfg.cg_tol, armijo=cfg.armijo_rule(),
                           fallback_step=cfg.armijo_init, radius=radius, start=start)

    def step_to_apply(self, d: Tensor, model_value: float) -> Tensor:
        # g·d from a flat copy of the gradient, freed before the copies the step is held by
        self.last_slope = float(flatten([p.grad for p in self.stage.params]) @ d)
        self.base = [p.detach().clone() for p in self.stage.params]
        self.last_d, self.last_model = d.clone(), model_value
        assert self._decision is not None
        self.scale = self.last_scale = self._decision.scale
        self.pending = True
        return d * self.scale

    # Commands of the minibatch trials (optim/minibatch_trials.py), after the update.
    def step_model(self) -> tuple[float, float, float]:
        """(L_s(d), g_s·d, α) of the step applied last."""
        return self.last_model, self.last_slope, self.last_scale

    def retry_step(self, scale: float) -> None:
        """θ ← θ_t + scale·d (0: back to θ_t)."""
        assert self.base is not None and self.last_d is not None
        with torch.no_grad():
            for p, base, dp in zip(self.stage.params, self.base,
                                   unflatten(self.last_d, self.stage.params)):
                torch.add(base, dp, alpha=scale, out=p)

    def end_step_trials(self, following: float) -> None:
        """The step is decided (no forward pass will judge it again); α for the next one."""
        self.scale, self.pending = following, False

    def handlers(self) -> dict[ActionKind, Handler]:
        return {**super().handlers(), BUILD: self._build_unless_rejected,
                INNER: self._inner_unless_rejected, FILL: self._fill_unless_rejected,
                APPLY: self._apply_or_retry}

    # A rejected step skips the iteration's update: its actions say so ("skipped"), and the
    # simulator replays them as free.
    def _build_unless_rejected(self, run: PlanRun, action: Action) -> str:
        return "skipped" if self.rejected else self._build(run, action)

    def _inner_unless_rejected(self, run: PlanRun, action: Action) -> str:
        return "skipped" if self.rejected else self._inner(run, action)

    def _fill_unless_rejected(self, run: PlanRun, action: Action) -> str:
        return "skipped" if self.rejected else self._fill(run, action)

    def _apply_or_retry(self, run: PlanRun, action: Action) -> str:
        if not self.rejected:
            self._apply(run, action)
            self._report = self._adaptive_report(self._report)
            return ""
        decision = self._decision
        assert decision is not None
        last_iteration = action.index == 1  # end on the accepted iterate, not a new trial
        self.retry_step(0.0 if last_iteration else decision.scale)
        self.last_scale, self.pending = decision.scale, not last_iteration
        self._report = self._adaptive_report(InnerLoopReport(backward_passes=0))
        self.stage.end_iteration()
        return "rejected"

    def _adaptive_report(self, report: StageReport) -> AdaptiveReport:
        decision = self._decision
        assert decision is not None
        extra: dict[str, Any] = {}
        if self.stage.is_last:
            extra = {"actual": decision.actual, "ratio": decision.ratio,
                     "loss": self.accepted_loss, "acc": self.accepted_acc}
            if not decision.accept:  # the retry: the previous step's models at the new α
                extra.update(predicted=decision.scale * (self._below[0] + self.last_model),
                             trial_loss=self._loss)
        return AdaptiveReport(**vars(report), scale=decision.scale,
                              rejected=not decision.accept, **extra)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scale": self.scale, "base": self.base,
                "last_d": self.last_d, "last_model": self.last_model,
                "last_slope": self.last_slope, "last_scale": self.last_scale,
                "pending": self.pending, "accepted_loss": self.accepted_loss,
                "accepted_acc": self.accepted_acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.stage.device
        self.scale, self.pending = state["scale"], state["pending"]
        self.base = None if state["base"] is None else [t.to(device) for t in state["base"]]
        self.last_d = None if state["last_d"] is None else state["last_d"].to(device)
        self.last_model, self.last_slope = state["last_model"], state["last_slope"]
        self.last_scale = state["last_scale"]
        self.accepted_loss, self.accepted_acc = state["accepted_loss"], state["accepted_acc"]


class SMAdaptive(SM):
    name = "sm_adaptive"
    summary = ("SM with an adaptive model scale and step acceptance: the loss never rises in "
               "full batch, nor on the minibatch that proposed a step")
    Options = SMAdaptiveOptions
    Metrics = AdaptiveMetrics
    stage_optimizer = AdaptiveStageOptimizer
    can_average_steps = False  # one accept-or-reject decision needs one model of the step

    def _judges_by_trials(self, minibatches: bool) -> bool:
        """With minibatches the coordinator judges each step by a trial (and so steers)."""
        cfg = self.config
        assert isinstance(cfg, SMAdaptiveOptions)
        return minibatches and cfg.accept_steps and cfg.minibatch_trials > 0

    def steering(self, minibatches: bool) -> MinibatchTrials | None:
        return MinibatchTrials(self) if self._judges_by_trials(minibatches) else None

    def schedule_note(self, minibatches: bool) -> str | None:
        if not self._judges_by_trials(minibatches):
            return None
        return ("With minibatches, sm_adaptive then runs a forward-only trial pass (T) of the "
                "same minibatch to judge the step (more if it is rejected); it depends on the "
                "loss, so iterations do not overlap.")

    def update_actions(self, num_microbatches: int, last: bool) -> UpdateActions:
        minimum, fill = self.inner_step_counts(last)
        # The last iteration's A is A1: a rejected step there goes back to the accepted iterate.
        return lambda stage: [*sm_update_actions(stage, minimum, fill)[:-1],
                              Action(APPLY, 1 if last else None)]

    def record_fields(self, reports: list[StageReport]) -> dict[str, Any]:
        fields = super().record_fields(reports)
        top = reports[-1]
        assert isinstance(top, AdaptiveReport)
        fields.update(step_scale=top.scale, step_rejected=top.rejected,
                      actual_decrease_prev=top.actual, decrease_ratio_prev=top.ratio)
        if top.rejected:  # the model is back at the accepted iterate: report its loss
            fields.update(predicted_decrease=top.predicted, train_loss=top.loss,
                          train_acc=top.acc, rejected_loss=top.trial_loss)
        else:  # the step applied now, at its scale
            fields["predicted_decrease"] = top.scale * fields["predicted_decrease"]
        return fields

    @classmethod
    def check_config(cls, config: OptimizerOptions) -> list[str]:
        errors = super().check_config(config)
        assert isinstance(config, SMAdaptiveOptions)
        if config.trust_radius is not None and config.inner_solver != "cg":
            errors.append("optimizer.trust_radius: a trust radius needs inner_solver: cg; set "
                          "optimizer.inner_solver: cg or optimizer.trust_radius: null")
        return errors
