"""Kronecker-factored SM bound of one layer: per-sample terms, factors A and U, λ per sample."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sm_dist.math.curvature import initial_vectors
from sm_dist.math.symmetric import symmetrize_

# The per-sample terms are in the model's dtype, the sums into A and U in the dtype the caller
# gives; the solve is float64 whatever the model's dtype: in float32 the rounding noise of G
# outside the span of the inputs meets a rank-deficient A (kronecker_solve.rounding_floor).
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
    if type(activation) is nn.ReLU:  # the common cases in closed form (autograd's values)
        slope = torch.gt(pre, 0, out=torch.empty_like(pre))  # 5x a bool mask's speed on CPU
        return pre.clamp_min(0.0), slope, torch.zeros_like(pre)
    if type(activation) is nn.Tanh:
        value = pre.tanh()
        slope = 1.0 - value * value
        return value, slope, -2.0 * value * slope
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
    - inputs: z̃_{k,l}, (n, L, P), the input or patch with 1 appended for the bias, in the
      model's dtype (the factors are formed from it in the dtype kronecker_factors is given).
    - cotangents: u_{k,l} = σ'(a) ⊙ Πᵀg, (n, L, d_out), ∂Ψ/∂a at the pre-activation a.
    - curvature: M_{k,l}, (n, L, d_out), the diagonal of ∂²Ψ/∂a², c·σ'²·diag(ΠᵀΠ) + Πᵀg ⊙ σ''.
    - theta_curvature: m_{k,l} = max(0, max_i M_i) ≥ λ_max(M), (n, L).
    - cross_curvature: κ_{k,l} ≥ ‖M W₀‖², certified, (n, L); W₀ = W without its bias column.
      None for a first layer (its input is data: no Δ term).
    - lam_bound: λ_k ≥ ‖∂²Ψ/∂z_k²‖, certified, (n,): valid for δ and the curvature sent down.
      None for a first layer.
    - coverage: γ, the most (location, kernel offset) pairs reading one input pixel; 1 for
      a Linear layer.
    """

    inputs: Tensor
    cotangents: Tensor
    curvature: Tensor
    theta_curvature: Tensor
    cross_curvature: Tensor | None
    lam_bound: Tensor | None
    coverage: int
    nonnegative: bool = False  # M ⪰ 0 known (the identity, ReLU)


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


def endpoint_bound(weights: Tensor, row_sq: Tensor, spectral_sq: float) -> Tensor:
    """A certified upper bound of λ_max(Σ_i a_i w_i w_iᵀ) per row of a = `weights` (≥ 0, last
    dimension over W₀'s rows w_i, ‖w_i‖² = `row_sq`, ‖W₀‖₂² = `spectral_sq`).

    Both max_i a_i · W₀ᵀW₀ and Σ_i a_i‖w_i‖² (the trace) bound it; the least of the two costs
    O(d_out) per row. (Any threshold t between them gives t·s² + Σ_i (a_i − t)₊‖w_i‖², also a
    bound, but on the MLPs of docs/results the best t was always an end point, and the search
    sorts every row: 17 ms of a 128-wide layer's 1,250-sample microbatch.)
    """
    return torch.minimum(weights.amax(dim=-1) * spectral_sq, weights @ row_sq)


def spectral_norm_sq(weight_rows: Tensor) -> float:
    """‖W₀‖₂², W₀ = the layer's weights as (d_out, P without bias), by one SVD in float64."""
    return float(torch.linalg.matrix_norm(weight_rows.to(DTYPE), 2)) ** 2


def nonnegative_curvature(activation: Activation | None) -> bool:
    """Whether M ⪰ 0 whatever g: σ'' = 0 (the identity, ReLU), so M = c·σ'²·counts."""
    return activation is None or type(activation) is nn.ReLU


def assemble_terms(inputs: Tensor, cotangents: Tensor, curvature: Tensor, weight_rows: Tensor,
                   coverage: int, spectral_sq: float | None = None,
                   below: bool = True, nonnegative: bool = False) -> LayerTerms:
    """LayerTerms from the rows' inputs, cotangents and M, given W₀ as (d_out, P without bias).

    Per row (M diagonal): ‖M W₀‖² = λ_max(Σ_i M_i² w_iw_iᵀ) and ‖W₀ᵀMW₀‖ ≤ λ_max(W₀ᵀ|M|W₀) =
    λ_max(Σ_i |M_i| w_iw_iᵀ) (−|M| ⪯ M ⪯ |M|), both certified by endpoint_bound. A
    convolution's input Hessian is 𝒰ᵀ blockdiag_l(W₀ᵀM_lW₀) 𝒰 with ‖𝒰‖² = γ, hence
    λ_k = γ·max_l of the latter. `spectral_sq` = ‖W₀‖₂² of the current weights, or any upper
    bound of it, computed (one SVD) when not given. `below` False: a first layer, whose input
    is data: nothing is sent down, and κ and λ are left out (None). `nonnegative`: M ⪰ 0 is
    known (nonnegative_curvature), so |M| = M.
    """
    theta = curvature.amax(dim=-1).clamp_min(0.0)
    if not below:
        return LayerTerms(inputs=inputs, cotangents=cotangents, curvature=curvature,
                          theta_curvature=theta, cross_curvature=None, lam_bound=None,
                          coverage=coverage, nonnegative=nonnegative)
    cross, lam = curvature_bounds(curvature if nonnegative else curvature.abs(), weight_rows,
                                  coverage, spectral_sq)
    return LayerTerms(inputs=inputs, cotangents=cotangents, curvature=curvature,
                      theta_curvature=theta, cross_curvature=cross, lam_bound=lam,
                      coverage=coverage, nonnegative=nonnegative)


def curvature_bounds(size: Tensor, weight_rows: Tensor, coverage: int,
                     spectral_sq: float | None = None,
                     lam_bound: bool = True) -> tuple[Tensor, Tensor | None]:
    """(κ per row, certified λ per sample or None if not `lam_bound`) from |M| as rows
    (n, L, d_out) and W₀ (d_out, P without bias): endpoint_bound of M² and of |M|, as
    assemble_terms explains; `spectral_sq` as there."""
    if spectral_sq is None:
        spectral_sq = spectral_norm_sq(weight_rows)
    row_sq = weight_rows.to(size.dtype).square().sum(dim=1)
    cross = endpoint_bound(size * size, row_sq, spectral_sq)  # x·x: 4x torch's pow on CPU
    if not lam_bound:
        return cross, None
    return cross, coverage * endpoint_bound(size, row_sq, spectral_sq).amax(dim=1)


@dataclass(frozen=True)
class LinearSamples:
    """A Linear layer's per-sample pieces that depend on its backward: u = σ'(a) ⊙ g and the
    diagonal M, both (n, d_out). The λ the layer sends down needs only |M|^½ (`root`); A and U
    need the rest, formed later from what is kept here. Where M = c·σ' with σ' 0 or 1 (ReLU),
    the 0/1 pattern is kept instead of M, a byte per entry."""

    cotangents: Tensor
    c: Tensor  # (n,), in the rows' dtype
    active: Tensor | None = None  # ReLU: σ' (0 or 1, as c's dtype or bool); M = c·active
    matrix: Tensor | None = None  # otherwise M itself (the identity: c broadcast, a view)
    nonnegative: bool = False  # M ⪰ 0 known (the identity, ReLU)

    def kept(self) -> LinearSamples:
        """What is kept to the update: ReLU's σ' as bool, a byte per entry."""
        if self.active is None or self.active.dtype == torch.bool:
            return self
        return dataclasses.replace(self, active=self.active.bool())

    def _mask(self) -> Tensor:
        assert self.active is not None
        if self.active.dtype != torch.bool:
            return self.active
        # bool to float through bytes: 4x faster on CPU than bool arithmetic, the same 0/1
        return self.active.view(torch.uint8).to(self.c.dtype)

    def curvature(self) -> Tensor:
        """M, (n, d_out)."""
        if self.active is not None:
            return self.c[:, None] * self._mask()
        assert self.matrix is not None
        return self.matrix.contiguous()

    def root(self) -> Tensor:
        """|M|^½, (n, d_out): on ReLU's pattern one square root per sample, not per entry
        (the same values: √(c·1) = √c)."""
        if self.active is not None:
            return _safe_sqrt(self.c)[:, None] * self._mask()
        assert self.matrix is not None
        size = self.matrix if self.nonnegative else self.matrix.abs()
        return _safe_sqrt(size)


def _safe_sqrt(size: Tensor) -> Tensor:
    # A zero costs 30x a number in CPU sqrt (ReLU leaves half of |M| zero), and the square
    # root of a clamped zero is a denormal that slows the products 30x: exact zeros instead.
    return size.clamp_min(torch.finfo(size.dtype).tiny).sqrt().masked_fill_(size == 0, 0.0)


def linear_samples(pre: Tensor, grad_out: Tensor, c: Tensor,
                   activation: Activation | None = None) -> LinearSamples:
    """u and M of f(z) = σ(W z + b) from the pre-activation the forward computed (n, d_out),
    the cotangent g at the layer's output and the per-sample curvature c from above."""
    n, dtype = pre.shape[0], pre.dtype
    g = grad_out.reshape(n, -1).to(dtype)
    scale = c.to(dtype)
    nonnegative = nonnegative_curvature(activation)
    if activation is None:
        return LinearSamples(g, scale, matrix=scale[:, None].expand_as(g),
                             nonnegative=nonnegative)
    if type(activation) is nn.ReLU:  # σ' the 0/1 mask, σ'' = 0: fewer passes over a
        # in pre's dtype: a bool mask costs 5x more to make and to multiply by on CPU
        active = torch.gt(pre, 0, out=torch.empty_like(pre))
        return LinearSamples(g * active, scale, active=active, nonnegative=nonnegative)
    _, slope, bend = activation_derivatives(activation, pre)
    return LinearSamples(slope * g, scale, matrix=scale[:, None] * (slope * slope) + g * bend,
                         nonnegative=nonnegative)


def largest_curvature(pre: Tensor, grad_out: Tensor, c: Tensor,
                      activation: Activation | None = None) -> float:
    """max over the samples of m_k = max(0, max_i M_ki): all that a first layer bounded by
    max m·Z̃ᵀZ̃ needs of its backward. On ReLU, m_k = max(0, c_k) where any unit is active."""
    if type(activation) is nn.ReLU:
        return largest_where_positive(pre, c)
    curvature = linear_samples(pre, grad_out, c, activation).curvature()
    return float(curvature.amax(dim=-1).clamp_min(0.0).max())


def largest_where_positive(reach: Tensor, c: Tensor) -> float:
    """max(0, max c_k) over the samples k with a positive entry of `reach` (n, ...): max m
    where M = c·σ'·counts with σ' and counts 0 or 1, `reach` showing which samples have an
    active unit (the pre-activation, or after max pooling its output)."""
    m = torch.where(reach.flatten(1).amax(dim=1) > 0, c.to(reach.dtype), 0.0)
    return float(m.clamp_min(0.0).max())


def linear_layer_terms(inputs: Tensor, weight: Tensor, bias: Tensor | None, grad_out: Tensor,
                       c: Tensor, activation: Activation | None = None, *,
                       spectral_sq: float | None = None, pre: Tensor | None = None,
                       below: bool = True, rows: bool = True) -> LayerTerms:
    """The terms of f(z) = σ(W z + b) around the stored inputs z (n, ...) and weights.

    `grad_out` is g, the cotangent at the layer's output (after σ), `c` the per-sample
    curvature received from above. A Flatten before the Linear is a reshape: part of f.
    `pre`: the pre-activation W z + b the forward computed, else computed here again.
    `below` False: the first layer (assemble_terms). `rows` False leaves the inputs z̃ out
    (an empty tensor): a first layer bounded through its Gram matrix needs only m.
    """
    n, dtype = inputs.shape[0], inputs.dtype
    z = inputs.reshape(n, -1)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    pre = F.linear(z, w, b) if pre is None else pre.reshape(n, -1).to(dtype)
    samples = linear_samples(pre, grad_out, c, activation)
    return linear_terms_of(inputs, samples, w, b is not None, spectral_sq=spectral_sq,
                           below=below, rows=rows)


def linear_terms_of(inputs: Tensor, samples: LinearSamples, weight: Tensor, with_bias: bool, *,
                    spectral_sq: float | None = None, below: bool = True,
                    rows: bool = True) -> LayerTerms:
    """linear_layer_terms from the layer's inputs z (n, ...) and what its backward kept."""
    n = inputs.shape[0]
    z = inputs.reshape(n, -1)
    kept = fold_bias(z, with_bias)[:, None] if rows else z.new_empty((n, 1, 0))
    return assemble_terms(kept, samples.cotangents[:, None], samples.curvature()[:, None],
                          weight.to(z.dtype), 1, spectral_sq, below, samples.nonnegative)


def terms_root(terms: LayerTerms) -> Tensor:
    """|M|^½ of a Linear layer's terms, (n, d_out)."""
    if terms.curvature.shape[1] != 1:
        raise ValueError("these are a convolution's terms: use conv_lambda_estimate")
    size = terms.curvature[:, 0]
    return _safe_sqrt(size if bool(terms.nonnegative) else size.abs())


def linear_lambda_estimate(weight: Tensor, root: Tensor, rounds: int,
                           start: Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """λ_k ≈ λ_max(W₀ᵀ|M_k|W₀) from below, by batched power iteration; (λ, vectors to reuse).
    `root` is |M|^½, (n, d_out) (LinearSamples.root, terms_root).

    Exact, this is ‖∂²Ψ/∂z_k²‖ for ReLU or no activation (M ⪰ 0) and an upper bound of it
    otherwise; |M| keeps the iterated matrix PSD, so no ± pair stalls it. It iterates on
    |M|^½ W₀W₀ᵀ |M|^½ in the d_out-space (the same nonzero eigenvalues): one product with
    the Gram matrix W₀W₀ᵀ per round where that is cheaper than W₀ then W₀ᵀ (d_out < 2 d_in).
    """
    w = weight.to(root.dtype)
    if w.shape[0] < 2 * w.shape[1]:
        gram = w @ w.T

        def product(v: Tensor) -> Tensor:
            return root * ((root * v) @ gram)
    else:
        def product(v: Tensor) -> Tensor:
            return root * (((root * v) @ w) @ w.T)

    if start is None:
        start = initial_vectors(root, generator)
    return unit_power_rounds(product, start, rounds)


def unit_power_rounds(product: Callable[[Tensor], Tensor], start: Tensor,
                      rounds: int) -> tuple[Tensor, Tensor]:
    """curvature.power_iteration for rows that are already unit (or zero) vectors, as the
    random starts and the vectors it returns are, in fewer passes over them: one round is
    one product, one row dot and one normalisation. (λ, the unit vectors reached)."""
    u, lam = start, torch.zeros(start.shape[0], dtype=start.dtype, device=start.device)
    for _ in range(rounds):
        hu = product(u)
        rows = hu.reshape(hu.shape[0], -1)
        lam = (u.reshape(rows.shape) * rows).sum(dim=1).abs()
        norms = rows.norm(dim=1)
        scale = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                            0.0)
        reached = hu * scale.reshape(-1, *([1] * (hu.dim() - 1)))
        # A row whose product vanished (a dead ReLU sample) keeps its vector: copied row by
        # row, where a broadcast torch.where over every entry costs as much as the product.
        kept = ~(scale > 0)
        if bool(kept.any()):
            reached[kept] = u[kept]
        u = reached
    return lam, u


def terms_gradient(terms: LayerTerms) -> Tensor:
    """G = Σ_{k,l} u_{k,l} z̃_{k,l}ᵀ, the gradient as a weight_matrix (a check on the terms)."""
    u = terms.cotangents.reshape(-1, terms.cotangents.shape[-1])
    return u.T @ terms.inputs.reshape(-1, terms.inputs.shape[-1]).to(u.dtype)


def factor_weights(terms: LayerTerms, delta: Tensor | None,
                   eta: float) -> tuple[Tensor, Tensor | None]:
    """Per-row weights (w_A, w_U) of the factors: A = Σ w_A z̃z̃ᵀ, U = Σ w_U u uᵀ (flat rows).

    w_A = m + γ(1+1/η)κ/δ_k and w_U = γ(1+η)/δ_k; `delta` None is a first layer (its input is
    data, 𝓗 = H_θθ): w_A = m and no U.
    """
    a_weights, u_weights = row_weights(terms.theta_curvature, terms.cross_curvature,
                                       terms.coverage, delta, eta)
    return a_weights.reshape(-1), None if u_weights is None else u_weights.reshape(-1)


def row_weights(theta: Tensor, cross: Tensor | None, coverage: int, delta: Tensor | None,
                eta: float) -> tuple[Tensor, Tensor | None]:
    """factor_weights from m and κ per (sample, location), (n, L): (w_A, w_U) in that shape."""
    if delta is None:
        return theta, None
    if eta <= 0.0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if bool((delta <= 0.0).any()):
        raise ValueError("every δ_k must be > 0 (floor it)")
    assert cross is not None, "a first layer's terms have no κ"
    per_delta = coverage / delta.to(theta.dtype)[:, None]
    a_weights = theta + (1.0 + 1.0 / eta) * per_delta * cross
    u_weights = ((1.0 + eta) * per_delta).expand(theta.shape)
    return a_weights, u_weights


def weighted_gram(rows: Tensor, weights: Tensor, dtype: torch.dtype = DTYPE) -> Tensor:
    """Σ_r w_r x_r x_rᵀ over the flat rows x_r of `rows` (…, P), formed in `dtype`, exactly
    symmetric (which eigh and Cholesky assume)."""
    flat = rows.reshape(-1, rows.shape[-1]).to(dtype)
    return symmetrize_(flat.T @ (weights.reshape(-1, 1).to(dtype) * flat))


def kronecker_factors(terms: LayerTerms, delta: Tensor | None, eta: float,
                      dtype: torch.dtype = DTYPE) -> tuple[Tensor, Tensor | None]:
    """(A, U) with ⟨V, UV + VA⟩ ≥ vᵀ𝓗v for every V = weight_matrix(v), 𝓗 the SM local loss's.

    A = Σ_{k,l} [m_{k,l} + γ(1+1/η) κ_{k,l}/δ_k] z̃z̃ᵀ and U = Σ_{k,l} γ(1+η)/δ_k u uᵀ;
    `delta` None is a first layer (its input is data, 𝓗 = H_θθ): A = Σ m z̃z̃ᵀ and U None (0).
    Both are sums over samples, so a batch's factors are the sums of its microbatches'. The
    products run in `dtype` (float32 halves their cost; damp the sum by eps(dtype) relative
    to its trace before solving, kronecker_solve.damped_factor).
    """
    a_weights, u_weights = factor_weights(terms, delta, eta)
    a = weighted_gram(terms.inputs, a_weights, dtype)
    if u_weights is None:
        return a, None
    return a, weighted_gram(terms.cotangents, u_weights, dtype)

