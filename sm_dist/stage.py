"""PipelineStage: one stage's microbatch forward and backward, its curvature and its update."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sm_dist.config import OptimizerConfig
from sm_dist.math.curvature import (
    damped_curvature,
    initial_vectors,
    power_iteration,
    reduce_eigenvalues,
)
from sm_dist.math.local_loss import flatten
from sm_dist.math.losses import LossCurvature, LossSpec, top_of_pipeline
from sm_dist.math.stage_function import StageFunction, per_sample, trainable_parameters
from sm_dist.updates import (
    ArmijoTrialUpdate,
    BlockCGUpdate,
    StageUpdateReport,
    make_update_rule,
)

# Optimizers whose backward carries curvature down (spec §2) and builds Ψ for the update phase.
CURVATURE_OPTIMIZERS = frozenset({"sm"})
# Optimizers whose backward keeps each microbatch's graph for second-order products.
GRAPH_OPTIMIZERS = frozenset({"sm", "cgblock"})


def to_cpu(value: Any) -> Any:
    """A copy of nested containers with every tensor on the CPU (for checkpoints)."""
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


@dataclass
class MicrobatchStash:
    """What a stage keeps of one microbatch between its forward and the end of the iteration."""

    z_in: Tensor  # requires grad on every stage but the first
    out: Tensor  # the output with its autograd graph
    y: Tensor | None = None  # labels, on the last stage only


@dataclass
class StageCounters:
    forward_microbatches: int = 0
    backward_microbatches: int = 0
    psi_products: int = 0  # Hessian-vector products of Ψ (power iteration and 𝓗 products)
    tangent_products: int = 0  # CGBlock: tangents carried through this stage, per microbatch


@dataclass
class BackwardState:
    """Per-iteration products of the backward: stage functions, damping, largest c sent down."""

    functions: dict[int, StageFunction] = field(default_factory=dict)
    eigenvalues: dict[int, Tensor] = field(default_factory=dict)
    deltas: dict[int, Tensor] = field(default_factory=dict)
    max_curvature_sent: float | None = None
    loss_curvature: dict[int, LossCurvature] = field(default_factory=dict)  # CGBlock, last stage
    tangent_inputs: dict[tuple[int, int], Tensor] = field(default_factory=dict)  # (source, j)
    block_product: Tensor | None = None  # CGBlock: Σ_j of this pass's H_ss v_s, flat


class PipelineStage:
    """One stage of the pipeline: its layers, its per-microbatch stash, its optimizer state.

    The caller (a single-process loop or an RPC worker) decides the order of the calls; the
    stage only knows how to run one microbatch forward or backward and how to update itself.
    """

    def __init__(self, index: int, num_stages: int, module: nn.Module, optimizer: OptimizerConfig,
                 loss: LossSpec | None, *, seed: int = 0) -> None:
        self.index = index
        self.num_stages = num_stages
        self.module = module
        self.config = optimizer
        self.loss = loss
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        if self.is_last and loss is None:
            raise ValueError("the last stage needs the loss")
        self.needs_curvature = optimizer.name in CURVATURE_OPTIMIZERS
        self.keeps_graph = optimizer.name in GRAPH_OPTIMIZERS
        # SSO, last stage: (z_p^t, ∇ℓ(z_p^t), 1/η per sample) of each microbatch, kept for the
        # surrogate passes of the iteration (not cleared between them).
        self.anchor: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.params = trainable_parameters(module)
        self.device = next(module.parameters()).device
        self.stash: dict[int, MicrobatchStash] = {}
        self.backward_state = BackwardState()
        self.power_vectors: dict[int, Tensor] = {}  # warm starts, kept across iterations
        self.generator = torch.Generator().manual_seed(seed * 1000 + index)
        self.counters = StageCounters()
        self.update = make_update_rule(optimizer, self)

    # ----------------------------------------------------------------------------- forward
    def forward_microbatch(self, j: int, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Run f_s on microbatch j, keep what the backward needs, return the output (detached)."""
        z_in = x.to(self.device).detach().requires_grad_(not self.is_first)
        y = None if y is None else y.to(self.device)
        with torch.enable_grad():
            out = self.module(z_in)
        self.stash[j] = MicrobatchStash(z_in, out, y)
        self.counters.forward_microbatches += 1
        return out.detach()

    def forward_only(self, x: Tensor) -> Tensor:
        """f_s without keeping anything (evaluation and line-search trial passes)."""
        with torch.no_grad():
            return self.module(x.to(self.device))

    # ---------------------------------------------------------------------------- backward
    def top_of_pipeline(self, j: int, n: int) -> tuple[Tensor, Tensor, float, int]:
        """Last stage: loss of microbatch j in a batch of n, and the (g, c) to start its backward.

        Returns (g, c, loss contribution Σ ℓ/n, correct predictions).
        """
        assert self.loss is not None and self.stash[j].y is not None
        out, y = self.stash[j].out.detach(), self.stash[j].y
        top = top_of_pipeline(self.loss, out, y, n)
        if self.config.name == "sso":
            if j == 0:
                self.anchor.clear()
            self.anchor[j] = (out, top.grad, top.curvature * self.config.sso_scale)
        if self.config.name == "cgblock":
            self.backward_state.loss_curvature[j] = LossCurvature(self.loss, out, y, n)
        return top.grad, top.curvature, float(top.loss), top.correct

    def surrogate_top(self, j: int) -> tuple[Tensor, float]:
        """SSO, last stage: q_j at this microbatch's new output and its output gradient
        ∇ℓ(z_p^t) + (f(θ) − z_p^t)/η (no new loss evaluation)."""
        residual, g, c = self._residual(j, self.stash[j].out.detach())
        return g + c * residual, self._surrogate(residual, g, c)

    def surrogate_value(self, j: int, out: Tensor) -> float:
        """SSO, last stage: q_j = ⟨∇ℓ(z_p^t), f(θ) − z_p^t⟩ + (1/2η)‖f(θ) − z_p^t‖² at `out`."""
        return self._surrogate(*self._residual(j, out))

    def _residual(self, j: int, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, g, c = self.anchor[j]
        return out.to(z.device) - z, g, per_sample(c, z)

    @staticmethod
    def _surrogate(residual: Tensor, g: Tensor, c: Tensor) -> float:
        return float((g * residual).sum() + 0.5 * (c * residual * residual).sum())

    def backward_microbatch(self, j: int, g_out: Tensor, c_out: Tensor | None,
                            same_batch: bool = False) -> tuple[Tensor | None, Tensor | None]:
        """Backpropagate microbatch j: accumulate ∂h/∂θ_s, return (g_in, c_in) for the stage below.

        c_in is None on the first stage, for optimizers that need no curvature, and with
        `curvature: batch` (then `finish_backward` returns it once every microbatch is done).
        """
        entry = self.stash[j]
        self.counters.backward_microbatches += 1
        if not self.keeps_graph:
            torch.autograd.backward(entry.out, g_out)
            del self.stash[j]  # frees the graph; the gradient is in p.grad
            return (None if self.is_first else entry.z_in.grad.detach()), None
        if not self.needs_curvature:  # CGBlock: Ψ with c = 0 holds exactly the ⟨g, f⟩ terms
            c_out = torch.zeros(g_out.shape[0], dtype=g_out.dtype, device=g_out.device)
        assert c_out is not None, "SM needs the curvature from the stage above"
        fn = StageFunction(entry.z_in, entry.out, self.params, g_out, c_out)
        g_in, g_theta = fn.gradients()
        for p, g in zip(self.params, g_theta):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        state = self.backward_state
        state.functions[j] = fn
        del self.stash[j]
        if self.is_first:
            return None, None
        if not self.needs_curvature:
            return g_in, None
        lam = self._eigenvalues(j, fn, same_batch)
        if self.config.curvature == "batch":
            state.eigenvalues[j] = lam
            return g_in, None
        return g_in, self._damp(j, reduce_eigenvalues(lam, self.config.curvature))

    def finish_backward(self) -> dict[int, Tensor] | None:
        """With `curvature: batch`, the c_in of every microbatch from the batch's largest λ."""
        state = self.backward_state
        if self.is_first or not self.needs_curvature or self.config.curvature != "batch":
            return None
        lam_max = torch.stack([lam.max() for lam in state.eigenvalues.values()]).max()
        return {j: self._damp(j, lam_max.expand_as(lam).clone())
                for j, lam in state.eigenvalues.items()}

    def _eigenvalues(self, j: int, fn: StageFunction, same_batch: bool) -> Tensor:
        assert fn.grad_z is not None
        start = self.power_vectors.get(j)
        if not (self.config.power_warm_start and same_batch and start is not None
                and start.shape == fn.grad_z.shape):
            start = initial_vectors(fn.grad_z, self.generator)
        products = fn.products
        lam, vectors = power_iteration(fn.hvp_zz, start, self.config.power_iterations)
        self.counters.psi_products += fn.products - products
        self.power_vectors[j] = vectors
        return lam

    def _damp(self, j: int, lam: Tensor) -> Tensor:
        cfg = self.config
        c, delta = damped_curvature(lam, delta_rel=cfg.delta_rel, delta_abs=cfg.delta_abs,
                                    delta_floor=cfg.delta_floor)
        state = self.backward_state
        state.deltas[j] = delta
        top = float(c.max()) if c.numel() else 0.0
        state.max_curvature_sent = max(top, state.max_curvature_sent or 0.0)
        return c

    # ----------------------------------------------------------- tangent passes (CGBlock)
    # One pass gives every stage s its block product H_ss v_s (v_s: its CG direction): stage s
    # starts a tangent J_θ v_s, stages above carry it forward (J_z u), the top applies ∂²h/∂z²,
    # and the backward carries it down (J_zᵀ r + H_zz u) to stage s, which ends it with
    # J_θᵀ r + H_θθ v_s. Tangents are keyed by the stage that started them.
    def _own_direction(self) -> list[Tensor] | None:
        assert isinstance(self.update, BlockCGUpdate)
        return self.update.direction()

    def tangent_forward(self, j: int, incoming: dict[int, Tensor]) -> dict[int, Tensor]:
        """Carry the tangents from below through microbatch j and start this stage's own."""
        fn = self.backward_state.functions[j]
        out: dict[int, Tensor] = {}
        for source, u in incoming.items():
            u = u.to(self.device)
            self.backward_state.tangent_inputs[(source, j)] = u
            out[source] = fn.tangent(u, None)
        own = self._own_direction()
        if own is not None:
            out[self.index] = fn.tangent(None, own)
        if self.is_last:  # turn each tangent of z_p into the change of ∂h/∂z_p
            curvature = self.backward_state.loss_curvature[j]
            out = {source: curvature.product(t) for source, t in out.items()}
        return out

    def tangent_backward(self, j: int, incoming: dict[int, Tensor]) -> dict[int, Tensor]:
        """Carry each tangent's gradient change down through microbatch j; this stage's own
        ends here and adds its H_ss v_s share to the pass's block product."""
        fn = self.backward_state.functions[j]
        state = self.backward_state
        down: dict[int, Tensor] = {}
        for source, rg in incoming.items():
            rg = rg.to(self.device)
            self.counters.tangent_products += 1
            if source == self.index:
                own = self._own_direction()
                assert own is not None
                product = flatten(fn.tangent_params(rg, own))
                state.block_product = (product if state.block_product is None
                                       else state.block_product.add_(product))
            else:
                down[source] = fn.tangent_input(rg, state.tangent_inputs.pop((source, j)))
        return down

    def take_block_product(self) -> Tensor | None:
        product, self.backward_state.block_product = self.backward_state.block_product, None
        return product

    # ------------------------------------------------------------------------------ update
    def update_report(self) -> StageUpdateReport:
        return self.update.report()

    def end_iteration(self) -> None:
        """Drop the iteration's stash, stage functions and gradients (after the update)."""
        self.stash.clear()
        self.backward_state = BackwardState()
        for p in self.params:
            p.grad = None

    def end_trial(self, accept: bool) -> None:
        """GD+Armijo: keep the last trial step or go back to θ_t; then the iteration is over."""
        assert isinstance(self.update, ArmijoTrialUpdate)
        self.update.end_trial(accept)
        self.end_iteration()

    def state_dict(self) -> dict[str, Tensor]:
        """This stage's parameters and buffers, on the CPU."""
        return to_cpu(self.module.state_dict())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: parameters, optimizer state, warm starts."""
        return {"module": self.state_dict(), "update": to_cpu(self.update.state_dict()),
                "power_vectors": to_cpu(self.power_vectors),
                "generator": self.generator.get_state()}

    def restore_checkpoint(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["module"])
        self.update.load_state_dict(state["update"])
        self.power_vectors = {j: v.to(self.device) for j, v in state["power_vectors"].items()}
        self.generator.set_state(state["generator"])

    def grad_sq_norm(self) -> float:
        return sum(float((p.grad * p.grad).sum()) for p in self.params if p.grad is not None)
