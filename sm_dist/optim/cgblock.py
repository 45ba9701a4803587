"""CGBlock (spec §6): truncated CG per stage on H_ss d = −g_θ, H_ss = ∂²h/∂θ_s² the stage's
diagonal block of the whole network's Hessian. Each product needs the rest of the network:
one tangent pass of the pipeline per CG step gives every stage its H_ss v_s at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sm_dist.math.local_loss import BlockModel, flatten, unflatten
from sm_dist.math.losses import LossCurvature, TopOfPipeline
from sm_dist.math.solvers import TruncatedCG
from sm_dist.optim.base import BackwardKeeps, BaseStageOptimizer, Optimizer, StageReport
from sm_dist.optim.inner_loop import BUILD, InnerLoopMetrics, InnerLoopReport, inner_loop_fields
from sm_dist.optim.options import (
    ArmijoOptions,
    InnerLoopOptions,
    OptimizerOptions,
    check_inner_steps,
    fixed_inner_steps,
)
from sm_dist.pipeline.actions import (
    APPLY,
    TANGENT_COLOUR,
    UPDATE_COLOUR,
    Action,
    ActionKind,
    Direction,
    register_kind,
)
from sm_dist.pipeline.executor import Handler, PlanRun
from sm_dist.pipeline.schedule import UpdateActions
from sm_dist.pipeline.stage import Stage

# A tangent pass: J carries tangents of microbatch j up, H their gradient changes down; C is
# one CG step with the product the pass left. Their `step` is the CG step they belong to.
TANGENT_FORWARD = register_kind(ActionKind(
    "J", "tangent forward", Direction.UP, "tangent pass", TANGENT_COLOUR, "tangent",
    after_backward=True, needs_before="L"))
TANGENT_BACKWARD = register_kind(ActionKind(
    "H", "tangent backward", Direction.DOWN, "tangent pass", TANGENT_COLOUR, "tangent",
    after_backward=True, needs_before="L"))
CG_STEP = register_kind(ActionKind("C", "CG step", Direction.LOCAL, "update", UPDATE_COLOUR,
                                   "update", after_backward=True))


@dataclass(kw_only=True)
class CGBlockOptions(InnerLoopOptions, ArmijoOptions):
    """CG's tolerance and the block's damping (Armijo's rule for CG's first-step fallback)."""
    cg_tol: float = field(default=1e-10, metadata={"min": 0})
    # CG on (H_ss + cgblock_damping·I) d = −g_θ; 0 is the paper's plain block Newton.
    cgblock_damping: float = field(default=0.0, metadata={"min": 0})


def tangent_pass(num_microbatches: int, step: int = 0) -> list[Action]:
    """One GPipe-shaped pass of tangents: J up for every microbatch, then H down."""
    return ([Action(TANGENT_FORWARD, j, step=step) for j in range(num_microbatches)]
            + [Action(TANGENT_BACKWARD, j, step=step)
               for j in reversed(range(num_microbatches))])


def cg_update_actions(steps: int, num_microbatches: int) -> list[Action]:
    """L, then per CG step a tangent pass and a C, then A."""
    passes = [action for k in range(steps)
              for action in (*tangent_pass(num_microbatches, k), Action(CG_STEP, step=k))]
    return [Action(BUILD), *passes, Action(APPLY)]


class BlockCGStageOptimizer(BaseStageOptimizer):
    """CG on this stage's block; the stage offers its direction to each tangent pass and takes
    the product after it. Same CG rules as SM's inner solver (tolerance, negative curvature,
    Armijo fallback).

    A tangent pass (Pearlmutter's R-operator, stage by stage): stage s starts a tangent J_θ v_s,
    stages above carry it forward (J_z u), the top applies ∂²h/∂z², and the backward carries it
    down (J_zᵀ r + H_zz u) to stage s, which ends it with J_θᵀ r + H_θθ v_s. Tangents are keyed
    by the stage that started them.
    """

    keeps = BackwardKeeps.GRAPH

    def __init__(self, owner: Optimizer, stage: Stage) -> None:
        super().__init__(owner, stage)
        self.damping: float = owner.config.cgblock_damping  # type: ignore[attr-defined]
        self.solver: TruncatedCG | None = None
        self.loss_curvature: dict[int, LossCurvature] = {}  # last stage, per microbatch
        self.tangent_inputs: dict[tuple[int, int], Tensor] = {}  # (source, j)
        self.block_product: Tensor | None = None  # Σ_j of this pass's H_ss v_s, flat
        self.tangent_products = 0  # tangents carried through this stage, per microbatch
        self._tangents_before = 0
        self._started = 0

    def top_of_pipeline(self, j: int, out: Tensor, y: Tensor, n: int,
                        mode: str) -> TopOfPipeline:
        top = super().top_of_pipeline(j, out, y, n, mode)
        assert self.stage.loss is not None
        self.loss_curvature[j] = LossCurvature(self.stage.loss, out, y, n)
        return top

    # ---------------------------------------------------------------------------- CG
    def direction(self) -> list[Tensor] | None:
        """The CG direction this stage's tangent starts from; None once CG has stopped."""
        if self.solver is None or self.solver.stopped is not None:
            return None
        return unflatten(self.solver.p, self.stage.params)

    def handlers(self) -> dict[ActionKind, Handler]:
        return {BUILD: self._begin, TANGENT_FORWARD: self._tangent_forward,
                TANGENT_BACKWARD: self._tangent_backward, CG_STEP: self._advance,
                APPLY: self._finish}

    def begin(self) -> None:
        """Start CG on the block model from this iteration's gradient."""
        grad = flatten([p.grad for p in self.stage.params])
        self.solver = TruncatedCG(BlockModel(grad), tol=self.config.cg_tol,
                                  armijo=self.config.armijo_rule(),
                                  fallback_step=self.config.armijo_init)
        self._tangents_before = self.tangent_products
        self._started = 0

    def take_block_product(self) -> Tensor | None:
        """Σ_j H_ss v_s of the last tangent pass (None if it carried no tangent of this stage)."""
        product, self.block_product = self.block_product, None
        return product

    def _begin(self, run: PlanRun, action: Action) -> str:
        self.begin()
        return ""

    def _tangent_forward(self, run: PlanRun, action: Action) -> str:
        """Carry the tangents from below through microbatch j and start this stage's own."""
        stage, j = self.stage, action.index
        assert j is not None
        incoming: dict[int, Tensor] = {}
        if not stage.is_first:
            incoming = run.from_below(action, "the tangents")
        fn = self.functions[j]
        out: dict[int, Tensor] = {}
        for source, u in incoming.items():
            u = u.to(stage.device)
            self.tangent_inputs[(source, j)] = u
            out[source] = fn.tangent(u, None)
        own = self.direction()
        if own is not None:
            out[stage.index] = fn.tangent(None, own)
        if stage.is_last:  # turn each tangent of z_p into the change of ∂h/∂z_p
            curvature = self.loss_curvature[j]
            run.tops[(TANGENT_FORWARD, j, action.step)] = {
                source: curvature.product(t) for source, t in out.items()}
        else:
            run.send_up(action, out)
        return ""

    def _tangent_backward(self, run: PlanRun, action: Action) -> str:
        """Carry each tangent's gradient change down through microbatch j; this stage's own
        ends here and adds its H_ss v_s share to the pass's block product."""
        stage, j = self.stage, action.index
        assert j is not None
        if stage.is_last:
            incoming = run.tops.pop((TANGENT_FORWARD, j, action.step))
        else:
            incoming = run.from_above(action, "the tangents")
        fn = self.functions[j]
        down: dict[int, Tensor] = {}
        for source, rg in incoming.items():
            rg = rg.to(stage.device)
            self.tangent_products += 1
            if source == stage.index:
                own = self.direction()
                assert own is not None
                product = flatten(fn.tangent_params(rg, own))
                self.block_product = (product if self.block_product is None
                                      else self.block_product.add_(product))
            else:
                down[source] = fn.tangent_input(rg, self.tangent_inputs.pop((source, j)))
        if not stage.is_first:
            run.send_down(action, down)
        return ""

    def _advance(self, run: PlanRun, action: Action) -> str:
        """One CG step with the block product the last tangent pass left."""
        product = self.take_block_product()
        if product is None:  # stopped before this pass: it started no tangent
            return ""
        assert self.solver is not None
        self._started += 1
        # H_ss v_s sums over samples: over every replica's share of the batch (they stop CG
        # together, since every scalar of CG then comes from the same reduced vectors).
        product = self.reducer.all_reduce_sum(product)
        if self.damping:
            product = product.add(self.solver.p, alpha=self.damping)
        self.solver.advance(product)
        return ""

    def _finish(self, run: PlanRun, action: Action) -> str:
        assert self.solver is not None
        with torch.no_grad():
            for p, dp in zip(self.stage.params, unflatten(self.solver.d, self.stage.params)):
                p.add_(dp)
        report = self.solver.report()
        self._report = InnerLoopReport(
            inner_steps=report.steps, local_loss=report.value, stopped=report.stopped,
            hvp_products=self.tangent_products - self._tangents_before,
            tangents_started=self._started)
        self.solver = None
        self.stage.end_iteration()
        return ""

    def end_iteration(self) -> None:
        super().end_iteration()
        self.loss_curvature, self.tangent_inputs, self.block_product = {}, {}, None


class CGBlock(Optimizer):
    name = "cgblock"
    summary = "CG per stage on its diagonal block of the network's Hessian (tangent passes)"
    Options = CGBlockOptions
    Metrics = InnerLoopMetrics
    stage_optimizer = BlockCGStageOptimizer
    kinds = (BUILD, TANGENT_FORWARD, TANGENT_BACKWARD, CG_STEP, APPLY)
    sweep = "inner_steps"

    @classmethod
    def check_config(cls, config: OptimizerOptions) -> list[str]:
        assert isinstance(config, CGBlockOptions)
        return check_inner_steps(config) + fixed_inner_steps(config)

    def update_actions(self, num_microbatches: int, last: bool) -> UpdateActions:
        steps = self.config.inner_steps
        assert isinstance(steps, int), "the config check requires a fixed count"
        return lambda stage: cg_update_actions(steps, num_microbatches)

    def record_fields(self, reports: list[StageReport]) -> dict[str, Any]:
        return inner_loop_fields(reports)
