"""Kronecker-factored SM bound of one layer: per-sample terms, factors A and U, λ per sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sm_dist.math.curvature import initial_vectors, power_iteration

# The factors and the solve are float64 whatever the model's dtype: in float32 the rounding
# noise of G outside the span of the inputs meets a rank-deficient A (docs: precision).
DTYPE = torch.float64

Activation = Callable[[Tensor], Tensor]


def activation_derivatives(activation: Activation | None,
                           pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(σ(a), σ'(a), σ''(a)) of an elementwise activation (None: the identity), by autograd.

    For an elementwise σ the gradient of Σ_i σ(a_i) is σ'(a) and that of Σ_i σ'(a_i) is σ''(a),
    so any elementwise module works as it is (ReLU: σ'' = 0 almost everywhere).
    """
    if activation is None:
        return pre, torch.ones_like(pre), torch.zeros_like(pre)
    a = pre.detach().requires_grad_(True)
    with torch.enable_grad():
        value = activation(a)
        (first,) = torch.autograd.grad(value.sum(), a, create_graph=True)
        if first.requires_grad:
            (second,) = torch.autograd.grad(first.sum(), a, allow_unused=True,
                                            materialize_grads=True)
        else:  # σ' does not depend on a (a linear σ): nothing to differentiate
            second = torch.zeros_like(a)
    return value.detach(), first.detach(), second.detach()


@dataclass(frozen=True)
class LayerTerms:
    """One layer's per-sample pieces of the bound at its base point, float64.

    Rows are (sample k, location l): one location for a Linear layer, one per output pixel for
    a convolution; P = inputs per row (+1 with a bias), d_out = the layer's output channels.
    - inputs: z̃_{k,l}, (n, L, P), the input or patch with 1 appended for the bias.
    - cotangents: u_{k,l} = σ'(a) ⊙ Πᵀg, (n, L, d_out), ∂Ψ/∂a at the pre-activation a.
    - curvature: M_{k,l}, (n, L, d_out), the diagonal of ∂²Ψ/∂a², c·σ'²·diag(ΠᵀΠ) + Πᵀg ⊙ σ''.
    - theta_curvature: m_{k,l} = max(0, max_i M_i) ≥ λ_max(M), (n, L).
    - cross_curvature: κ_{k,l} ≥ ‖M W₀‖², certified, (n, L); W₀ = W without its bias column.
    - lam_bound: λ_k ≥ ‖∂²Ψ/∂z_k²‖, certified, (n,): valid for δ and the curvature sent down.
    - coverage: γ, the most (location, kernel offset) pairs reading one input pixel; 1 for
      a Linear layer.
    """

    inputs: Tensor
    cotangents: Tensor
    curvature: Tensor
    theta_curvature: Tensor
    cross_curvature: Tensor
    lam_bound: Tensor
    coverage: int


def fold_bias(rows: Tensor, with_bias: bool) -> Tensor:
    """Rows with a trailing 1 (z̃ = [z; 1]) when the layer has a bias."""
    if not with_bias:
        return rows
    return torch.cat([rows, torch.ones_like(rows[..., :1])], dim=-1)


def weight_matrix(weight: Tensor, bias: Tensor | None) -> Tensor:
    """[W | b] as one d_out × P matrix (a conv kernel flattened in F.unfold's patch order)."""
    rows = weight.reshape(weight.shape[0], -1)
    return rows if bias is None else torch.cat([rows, bias.reshape(-1, 1)], dim=1)


def split_weight_matrix(matrix: Tensor, weight_shape: torch.Size | tuple[int, ...],
                        with_bias: bool) -> tuple[Tensor, Tensor | None]:
    """The inverse of weight_matrix: (weight-shaped part, bias or None)."""
    if not with_bias:
        return matrix.reshape(weight_shape), None
    return matrix[:, :-1].reshape(weight_shape), matrix[:, -1].clone()


def threshold_bound(weights: Tensor, row_sq: Tensor, spectral_sq: float) -> Tensor:
    """A certified upper bound of λ_max(Σ_i a_i w_i w_iᵀ) per row of a = `weights` (≥ 0, last
    dimension over W₀'s rows w_i, ‖w_i‖² = `row_sq`, ‖W₀‖₂² = `spectral_sq`).

    For any t ≥ 0, a_i ≤ t + (a_i − t)₊ gives λ_max ≤ t·s² + Σ_i (a_i − t)₊‖w_i‖²: t = max a is
    the spectral bound, t = 0 the trace; the best t is at one of the a_i (the function is
    convex and piecewise linear), found from the sorted a and running sums.
    """
    sorted_a, order = weights.sort(dim=-1, descending=True)
    r = row_sq[order]
    products = sorted_a * r
    rows_before = torch.cumsum(r, dim=-1) - r  # Σ over the larger a_i only (exclusive sums)
    products_before = torch.cumsum(products, dim=-1) - products
    at_breakpoints = sorted_a * (spectral_sq - rows_before) + products_before
    return torch.minimum(at_breakpoints.amin(dim=-1), products.sum(dim=-1))


def assemble_terms(inputs: Tensor, cotangents: Tensor, curvature: Tensor, weight_rows: Tensor,
                   coverage: int, spectral_sq: float | None = None) -> LayerTerms:
    """LayerTerms from the rows' inputs, cotangents and M, given W₀ as (d_out, P without bias).

    Per row (M diagonal): ‖M W₀‖² = λ_max(Σ_i M_i² w_iw_iᵀ) and ‖W₀ᵀMW₀‖ ≤ λ_max(W₀ᵀ|M|W₀) =
    λ_max(Σ_i |M_i| w_iw_iᵀ) (−|M| ⪯ M ⪯ |M|), both certified by threshold_bound. A
    convolution's input Hessian is 𝒰ᵀ blockdiag_l(W₀ᵀM_lW₀) 𝒰 with ‖𝒰‖² = γ, hence
    λ_k = γ·max_l of the latter. `spectral_sq` = ‖W₀‖₂² of the current weights, or any upper
    bound of it, computed (one SVD) when not given.
    """
    if spectral_sq is None:
        spectral_sq = float(torch.linalg.matrix_norm(weight_rows, 2)) ** 2
    row_sq = weight_rows.square().sum(dim=1)
    size = curvature.abs()
    cross = threshold_bound(size.square(), row_sq, spectral_sq)
    ell = threshold_bound(size, row_sq, spectral_sq)
    return LayerTerms(inputs=inputs, cotangents=cotangents, curvature=curvature,
                      theta_curvature=curvature.amax(dim=-1).clamp_min(0.0),
                      cross_curvature=cross, lam_bound=coverage * ell.amax(dim=1),
                      coverage=coverage)


def linear_layer_terms(inputs: Tensor, weight: Tensor, bias: Tensor | None, grad_out: Tensor,
                       c: Tensor, activation: Activation | None = None, *,
                       spectral_sq: float | None = None) -> LayerTerms:
    """The terms of f(z) = σ(W z + b) around the stored inputs z (n, ...) and weights.

    `grad_out` is g, the cotangent at the layer's output (after σ), `c` the per-sample
    curvature received from above. A Flatten before the Linear is a reshape: part of f.
    """
    n = inputs.shape[0]
    z = inputs.reshape(n, -1).to(DTYPE)
    w = weight.to(DTYPE)
    b = None if bias is None else bias.to(DTYPE)
    _, slope, bend = activation_derivatives(activation, F.linear(z, w, b))
    g = grad_out.reshape(n, -1).to(DTYPE)
    curvature = c.to(DTYPE)[:, None] * slope.square() + g * bend
    return assemble_terms(fold_bias(z, b is not None)[:, None], (slope * g)[:, None],
                          curvature[:, None], w, 1, spectral_sq)


def linear_lambda_estimate(weight: Tensor, terms: LayerTerms, rounds: int,
                           start: Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """λ_k ≈ λ_max(W₀ᵀ|M_k|W₀) from below, by batched power iteration; (λ, vectors to reuse).

    Exact, this is ‖∂²Ψ/∂z_k²‖ for ReLU or no activation (M ⪰ 0) and an upper bound of it
    otherwise; |M| keeps the iterated matrix PSD, so no ± pair stalls it. It iterates on
    |M|^½ W₀W₀ᵀ |M|^½ in the d_out-space (the same nonzero eigenvalues): one product with
    the Gram matrix W₀W₀ᵀ per round where that is cheaper than W₀ then W₀ᵀ (d_out < 2 d_in).
    """
    if terms.curvature.shape[1] != 1:
        raise ValueError("these are a convolution's terms: use conv_lambda_estimate")
    w = weight.to(DTYPE)
    root = terms.curvature[:, 0].abs().sqrt()
    if w.shape[0] < 2 * w.shape[1]:
        gram = w @ w.T

        def product(v: Tensor) -> Tensor:
            return root * ((root * v) @ gram)
    else:
        def product(v: Tensor) -> Tensor:
            return root * (((root * v) @ w) @ w.T)

    if start is None:
        start = initial_vectors(root, generator)
    return power_iteration(product, start, rounds)


def terms_gradient(terms: LayerTerms) -> Tensor:
    """G = Σ_{k,l} u_{k,l} z̃_{k,l}ᵀ, the gradient as a weight_matrix (a check on the terms)."""
    u = terms.cotangents.reshape(-1, terms.cotangents.shape[-1])
    return u.T @ terms.inputs.reshape(-1, terms.inputs.shape[-1])


def kronecker_factors(terms: LayerTerms, delta: Tensor | None,
                      eta: float) -> tuple[Tensor, Tensor | None]:
    """(A, U) with ⟨V, UV + VA⟩ ≥ vᵀ𝓗v for every V = weight_matrix(v), 𝓗 the SM local loss's.

    A = Σ_{k,l} [m_{k,l} + γ(1+1/η) κ_{k,l}/δ_k] z̃z̃ᵀ and U = Σ_{k,l} γ(1+η)/δ_k u uᵀ;
    `delta` None is a first layer (its input is data, 𝓗 = H_θθ): A = Σ m z̃z̃ᵀ and U None (0).
    Both are sums over samples, so a batch's factors are the sums of its microbatches'.
    """
    rows = terms.inputs.reshape(-1, terms.inputs.shape[-1])
    if delta is None:
        weights = terms.theta_curvature
    else:
        if eta <= 0.0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if bool((delta <= 0.0).any()):
            raise ValueError("every δ_k must be > 0 (floor it)")
        per_delta = terms.coverage / delta.to(DTYPE)[:, None]
        weights = terms.theta_curvature + (1.0 + 1.0 / eta) * per_delta * terms.cross_curvature
    a = rows.T @ (weights.reshape(-1, 1) * rows)
    a = 0.5 * (a + a.T)  # exact symmetry, which eigh and Cholesky assume
    if delta is None:
        return a, None
    u = terms.cotangents.reshape(-1, terms.cotangents.shape[-1])
    u_weights = ((1.0 + eta) * per_delta).expand(terms.theta_curvature.shape).reshape(-1, 1)
    u_factor = u.T @ (u_weights * u)
    return a, 0.5 * (u_factor + u_factor.T)


def first_layer_gram(terms: LayerTerms) -> tuple[Tensor, float]:
    """(Z̃ᵀZ̃, max m) with A ⪯ max m · Z̃ᵀZ̃ for a first layer: on a full batch Z̃ᵀZ̃ is fixed,
    so it is factored once and only the scale changes per step (Eigenbasis.scaled)."""
    rows = terms.inputs.reshape(-1, terms.inputs.shape[-1])
    return rows.T @ rows, float(terms.theta_curvature.max())
