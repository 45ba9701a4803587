"""Per-stage update rules: SM's local losses, CGBlock's CG, torch optimizers, trial steps."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sm_dist.config import STEERED_OPTIMIZERS, OptimizerConfig
from sm_dist.math.line_search import ArmijoRule
from sm_dist.math.local_loss import BlockModel, LocalLoss, flatten, unflatten
from sm_dist.math.solvers import GradientDescentArmijo, TruncatedCG

if TYPE_CHECKING:
    from sm_dist.stage import PipelineStage


@dataclass
class StageUpdateReport:
    """What one stage's update did this iteration (for metrics and the monitor)."""

    inner_steps: int = 0
    local_loss: float | None = None  # L_s(d_s) after the inner loop
    curvature_sent: float | None = None  # the largest c this stage sent down
    psi_products: int = 0  # Ψ Hessian-vector products this iteration, backward included
    stopped: str | None = None  # why the inner solver stopped early, if it did
    # Second-order products this stage computed this iteration: SM's Ψ products, or CGBlock's
    # tangents carried forward and back through this stage (one per tangent and microbatch).
    hvp_products: int = 0
    tangents_started: int = 0  # CGBlock: tangent passes that carried this stage's own tangent


def armijo_rule(cfg: OptimizerConfig) -> ArmijoRule:
    return ArmijoRule(c=cfg.armijo_c, beta=cfg.armijo_beta)


class SurrogateUpdate:
    """SM on one stage: L_s from the backward, N inner steps on it, then θ ← θ_t + d."""

    def __init__(self, cfg: OptimizerConfig, stage: PipelineStage) -> None:
        self.cfg = cfg
        self.stage = stage
        self.solver: TruncatedCG | GradientDescentArmijo | None = None
        self.next_step = cfg.armijo_init  # gd_armijo inner solver: carried across iterations
        self._products_before = 0
        self._report = StageUpdateReport()

    def begin(self) -> None:
        """Build the local loss from this iteration's backward (spec §2, 'Local loss')."""
        stage = self.stage
        state = stage.backward_state
        parts = [(state.functions[j], None if stage.is_first else state.deltas[j])
                 for j in sorted(state.functions)]
        grad = flatten([p.grad for p in stage.params])
        loss = LocalLoss(parts, grad, self.cfg.rho)
        self._products_before = sum(fn.products for fn, _ in parts)
        if self.cfg.inner_solver == "cg":
            self.solver = TruncatedCG(loss, tol=self.cfg.cg_tol, armijo=armijo_rule(self.cfg),
                                      fallback_step=self.cfg.armijo_init)
        else:
            self.solver = GradientDescentArmijo(loss, armijo=armijo_rule(self.cfg),
                                                initial_step=self.next_step,
                                                fixed_step=self.cfg.inner_lr)

    def step(self, n: int) -> int:
        """Up to n more inner steps; returns how many were taken (resumable)."""
        assert self.solver is not None, "begin() first"
        return self.solver.run(n)

    def finish(self) -> StageUpdateReport:
        """Apply d to the parameters and report."""
        assert self.solver is not None, "begin() first"
        solver, stage = self.solver, self.stage
        with torch.no_grad():
            for p, dp in zip(stage.params, unflatten(solver.d, stage.params)):
                p.add_(dp)
        if isinstance(solver, GradientDescentArmijo) and solver.fixed_step is None:
            self.next_step = 2.0 * solver.last_step
        products = sum(fn.products for fn in stage.backward_state.functions.values())
        stage.counters.psi_products += products - self._products_before  # the inner loop's
        report = solver.report()
        self._report = StageUpdateReport(
            inner_steps=report.steps, local_loss=report.value,
            curvature_sent=stage.backward_state.max_curvature_sent,
            psi_products=products, stopped=report.stopped, hvp_products=products)
        self.solver = None
        return self._report

    def report(self) -> StageUpdateReport:
        return self._report

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_step = state["next_step"]


class BlockCGUpdate:
    """CGBlock on one stage: truncated CG on H_ss d = −g_θ, H_ss the stage's diagonal block of
    the network's Hessian; each product comes from a tangent pass of the whole pipeline, so the
    stage offers its direction (`direction`) and takes the product after the pass (`advance`).
    Same CG rules as SM's inner solver (tolerance, negative curvature, Armijo fallback)."""

    def __init__(self, cfg: OptimizerConfig, stage: PipelineStage) -> None:
        self.cfg = cfg
        self.stage = stage
        self.solver: TruncatedCG | None = None
        self._tangents_before = 0
        self._started = 0
        self._report = StageUpdateReport()

    def begin(self) -> None:
        grad = flatten([p.grad for p in self.stage.params])
        self.solver = TruncatedCG(BlockModel(grad), tol=self.cfg.cg_tol,
                                  armijo=armijo_rule(self.cfg),
                                  fallback_step=self.cfg.armijo_init)
        self._tangents_before = self.stage.counters.tangent_products
        self._started = 0

    def direction(self) -> list[Tensor] | None:
        """The CG direction this stage's tangent starts from; None once CG has stopped."""
        if self.solver is None or self.solver.stopped is not None:
            return None
        return unflatten(self.solver.p, self.stage.params)

    def advance(self) -> None:
        """One CG step with the block product the last tangent pass left on the stage."""
        product = self.stage.take_block_product()
        if product is None:  # stopped before this pass: it started no tangent
            return
        assert self.solver is not None, "begin() first"
        self._started += 1
        if self.cfg.cgblock_damping:
            product = product.add(self.solver.p, alpha=self.cfg.cgblock_damping)
        self.solver.advance(product)

    def finish(self) -> StageUpdateReport:
        assert self.solver is not None, "begin() first"
        with torch.no_grad():
            for p, dp in zip(self.stage.params, unflatten(self.solver.d, self.stage.params)):
                p.add_(dp)
        report = self.solver.report()
        self._report = StageUpdateReport(
            inner_steps=report.steps, local_loss=report.value, stopped=report.stopped,
            hvp_products=self.stage.counters.tangent_products - self._tangents_before,
            tangents_started=self._started)
        self.solver = None
        return self._report

    def report(self) -> StageUpdateReport:
        return self._report

    def state_dict(self) -> dict[str, Any]:
        return {}  # CG starts afresh every iteration

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TorchOptimizerUpdate:
    """gd (constant step), sgd and adam: a torch optimizer on this stage's parameters."""

    def __init__(self, cfg: OptimizerConfig, stage: PipelineStage) -> None:
        if cfg.name == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                stage.params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps,
                weight_decay=cfg.weight_decay)
        elif cfg.name in ("sgd", "ddg"):
            self.optimizer = torch.optim.SGD(stage.params, lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay)
        else:  # gd: the paper's constant-step baseline
            self.optimizer = torch.optim.SGD(stage.params, lr=cfg.lr)

    def step(self) -> None:
        self.optimizer.step()

    def report(self) -> StageUpdateReport:
        return StageUpdateReport()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class DelayedGradientUpdate(TorchOptimizerUpdate):
    """DDG (Huo et al. 2018): stage s of p (counting from 1) steps with the gradient it computed
    p − s iterations ago, as when each stage's error signal arrives that much later; a stage
    takes no step until it has a gradient that old. SGD with lr, momentum, weight_decay."""

    def __init__(self, cfg: OptimizerConfig, stage: PipelineStage) -> None:
        super().__init__(cfg, stage)
        self.params = stage.params
        self.delay = stage.num_stages - 1 - stage.index
        self.history: deque[list[Tensor]] = deque()

    def step(self) -> None:
        self.history.append([p.grad.detach().clone() for p in self.params])
        if len(self.history) <= self.delay:
            return
        for p, delayed in zip(self.params, self.history.popleft()):
            p.grad = delayed
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        device = self.params[0].device
        self.history = deque([g.to(device) for g in grads] for grads in state["history"])


class ArmijoTrialUpdate:
    """GD+Armijo on one stage: θ = θ_t − α∇h for the trial steps the coordinator chooses."""

    def __init__(self, cfg: OptimizerConfig, stage: PipelineStage) -> None:
        self.stage = stage
        self.base: list[Tensor] | None = None

    def set_step(self, alpha: float) -> None:
        params = self.stage.params
        with torch.no_grad():
            if self.base is None:
                self.base = [p.detach().clone() for p in params]
            for p, base in zip(params, self.base):
                torch.add(base, p.grad, alpha=-alpha, out=p)

    def end_trial(self, accept: bool) -> None:
        """Keep the last trial step, or go back to θ_t."""
        if self.base is not None and not accept:
            with torch.no_grad():
                for p, base in zip(self.stage.params, self.base):
                    p.copy_(base)
        self.base = None

    def report(self) -> StageUpdateReport:
        return StageUpdateReport()

    def state_dict(self) -> dict[str, Any]:
        return {}  # GD+Armijo's step size lives with the coordinator

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


UpdateRule = SurrogateUpdate | BlockCGUpdate | TorchOptimizerUpdate | ArmijoTrialUpdate


def make_update_rule(cfg: OptimizerConfig, stage: PipelineStage) -> UpdateRule:
    if cfg.name == "sm":
        return SurrogateUpdate(cfg, stage)
    if cfg.name == "ddg":
        return DelayedGradientUpdate(cfg, stage)
    if cfg.name in ("gd", "sgd", "adam"):
        return TorchOptimizerUpdate(cfg, stage)
    if cfg.name in STEERED_OPTIMIZERS:  # SSO's inner steps are trial steps on q
        return ArmijoTrialUpdate(cfg, stage)
    if cfg.name == "cgblock":
        return BlockCGUpdate(cfg, stage)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
