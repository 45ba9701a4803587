"""Surrogate Minimization (the paper's form): each stage minimises its own local loss, built
from the backward's Hessian-vector products, for N inner steps with no communication."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sm_dist.math.curvature import (
    damped_curvature,
    initial_vectors,
    power_iteration,
    reduce_eigenvalues,
)
from sm_dist.math.local_loss import LocalLoss, PartFunction, flatten, unflatten
from sm_dist.math.solvers import GradientDescentArmijo, TruncatedCG
from sm_dist.math.stage_function import RecomputedStageFunction, StageFunction
from sm_dist.optim.base import BackwardKeeps, BaseStageOptimizer, Optimizer, StageReport
from sm_dist.optim.fill_budget import FillBudget
from sm_dist.optim.inner_loop import BUILD, InnerLoopMetrics, InnerLoopReport, inner_loop_fields
from sm_dist.optim.options import (
    ArmijoOptions,
    InnerLoopOptions,
    InnerStepsConfig,
    OptimizerOptions,
    check_inner_steps,
)
from sm_dist.pipeline.actions import (
    APPLY,
    FILL_COLOUR,
    UPDATE_COLOUR,
    Action,
    ActionKind,
    Direction,
    register_kind,
)
from sm_dist.pipeline.executor import Handler, PlanRun
from sm_dist.pipeline.schedule import UpdateActions
from sm_dist.pipeline.stage import MicrobatchStash, Stage

INNER = register_kind(ActionKind("I", "inner steps", Direction.LOCAL, "update", UPDATE_COLOUR,
                                 "update", after_backward=True, counts_steps=True))
# Inner steps while the stage's next input has not arrived: they fill a bubble (spec §5).
FILL = register_kind(ActionKind("W", "fill inner steps", Direction.LOCAL, "update (fill)",
                                FILL_COLOUR, "fill", after_backward=True, fills_idle=True,
                                counts_steps=True, step_cost_of="I"))


@dataclass(kw_only=True)
class SMOptions(InnerLoopOptions, ArmijoOptions):
    """SM's local losses (spec §2): curvature, damping, cubic term, inner solver."""
    # A fixed step for the gradient inner solver; None = Armijo search on the local loss.
    inner_lr: float | None = field(default=None, metadata={"gt": 0})
    cg_tol: float = field(default=1e-10, metadata={"min": 0})
    inner_solver: str = field(default="cg", metadata={"choices": ("cg", "gradient")})
    curvature: str = field(
        default="sample", metadata={"choices": ("sample", "microbatch", "batch")})
    delta_rel: float = field(default=0.3, metadata={"min": 0})
    delta_abs: float = field(default=0.0, metadata={"min": 0})
    delta_floor: float = field(default=1e-12, metadata={"gt": 0})
    rho: float = field(default=0.0, metadata={"min": 0})
    power_iterations: int = field(default=10, metadata={"min": 1})
    # Keep each microbatch's power-iteration vectors (one input-sized tensor) for the next
    # iteration's warm start; null: keep them unless `recompute`, whose purpose is memory and
    # on whose smallest stages they would be most of what SM adds (docs/performance.md).
    power_warm_start: bool | None = None
    # Keep only each microbatch's input from the forward on and rebuild its graph when the
    # backward and each product need it, instead of keeping all their graphs through the
    # backward and the update (memory for time; docs/performance.md has the measurements).
    recompute: bool = False

    def __post_init__(self) -> None:
        if self.power_warm_start is None:  # resolved here, so config.yaml records the choice
            self.power_warm_start = not self.recompute


def sm_update_actions(stage: int, steps: int, fill_up_to: int = 0) -> list[Action]:
    """L, I<steps>, then (fill mode, stages above the first) W<fill_up_to>, then A. Stage 0
    gets its next input from the coordinator at once: it has no bubble to fill."""
    actions = [Action(BUILD), Action(INNER, steps)]
    if fill_up_to and stage > 0:
        actions.append(Action(FILL, fill_up_to))
    return actions + [Action(APPLY)]


class SMStageOptimizer(BaseStageOptimizer):
    """SM on one stage: curvature sent down in the backward, L_s built from its stage
    functions, N inner steps on it, then θ ← θ_t + d."""

    keeps = BackwardKeeps.CURVATURE

    def __init__(self, owner: Optimizer, stage: Stage) -> None:
        super().__init__(owner, stage)
        self.options: SMOptions = owner.config  # type: ignore[assignment]
        self.functions: dict[int, PartFunction] = {}  # type: ignore[assignment]
        self.deltas: dict[int, Tensor] = {}  # per microbatch: the δ of its samples
        self.eigenvalues: dict[int, Tensor] = {}  # curvature: batch, until the last backward
        self.max_curvature_sent: float | None = None
        self.power_vectors: dict[int, Tensor] = {}  # warm starts, kept across iterations
        self.solver: TruncatedCG | GradientDescentArmijo | None = None
        self.next_step = self.options.armijo_init  # gradient inner solver: kept across iterations
        self.psi_products = 0  # Ψ products since the start (power iteration and inner loops)
        self._products_before = 0
        self.budget = FillBudget()  # fill mode: the bubble and step time it last measured
        self._last_fill: tuple[int, float] | None = None  # (plan, start) of the last fill

    # ---------------------------------------------------------------------------- backward
    def backward(self, j: int, entry: MicrobatchStash, g_out: Tensor, c_out: Tensor | None,
                 same_batch: bool) -> tuple[Tensor | None, Tensor | None]:
        assert c_out is not None, "SM needs the curvature from the stage above"
        fn = self.keep_function(j, entry, g_out, c_out)
        if self.stage.is_first:
            self._maybe_release_graph(j, g_out, c_out)
            return None, None
        g_in = fn.gradients()[0]
        lam = self._eigenvalues(j, fn, same_batch)
        self._maybe_release_graph(j, g_out, c_out)
        if self.options.curvature == "batch":
            self.eigenvalues[j] = lam
            return g_in, None
        return g_in, self._damp(j, reduce_eigenvalues(lam, self.options.curvature))

    def keeps_forward_graph(self) -> bool:
        return not self.options.recompute

    def _maybe_release_graph(self, j: int, g_out: Tensor, c_out: Tensor) -> None:
        """With `recompute`, keep microbatch j's Ψ as its input and (g, c) from here on."""
        fn = self.functions[j]
        if self.options.recompute and isinstance(fn, StageFunction):
            self.functions[j] = RecomputedStageFunction(self.stage.module, fn, g_out, c_out)

    def release_held(self) -> dict[int, Tensor]:
        """With `curvature: batch`, the c_in of every microbatch from the batch's largest λ
        (over every replica's share of the batch)."""
        lam_max = torch.stack([lam.max() for lam in self.eigenvalues.values()]).max()
        lam_max = self.reducer.all_reduce_max(lam_max.reshape(1))[0]
        return {j: self._damp(j, lam_max.expand_as(lam).clone())
                for j, lam in self.eigenvalues.items()}

    def _eigenvalues(self, j: int, fn: StageFunction, same_batch: bool) -> Tensor:
        assert fn.grad_z is not None
        start = self.power_vectors.pop(j, None)  # its buffer becomes the new vectors'
        if not (self.options.power_warm_start and same_batch and start is not None
                and start.shape == fn.grad_z.shape):
            start = self._random_start(fn.grad_z)
        products = fn.products
        lam, vectors = power_iteration(fn.hvp_zz, start, self.options.power_iterations,
                                       reuse_start=True)
        self.psi_products += fn.products - products
        if self.options.power_warm_start:  # an input-sized tensor per microbatch, kept
            self.power_vectors[j] = vectors
        return lam

    def _random_start(self, like: Tensor) -> Tensor:
        """Random unit rows for a power iteration; with replicas, this replica's rows of the
        ones the whole microbatch gets (every replica draws them all from the stage's seed,
        as one pipeline does), so that each sample starts where it would in one pipeline."""
        reducer = self.reducer
        if reducer.size == 1:
            return initial_vectors(like, self.stage.generator)
        count = torch.tensor([float(like.shape[0])], dtype=torch.float64, device=like.device)
        rows = int(reducer.all_reduce_sum(count)[0])
        whole = initial_vectors(like.new_empty((rows, *like.shape[1:])), self.stage.generator)
        # The parts torch.tensor_split gives (engine/replicas.py): the first rows % size one
        # row longer.
        size, r = reducer.size, reducer.index
        offset = r * (rows // size) + min(r, rows % size)
        return whole[offset:offset + like.shape[0]]

    def _damp(self, j: int, lam: Tensor) -> Tensor:
        cfg = self.options
        if cfg.curvature == "microbatch" and self.reducer.size > 1 and lam.numel():
            # The largest λ of the whole microbatch j, over every replica's part of it.
            lam = self.reducer.all_reduce_max(lam.max().reshape(1)).expand_as(lam).clone()
        c, delta = damped_curvature(lam, delta_rel=cfg.delta_rel, delta_abs=cfg.delta_abs,
                                    delta_floor=cfg.delta_floor)
        self.deltas[j] = delta
        top = float(c.max()) if c.numel() else 0.0
        self.max_curvature_sent = max(top, self.max_curvature_sent or 0.0)
        return c

    # ---------------------------------------------------------------------------- update
    def begin(self) -> None:
        """Build the local loss from this iteration's backward (spec §2, 'Local loss')."""
        stage, cfg = self.stage, self.options
        parts = [(self.functions[j], None if stage.is_first else self.deltas[j])
                 for j in sorted(self.functions)]
        grad = flatten([p.grad for p in stage.params])
        # The gradients become views of the flat copy the local loss keeps, which would
        # otherwise hold a second parameter-sized copy through the inner loop.
        for p, flat_part in zip(stage.params, unflatten(grad, stage.params), strict=True):
            p.grad = flat_part
        if self.averages_steps:  # this replica's own loss: its share of the batch as a batch
            grad = grad * self.reducer.size
        loss = LocalLoss(parts, grad, cfg.rho, self._product_reduction())
        self._products_before = sum(fn.products for fn, _ in parts)
        self.solver = self.make_solver(loss)

    def make_solver(self, loss: LocalLoss) -> TruncatedCG | GradientDescentArmijo:
        """The inner solver on this iteration's local loss (spec §2, 'Update phase')."""
        cfg = self.options
        if cfg.inner_solver == "cg":
            return TruncatedCG(loss, tol=cfg.cg_tol, armijo=cfg.armijo_rule(),
                               fallback_step=cfg.armijo_init)
        return GradientDescentArmijo(loss, armijo=cfg.armijo_rule(),
                                     initial_step=self.next_step, fixed_step=cfg.inner_lr)

    def step(self, n: int) -> int:
        """Up to n more inner steps; returns how many were taken (resumable)."""
        assert self.solver is not None, "begin() first"
        return self.solver.run(n)

    def finish(self) -> StageReport:
        """Apply d to the parameters and report."""
        assert self.solver is not None, "begin() first"
        solver, stage = self.solver, self.stage
        report = solver.report()
        stopped = report.stopped
        if not math.isfinite(report.value) or report.value > 0:
            # The model predicts the step raises the loss (it overflowed, or its curvature is
            # wrong): never apply it; this stage keeps its parameters this iteration.
            solver.d, solver.hd = torch.zeros_like(solver.d), torch.zeros_like(solver.hd)
            report = solver.report()
            stopped = "predicted increase: step not applied"
        step = self.step_to_apply(solver.d, report.value)
        with torch.no_grad():
            for p, dp in zip(stage.params, unflatten(step, stage.params)):
                p.add_(dp)
        if isinstance(solver, GradientDescentArmijo) and solver.fixed_step is None:
            self.next_step = 2.0 * solver.last_step
        products = sum(fn.products for fn in self.functions.values())
        self.psi_products += products - self._products_before  # the inner loop's
        self._report = InnerLoopReport(
            inner_steps=report.steps, local_loss=report.value,
            curvature_sent=self.max_curvature_sent, psi_products=products,
            stopped=stopped, hvp_products=products)
        self.solver = None
        return self._report

    def step_to_apply(self, d: Tensor, model_value: float) -> Tensor:
        """The change of θ_s for the inner loop's solution d (the paper: d itself; with
        replica_mode average_steps, the mean of the replicas' d)."""
        if self.averages_steps:
            return self.reducer.all_reduce_sum(d) / self.reducer.size
        return d

    # --------------------------------------------------------------------------- replicas
    @property
    def averages_steps(self) -> bool:
        """Replicas that each minimise their own local loss and average the steps."""
        return self.reducer.size > 1 and self.options.replica_mode == "average_steps"

    def _product_reduction(self) -> Callable[[Tensor], Tensor] | None:
        """What every 𝓗 product goes through: alone nothing; exact, the sum over the
        replicas (one all-reduce per inner step); average_steps, its share scaled up."""
        size = self.reducer.size
        if size == 1:
            return None
        if self.averages_steps:
            return lambda product: product * size
        return self.reducer.all_reduce_sum

    def after_backward(self) -> None:
        if not self.averages_steps:  # average_steps keeps each replica's own gradient
            super().after_backward()

    def handlers(self) -> dict[ActionKind, Handler]:
        return {BUILD: self._build, INNER: self._inner, FILL: self._fill, APPLY: self._apply}

    def _build(self, run: PlanRun, action: Action) -> str:
        self.begin()
        return ""

    def _inner(self, run: PlanRun, action: Action) -> str:
        assert action.index is not None
        return f"{self.step(action.index)} steps"

    def _fill(self, run: PlanRun, action: Action) -> str:
        """Inner steps, one at a time, while the stage's next input has not arrived (or the
        limit), and only a step that should end, with the apply after it, before that input
        arrives (FillBudget): the stage would be idle otherwise (spec §5), and is not late."""
        assert action.index is not None
        last = self._last_fill
        arrival = None if last is None else run.channel.arrival(last[0])
        self.budget.begin(time.time(), None if arrival is None else arrival - last[1])
        self._last_fill = (run.plan.plan_id, self.budget.began)
        taken = 0
        while taken < action.index and not self._fill_ends(run):
            started = time.time()
            if run.channel.fill_step(lambda: self.step(1)) == 0:
                break  # the solver has converged or stopped
            self.budget.took(time.time() - started)
            taken += 1
        return f"{taken} steps"

    def _fill_ends(self, run: PlanRun) -> bool:
        """Whether the next input is there or the next step would end past it; in exact mode
        on any replica, so that every replica takes the same fill steps (each of them is an
        all-reduce)."""
        ends = run.next_input_arrived() or not self.budget.allows(time.time())
        if self.reducer.size == 1 or self.averages_steps:
            return ends
        flag = torch.tensor([1.0 if ends else 0.0], device=self.stage.device)
        return bool(self.reducer.all_reduce_sum(flag)[0] > 0)

    def _apply(self, run: PlanRun, action: Action) -> str:
        started = time.time()
        self.finish()
        self.stage.end_iteration()
        self.budget.after = time.time() - started  # a fill before the apply leaves it room
        return ""

    def end_iteration(self) -> None:
        super().end_iteration()
        self.deltas, self.eigenvalues, self.max_curvature_sent = {}, {}, None

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step, "power_vectors": dict(self.power_vectors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = state["next_step"]
        device = self.stage.device
        self.power_vectors = {j: v.to(device) for j, v in state["power_vectors"].items()}


class SM(Optimizer):
    name = "sm"
    summary = "Surrogate Minimization: N inner steps per stage on its local loss (the paper)"
    Options = SMOptions
    Metrics = InnerLoopMetrics
    stage_optimizer = SMStageOptimizer
    kinds = (BUILD, INNER, FILL, APPLY)
    sweep = "inner_steps"
    can_average_steps = True

    @classmethod
    def check_config(cls, config: OptimizerOptions) -> list[str]:
        assert isinstance(config, SMOptions)
        errors = []
        if config.delta_rel == 0 and config.delta_abs == 0:
            errors.append("optimizer.delta_rel: delta_rel and delta_abs are both 0, so the "
                          "trust region radius δ would be 0; set delta_rel > 0 (e.g. 0.3) or "
                          "delta_abs > 0")
        errors += check_inner_steps(config)
        if config.rho > 0 and config.inner_solver != "gradient":
            errors.append(f"optimizer.rho: rho = {config.rho} needs inner_solver: gradient "
                          "(CG minimises only a quadratic); set optimizer.inner_solver: "
                          "gradient or optimizer.rho: 0")
        return errors

    def inner_step_counts(self, last: bool) -> tuple[int, int]:
        """(the inner steps every stage takes, how many more fill mode may add)."""
        steps = self.config.inner_steps
        if isinstance(steps, InnerStepsConfig):
            return steps.min, steps.max - steps.min if steps.fill_bubbles and not last else 0
        return steps, 0

    def update_actions(self, num_microbatches: int, last: bool) -> UpdateActions:
        steps, fill = self.inner_step_counts(last)
        return lambda stage: sm_update_actions(stage, steps, fill)

    def record_fields(self, reports: list[StageReport]) -> dict[str, Any]:
        return inner_loop_fields(reports)
