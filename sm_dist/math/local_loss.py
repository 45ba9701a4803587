"""The local loss L_s(d) = ⟨g_θ, d⟩ + ½ dᵀ𝓗_s d + (2ρ/3)‖d‖³ of one stage (Proposition 1)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sm_dist.math.stage_function import RecomputedStageFunction, StageFunction
from sm_dist.math.stage_function import flatten as flatten  # the optimizers' import
from sm_dist.math.stage_function import unflatten as unflatten

# A microbatch's Ψ: its retained graph, or rebuilt for each product (optimizer.recompute).
PartFunction = StageFunction | RecomputedStageFunction


class LocalLoss:
    """A stage's model of the network loss in its own parameters, on flat vectors d = θ − θ_t.

    𝓗v = Σ_j [H_θθ v + H_θz Δ_j⁻¹ H_zθ v] over the stage's stored microbatches j, two Ψ
    products each for stages s ≥ 2; 𝓗v = Σ_j H_θθ v for stage 1, whose stage functions are
    built without input derivatives (their Δ is then None). `parts` pairs each microbatch's
    StageFunction with its per-sample δ; `grad` is g_θ = ∂h/∂θ_s, flat.
    """

    def __init__(self, parts: list[tuple[PartFunction, Tensor | None]], grad: Tensor,
                 rho: float, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        for fn, delta in parts:
            if (delta is None) == fn.with_input:
                raise ValueError("δ must be given exactly for stage functions with an input")
        self.parts = parts
        self.grad = grad
        self.rho = rho
        # Applied to every product: with replicas of the stage, the sum over all their samples
        # (then every scalar the solvers derive from products is the same on each replica).
        self.reduce = reduce
        self.products = 0  # applications of 𝓗

    @property
    def dim(self) -> int:
        return self.grad.numel()

    def hvp(self, v: Tensor) -> Tensor:
        """𝓗v, matrix-free."""
        self.products += 1
        result = torch.zeros_like(v)
        for fn, delta in self.parts:
            fn.add_local_hvp(unflatten(v, fn.params), delta, result)
        return result if self.reduce is None else self.reduce(result)

    def value(self, d: Tensor, hd: Tensor) -> float:
        """L_s(d), given hd = 𝓗d (tracked by the solvers so that a value costs no product)."""
        cubic = (2.0 * self.rho / 3.0) * float(d.norm()) ** 3 if self.rho else 0.0
        return float(self.grad @ d + 0.5 * (d @ hd)) + cubic

    def gradient(self, d: Tensor, hd: Tensor) -> Tensor:
        """∇L_s(d) = g_θ + 𝓗d + 2ρ‖d‖d."""
        out = self.grad + hd
        if self.rho:
            out = out + 2.0 * self.rho * d.norm() * d
        return out

    def line_value(self, d: Tensor, hd: Tensor, direction: Tensor, h_direction: Tensor):
        """φ(α) = L_s(d + α·direction) as a closure on scalars, given 𝓗·direction: no product."""
        gd, gp = float(self.grad @ d), float(self.grad @ direction)
        dhd, dhp, php = float(d @ hd), float(d @ h_direction), float(direction @ h_direction)
        dd, dp, pp = float(d @ d), float(d @ direction), float(direction @ direction)
        rho = self.rho

        def phi(alpha: float) -> float:
            quadratic = gd + alpha * gp + 0.5 * (dhd + 2.0 * alpha * dhp + alpha * alpha * php)
            if not rho:
                return quadratic
            norm_sq = max(dd + 2.0 * alpha * dp + alpha * alpha * pp, 0.0)
            return quadratic + (2.0 * rho / 3.0) * math.sqrt(norm_sq) ** 3

        return phi


class BlockModel(LocalLoss):
    """CGBlock's model m_s(d) = ⟨g_θ, d⟩ + ½ dᵀH_ss d on the diagonal block H_ss = ∂²h/∂θ_s² of
    the network's Hessian; its products need the rest of the network, so the pipeline's
    tangent passes supply them (TruncatedCG.advance) and this object never computes one."""

    def __init__(self, grad: Tensor) -> None:
        super().__init__([], grad, 0.0)

    def hvp(self, v: Tensor) -> Tensor:
        raise RuntimeError("H_ss v needs a tangent pass through the pipeline; "
                           "feed it to TruncatedCG.advance")
