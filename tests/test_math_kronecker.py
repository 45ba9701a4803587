"""The Kronecker-factored SM bound (sm_dist/math/kronecker*.py) against dense float64 references."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from sm_dist.math.curvature import damped_curvature, initial_vectors, power_iteration
from sm_dist.math.kronecker import (
    LayerTerms,
    activation_derivatives,
    endpoint_bound,
    fold_bias,
    kronecker_factors,
    largest_curvature,
    linear_lambda_estimate,
    linear_layer_terms,
    spectral_norm_sq,
    split_weight_matrix,
    terms_gradient,
    terms_root,
    unit_power_rounds,
    weight_matrix,
)
from sm_dist.math.kronecker_conv import (
    ConvGeometry,
    conv_lambda_estimate,
    conv_largest_curvature,
    conv_layer_terms,
    unpooled,
)
from sm_dist.math.kronecker_gram import input_gram, summed_input_gram
from sm_dist.math.kronecker_solve import (
    damped_factor,
    floored_inverse,
    fresh_eigenbasis,
    input_layer_step,
    inverse_factor,
    kronecker_model_value,
    kronecker_step,
    model_value,
    rounding_floor,
    stale_eigenbasis,
)
from sm_dist.math.stage_function import StageFunction

DTYPE = torch.float64
ETAS = (0.5, 1.0, 2.0)
SEEDS = (0, 1, 2)
DELTA_REL = 0.5
POWER_ROUNDS = 3  # few on purpose: A's certified κ must keep the bound whatever λ's estimate


# ------------------------------------------------------------------------ dense references
# Self-contained: tests/helpers_math imports the whole package, not only its math.
def param_dict(module: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name, p in module.named_parameters():
        out[name] = theta[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def psi_derivatives(module: nn.Module, z: Tensor, g: Tensor,
                    c: Tensor) -> tuple[Tensor, Tensor]:
    """(∇Ψ, ∇²Ψ) in x = [flat z, flat θ] (parameters() order), Ψ written from spec §2."""
    with torch.no_grad():
        z_out = module(z)
    nz = z.numel()
    cs = c.reshape(-1, *([1] * (z_out.dim() - 1)))

    def psi(x: Tensor) -> Tensor:
        out = functional_call(module, param_dict(module, x[nz:]), (x[:nz].view_as(z),))
        res = out - z_out
        return (g * res).sum() + 0.5 * (cs * res * res).sum()

    x0 = torch.cat([z.reshape(-1)] + [p.detach().reshape(-1) for p in module.parameters()])
    return torch.func.grad(psi)(x0), torch.func.hessian(psi)(x0)


def local_hessian(hessian: Tensor, z: Tensor, delta: Tensor | None) -> Tensor:
    """𝓗 = H_θθ + H_θz Δ⁻¹ H_zθ, Δ = δ_k on sample k's input block (δ None: H_θθ)."""
    nz = z.numel()
    htt, hzt = hessian[nz:, nz:], hessian[:nz, nz:]
    if delta is None:
        return htt
    inverse = (1.0 / delta).repeat_interleave(nz // z.shape[0])
    return htt + hzt.T @ (inverse[:, None] * hzt)


def sample_blocks(hessian: Tensor, z: Tensor) -> list[Tensor]:
    """Each sample's diagonal block of H_zz."""
    size = z.numel() // z.shape[0]
    return [hessian[k * size:(k + 1) * size, k * size:(k + 1) * size] for k in range(len(z))]


def bound_matrix(a: Tensor, u: Tensor | None, layer: nn.Module) -> Tensor:
    """B with vᵀBv = ⟨V, UV + VA⟩, V = weight_matrix(v), in the layer's parameters() order."""
    weight, bias = layer.weight, layer.bias
    columns = []
    for e in torch.eye(sum(p.numel() for p in layer.parameters()), dtype=DTYPE):
        v = weight_matrix(e[:weight.numel()].view_as(weight),
                          None if bias is None else e[weight.numel():])
        bv = v @ a if u is None else v @ a + u @ v
        w_part, b_part = split_weight_matrix(bv, weight.shape, bias is not None)
        columns.append(torch.cat([w_part.reshape(-1)] + ([] if b_part is None else [b_part])))
    return torch.stack(columns, dim=1)


def min_eig(matrix: Tensor) -> float:
    return float(torch.linalg.eigvalsh(0.5 * (matrix + matrix.T)).min())


def assert_scaled_close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """Close relative to the reference's largest entry (entries near 0 do not blow it up)."""
    torch.testing.assert_close(actual, expected, rtol=0.0,
                               atol=rtol * float(expected.abs().max()))


def top_ratio(bound: Tensor, hessian: Tensor) -> float:
    """λ_max(B)/λ_max(𝓗): how far the bound overshoots along 𝓗's own top curvature (not a
    norm ratio: a smooth first layer's 𝓗 = H_θθ may have a larger negative eigenvalue)."""
    top = torch.linalg.eigvalsh(0.5 * (hessian + hessian.T)).max()
    return float(torch.linalg.eigvalsh(0.5 * (bound + bound.T)).max() / top)


# ----------------------------------------------------------------------------- layer cases
ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {
    "linear": None, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class Case:
    """One layer at a base point: its module (layer, activation, pooling), inputs, g and c."""

    module: nn.Sequential
    layer: nn.Module
    z: Tensor
    g: Tensor
    c: Tensor
    activation: nn.Module | None
    pool: nn.MaxPool2d | None = None

    def terms(self) -> LayerTerms:
        w, b = self.layer.weight.detach(), _detached(self.layer.bias)
        if isinstance(self.layer, nn.Conv2d):
            return conv_layer_terms(self.z, w, b, self.g, self.c, ConvGeometry.of(self.layer),
                                    self.activation, self.pool)
        return linear_layer_terms(self.z, w, b, self.g, self.c, self.activation)

    def lam_estimate(self, terms: LayerTerms, rounds: int, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        w = self.layer.weight.detach()
        if isinstance(self.layer, nn.Conv2d):
            geometry = ConvGeometry.of(self.layer)
            size = terms.curvature.abs().transpose(1, 2).reshape(
                self.z.shape[0], w.shape[0], *geometry.output_size(self.z.shape[-2:]))
            return conv_lambda_estimate(w, size, geometry, self.z.shape, rounds,
                                        generator=gen)[0]
        return linear_lambda_estimate(w, terms_root(terms), rounds, generator=gen)[0]


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def received(module: nn.Module, z: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random g at the module's output and per-sample c ~ 1/n, g as large as c: the σ''·g
    terms matter."""
    with torch.no_grad():
        out = module(z)
    n = z.shape[0]
    g = torch.randn(out.shape, generator=gen, dtype=DTYPE) / n
    c = (0.5 + torch.rand(n, generator=gen, dtype=DTYPE)) / n
    return g, c


def linear_case(activation: str, seed: int, bias: bool = True) -> Case:
    """Linear 4 → 5 with spectral norm 2.5 (tanh/GELU/SiLU well inside their bends), 5 samples."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(4, 5, bias=bias).to(DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 4, generator=gen, dtype=DTYPE))
        layer.weight.mul_(2.5 / torch.linalg.matrix_norm(layer.weight, 2))
        if bias:
            layer.bias.copy_(0.5 * torch.randn(5, generator=gen, dtype=DTYPE))
    factory = ACTIVATIONS[activation]
    act = None if factory is None else factory()
    module = nn.Sequential(layer) if act is None else nn.Sequential(layer, act)
    z = torch.randn(5, 4, generator=gen, dtype=DTYPE)
    return Case(module, layer, z, *received(module, z, gen), act)


# (activation, pooling, stride, padding, bias): cnn.py's block, a strided one, overlapping
# pooling windows (a pixel selected by several windows), and no bias.
CONV_CASES = {
    "relu-maxpool": ("relu", (2, 2), 1, 1, True),
    "tanh-stride2": ("tanh", None, 2, 1, True),
    "gelu-overlapping-pool": ("gelu", (3, 1), 1, 1, True),
    "silu-maxpool-nobias": ("silu", (2, 2), 1, 0, False),
}


def conv_case(name: str, seed: int) -> Case:
    """Conv2d 2 → 3 channels, 3x3 kernel, on 3 samples of 5x5, weights of norm ~2."""
    activation, pool_shape, stride, padding, bias = CONV_CASES[name]
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, bias=bias).to(DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 2, 3, 3, generator=gen, dtype=DTYPE) / 2.0)
        if bias:
            layer.bias.copy_(0.5 * torch.randn(3, generator=gen, dtype=DTYPE))
    factory = ACTIVATIONS[activation]
    assert factory is not None
    act = factory()
    pool = None if pool_shape is None else nn.MaxPool2d(pool_shape[0], stride=pool_shape[1])
    module = nn.Sequential(layer, act, *([] if pool is None else [pool]))
    z = torch.randn(3, 2, 5, 5, generator=gen, dtype=DTYPE)
    return Case(module, layer, z, *received(module, z, gen), act, pool)


def check_bound(case: Case, first: bool, seed: int) -> list[float]:
    """B − 𝓗 ⪰ 0 for every η, the terms' gradient is Ψ's and the certified λ bounds H_zz;
    returns λ_max(B)/λ_max(𝓗) per η (the bound's tightness)."""
    grad, hessian = psi_derivatives(case.module, case.z, case.g, case.c)
    terms = case.terms()
    w, b = split_weight_matrix(terms_gradient(terms), case.layer.weight.shape,
                               case.layer.bias is not None)
    flat = torch.cat([w.reshape(-1)] + ([] if b is None else [b]))
    torch.testing.assert_close(flat, grad[case.z.numel():], rtol=0.0, atol=1e-13)
    exact = torch.stack([torch.linalg.eigvalsh(block).abs().max()
                         for block in sample_blocks(hessian, case.z)])
    assert bool((terms.lam_bound >= exact * (1 - 1e-12)).all())
    lam = case.lam_estimate(terms, POWER_ROUNDS, seed)
    _, delta = damped_curvature(lam, delta_rel=DELTA_REL, delta_abs=0.0, delta_floor=1e-12)
    local = local_hessian(hessian, case.z, None if first else delta)
    ratios = []
    for eta in ETAS:
        a, u = kronecker_factors(terms, None if first else delta, eta)
        bound = bound_matrix(a, u, case.layer)
        assert min_eig(bound - local) >= -1e-10, f"eta={eta}"
        ratios.append(top_ratio(bound, local))
    return ratios


# ------------------------------------------------------------------------------ the bound
def test_activation_derivatives_match_closed_forms() -> None:
    a = torch.linspace(-4.0, 4.0, 41, dtype=DTYPE)
    t, s = torch.tanh(a), torch.sigmoid(a)
    phi, cdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi), 0.5 * (1 + torch.erf(a / 2**0.5))
    expected = {
        nn.Tanh(): (1 - t * t, -2 * t * (1 - t * t)),
        nn.GELU(): (cdf + a * phi, phi * (2 - a * a)),
        nn.SiLU(): (s * (1 + a * (1 - s)), s * (1 - s) * (2 + a * (1 - 2 * s))),
        nn.ReLU(): ((a > 0).to(DTYPE), torch.zeros_like(a)),
    }
    for act, (first, second) in expected.items():
        value, d1, d2 = activation_derivatives(act, a)
        torch.testing.assert_close(value, act(a), rtol=0.0, atol=1e-15)
        torch.testing.assert_close(d1, first, rtol=0.0, atol=1e-14)
        torch.testing.assert_close(d2, second, rtol=0.0, atol=1e-14)
    value, d1, d2 = activation_derivatives(None, a)
    assert torch.equal(value, a) and bool((d1 == 1).all()) and bool((d2 == 0).all())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("first", [True, False], ids=["first", "inner"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_linear_bound_dominates_local_hessian(activation: str, first: bool, seed: int) -> None:
    ratios = check_bound(linear_case(activation, seed), first, seed)
    assert max(ratios) <= (2.0 if first else 10.0)


def test_linear_bound_without_bias() -> None:
    check_bound(linear_case("relu", 3, bias=False), False, 3)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("first", [True, False], ids=["first", "inner"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_bound_dominates_local_hessian(name: str, first: bool, seed: int) -> None:
    ratios = check_bound(conv_case(name, seed), first, seed)
    assert max(ratios) <= (2.0 if first else 40.0)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "silu"])
def test_certified_cross_curvature(activation: str) -> None:
    """κ_k ≥ ‖M_k W₀‖² always, and how tightly: within 2.5x on the tiny layers over seeds; on a
    128 → 128 layer at PyTorch's initialisation within 1.8x for ReLU and 4.2x for the smooth
    ones, whose M varies more across units (this generator: 1.49; 3.61, 3.82, 3.72)."""
    limit = 1.8 if activation == "relu" else 4.2
    cases = [linear_case(activation, seed) for seed in range(6)]
    gen = torch.Generator().manual_seed(0)
    wide = nn.Sequential(nn.Linear(128, 128), ACTIVATIONS[activation]()).to(DTYPE)
    with torch.no_grad():  # PyTorch's default initialisation, from this test's own generator
        for p in wide.parameters():
            p.uniform_(-128**-0.5, 128**-0.5, generator=gen)
    z = torch.randn(32, 128, generator=gen, dtype=DTYPE)
    cases.append(Case(wide, wide[0], z, *received(wide, z, gen), wide[1]))
    for index, case in enumerate(cases):
        terms = case.terms()
        w0 = case.layer.weight.detach()
        exact = torch.stack([torch.linalg.matrix_norm(m[:, None] * w0, 2) ** 2
                             for m in terms.curvature[:, 0]])
        kappa = terms.cross_curvature[:, 0]
        assert bool((kappa >= exact * (1 - 1e-12)).all())
        live = exact > 0
        assert float((kappa[live] / exact[live]).max()) <= (2.5 if index < 6 else limit)


def test_endpoint_bound() -> None:
    """λ_max(Σ_i a_i w_iw_iᵀ) ≤ endpoint_bound = min(max a·‖W₀‖², Σ_i a_i‖w_i‖²), densely; each
    end is the tight one somewhere (a constant a: the spectral end; one nonzero a_i: the trace)."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 4, generator=gen, dtype=DTYPE)
    weights = torch.rand(20, 7, generator=gen, dtype=DTYPE) ** 3
    weights[0] = 0.0
    weights[1] = 2.0  # constant: the spectral bound is exact
    weights[2] = 0.0
    weights[2, 3] = 1.5  # one row: rank one, the trace is exact
    spectral_sq = spectral_norm_sq(w0)
    assert spectral_sq == pytest.approx(float(torch.linalg.svdvals(w0)[0]) ** 2, rel=1e-12)
    row_sq = w0.square().sum(dim=1)
    bound = endpoint_bound(weights, row_sq, spectral_sq)
    exact = torch.stack([torch.linalg.eigvalsh(w0.T @ (a[:, None] * w0)).max() for a in weights])
    assert bool((bound >= exact - 1e-12).all())
    assert float(bound[0]) == 0.0
    assert float(bound[1]) == pytest.approx(2.0 * spectral_sq, rel=1e-12)
    assert float(bound[2]) == pytest.approx(float(exact[2]), rel=1e-12)
    assert float(bound[2]) == pytest.approx(1.5 * float(row_sq[3]), rel=1e-12)


def test_bound_can_fail() -> None:
    """Negative controls on an inner ReLU layer: without the (1+η), (1+1/η) factors, or with
    the note's κ = c·λ from a one-round power estimate of λ, B − 𝓗 has a negative eigenvalue."""
    case = linear_case("relu", 1)
    _, hessian = psi_derivatives(case.module, case.z, case.g, case.c)
    terms = case.terms()
    lam = case.lam_estimate(terms, 1, 1)
    _, delta = damped_curvature(lam, delta_rel=DELTA_REL, delta_abs=0.0, delta_floor=1e-12)
    local = local_hessian(hessian, case.z, delta)
    a, u = kronecker_factors(terms, delta, 1.0)
    assert min_eig(bound_matrix(a, u, case.layer) - local) >= -1e-10
    assert u is not None
    weights = terms.theta_curvature + terms.cross_curvature / delta[:, None]  # no η factors
    rows = terms.inputs[:, 0]
    bare_u = 0.5 * u  # (1+η)/δ with η = 1, halved: 1/δ
    bare = bound_matrix(rows.T @ (weights * rows), bare_u, case.layer)
    assert min_eig(bare - local) < -1e-3
    note = dataclasses.replace(terms, cross_curvature=(case.c * lam)[:, None])
    a_note, u_note = kronecker_factors(note, delta, 1.0)
    assert min_eig(bound_matrix(a_note, u_note, case.layer) - local) < -1e-3


# ----------------------------------------------------------------------------- λ per sample
@pytest.mark.parametrize("pool", [None, (2, 2), (3, 1)])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("dead", [False, True])
def test_the_largest_curvature_of_a_first_layer_is_the_terms(pool: tuple[int, int] | None,
                                                             activation: str,
                                                             dead: bool) -> None:
    """max m of a first layer (the gram bound needs only it), without the terms: the same
    number as the terms', or None where the shortcut does not hold (overlapping windows, a
    curved activation); `dead`: no unit active anywhere, m = 0."""
    base = conv_case("relu-maxpool", 7)
    conv = base.layer
    if dead:
        with torch.no_grad():
            conv.bias.fill_(-100.0)
    factory = ACTIVATIONS[activation]
    assert factory is not None
    act = factory()
    max_pool = None if pool is None else nn.MaxPool2d(pool[0], stride=pool[1])
    module = nn.Sequential(conv, act, *([] if max_pool is None else [max_pool]))
    g, c = received(module, base.z, torch.Generator().manual_seed(8))
    case = dataclasses.replace(base, module=module, g=g, c=c, activation=act, pool=max_pool)
    with torch.no_grad():
        pre, out = conv(case.z), module(case.z)
    expected = float(case.terms().theta_curvature.max())
    fast = conv_largest_curvature(pre, out, case.c, act, max_pool)
    if activation == "relu" and pool != (3, 1):
        assert fast == expected and (expected == 0.0) == dead
    else:
        assert fast is None
    linear = linear_case(activation, 7)
    with torch.no_grad():
        if dead:
            linear.layer.bias.fill_(-100.0)
        linear_pre = linear.layer(linear.z)
    assert largest_curvature(linear_pre, linear.g, linear.c, linear.activation) == float(
        linear.terms().theta_curvature.max())


@pytest.mark.parametrize("shape", [(4, 3), (4, 2, 3, 3)])
def test_a_power_round_keeps_the_vector_of_a_row_whose_product_vanishes(
        shape: tuple[int, ...]) -> None:
    """One round: λ = |⟨u, Hu⟩| per row and Hu normalised, except a row whose product is zero
    (a sample with no active unit), which keeps its start, as a Linear layer's and a
    convolution's rows."""
    gen = torch.Generator().manual_seed(5)
    start = torch.nn.functional.normalize(
        torch.randn(shape, generator=gen, dtype=DTYPE).flatten(1), dim=1).reshape(shape)
    weights = torch.tensor([2.0, 0.0, 0.5, 0.0], dtype=DTYPE).reshape(-1, *[1] * (len(shape) - 1))
    lam, reached = unit_power_rounds(lambda v: weights * v.square(), start, 1)
    product = (weights * start.square()).flatten(1)
    torch.testing.assert_close(lam, (start.flatten(1) * product).sum(dim=1).abs(), rtol=0,
                               atol=0)
    for row in (0, 2):
        torch.testing.assert_close(reached[row].flatten(), product[row] / product[row].norm(),
                                   rtol=1e-15, atol=0)
    for row in (1, 3):
        assert torch.equal(reached[row], start[row])


@pytest.mark.parametrize("activation", ["linear", "relu", "tanh", "gelu"])
def test_linear_lambda_estimate_converges(activation: str) -> None:
    """Many rounds reach λ_max(W₀ᵀ|M|W₀) (dense), which is ‖H_zz‖ exactly for ReLU and a
    linear head and bounds it otherwise; the certified λ bounds both."""
    case = linear_case(activation, 4)
    _, hessian = psi_derivatives(case.module, case.z, case.g, case.c)
    terms = case.terms()
    w0 = case.layer.weight.detach()
    size = terms.curvature[:, 0].abs()
    dense = torch.stack([torch.linalg.eigvalsh(w0.T @ (m[:, None] * w0)).max() for m in size])
    exact = torch.stack([torch.linalg.eigvalsh(b).abs().max()
                         for b in sample_blocks(hessian, case.z)])
    lam = case.lam_estimate(terms, 400, 0)
    torch.testing.assert_close(lam, dense, rtol=1e-9, atol=0.0)
    assert bool((dense >= exact * (1 - 1e-12)).all())
    if activation in ("linear", "relu"):
        torch.testing.assert_close(dense, exact, rtol=1e-10, atol=0.0)
    assert bool((terms.lam_bound >= dense * (1 - 1e-12)).all())


def test_conv_lambda_estimate_converges() -> None:
    """ReLU + max pooling: the two-convolution power iteration reaches ‖H_zz‖ of each sample."""
    case = conv_case("relu-maxpool", 5)
    _, hessian = psi_derivatives(case.module, case.z, case.g, case.c)
    terms = case.terms()
    exact = torch.stack([torch.linalg.eigvalsh(b).abs().max()
                         for b in sample_blocks(hessian, case.z)])
    torch.testing.assert_close(case.lam_estimate(terms, 400, 0), exact, rtol=1e-9, atol=0.0)
    assert bool((terms.lam_bound >= exact).all())


def test_two_layer_stage_sends_what_layer_by_layer_sm_sends() -> None:
    """A stage Linear+ReLU → Linear+ReLU treated as two SM layers: the g, λ, δ and c each
    layer sends down equal those of two one-layer SM stages (StageFunction, exact λ)."""
    gen = torch.Generator().manual_seed(11)
    bottom = nn.Sequential(nn.Linear(3, 5), nn.ReLU()).to(DTYPE)
    top = nn.Sequential(nn.Linear(5, 4), nn.ReLU()).to(DTYPE)
    with torch.no_grad():  # from this test's generator, whatever ran before
        for p in [*bottom.parameters(), *top.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE))
    z = torch.randn(6, 3, generator=gen, dtype=DTYPE)
    with torch.no_grad():
        middle = bottom(z)
    g, c = received(top, middle, gen)
    whole_stage = StageFunction.build(nn.Sequential(*bottom, *top), z, g, c)
    damping = {"delta_rel": 0.3, "delta_abs": 1e-4, "delta_floor": 1e-12}
    for stage, inputs in ((top, middle), (bottom, z)):
        layer = stage[0]
        terms = linear_layer_terms(inputs, layer.weight.detach(), layer.bias.detach(), g, c,
                                   stage[1])
        lam = linear_lambda_estimate(layer.weight.detach(), terms_root(terms), 500,
                                     generator=torch.Generator().manual_seed(0))[0]
        c_below, delta = damped_curvature(lam, **damping)
        g_below = terms.cotangents[:, 0] @ layer.weight.detach()  # u·W₀: ∂Ψ/∂z
        fn = StageFunction.build(stage, inputs, g, c)
        ref_g = fn.gradients()[0]
        assert ref_g is not None
        ref_lam, _ = power_iteration(fn.hvp_zz, initial_vectors(inputs, gen), 500)
        ref_c, ref_delta = damped_curvature(ref_lam, **damping)
        torch.testing.assert_close(g_below, ref_g, rtol=0.0, atol=1e-15)
        torch.testing.assert_close(c_below, ref_c, rtol=1e-9, atol=0.0)
        torch.testing.assert_close(delta, ref_delta, rtol=1e-9, atol=0.0)
        g, c = g_below, c_below
    # What leaves the bottom layer is the whole stage's ∂Ψ/∂z, as a stage would send it.
    stage_g = whole_stage.gradients()[0]
    assert stage_g is not None
    torch.testing.assert_close(g, stage_g, rtol=0.0, atol=1e-15)


# ----------------------------------------------------------------------------- accumulation
def test_microbatch_factors_sum_to_the_batch_factors() -> None:
    """Per-sample terms do not depend on the batch they come in, and the factors add up:
    exactly (bitwise) on dyadic values, to round-off on real ones."""
    case = linear_case("tanh", 6)
    halves = (slice(0, 2), slice(2, 5))
    whole = case.terms()
    delta = 0.1 + case.c
    parts = [dataclasses.replace(case, z=case.z[s], g=case.g[s], c=case.c[s]).terms()
             for s in halves]
    for s, part in zip(halves, parts):
        torch.testing.assert_close(part.cross_curvature, whole.cross_curvature[s],
                                   rtol=1e-15, atol=0.0)
    a, u = kronecker_factors(whole, delta, 2.0)
    split = [kronecker_factors(p, delta[s], 2.0) for p, s in zip(parts, halves)]
    assert u is not None and split[0][1] is not None and split[1][1] is not None
    assert_scaled_close(split[0][0] + split[1][0], a, 1e-14)
    assert_scaled_close(split[0][1] + split[1][1], u, 1e-14)

    gen = torch.Generator().manual_seed(0)

    def dyadic(*shape: int) -> Tensor:  # small multiples of 1/8: every sum below is exact
        return torch.randint(-16, 17, shape, generator=gen).to(DTYPE) / 8

    n, steps = 6, [0, 1, 4, 6]
    terms = LayerTerms(dyadic(n, 2, 4), dyadic(n, 2, 3), dyadic(n, 2, 3), dyadic(n, 2).abs(),
                       dyadic(n, 2).abs(), dyadic(n).abs(), coverage=2)
    delta = 2.0 ** torch.randint(-2, 3, (n,), generator=gen).to(DTYPE)
    for eta, first in ((1.0, False), (0.5, False), (1.0, True)):
        chunks = [kronecker_factors(_rows(terms, i, j), None if first else delta[i:j], eta)
                  for i, j in zip(steps, steps[1:])]
        a, u = kronecker_factors(terms, None if first else delta, eta)
        assert torch.equal(sum(ch[0] for ch in chunks), a)
        if not first:
            assert torch.equal(sum(ch[1] for ch in chunks), u)  # type: ignore[misc]


def _rows(terms: LayerTerms, start: int, stop: int) -> LayerTerms:
    return dataclasses.replace(
        terms, inputs=terms.inputs[start:stop], cotangents=terms.cotangents[start:stop],
        curvature=terms.curvature[start:stop],
        theta_curvature=terms.theta_curvature[start:stop],
        cross_curvature=terms.cross_curvature[start:stop], lam_bound=terms.lam_bound[start:stop])


# ----------------------------------------------------------------------------------- solves
def spd(size: int, gen: torch.Generator, rank: int | None = None) -> Tensor:
    x = torch.randn(size, rank or size + 2, generator=gen, dtype=DTYPE)
    return x @ x.T


def test_kronecker_step_solves_the_dense_system() -> None:
    """UV + VA = −G against a dense solve of (U⊗I + I⊗A) vec(V) = −vec(G), vec row-major
    (torch's reshape(-1)); the column-major form is (A⊗I + I⊗U) vec_c(V) = −vec_c(G)."""
    gen = torch.Generator().manual_seed(0)
    a, u = spd(5, gen), spd(3, gen)
    grad = torch.randn(3, 5, generator=gen, dtype=DTYPE)
    step = kronecker_step(grad, fresh_eigenbasis(a), fresh_eigenbasis(u))
    row_major = torch.kron(u, torch.eye(5, dtype=DTYPE)) + torch.kron(torch.eye(3, dtype=DTYPE), a)
    torch.testing.assert_close(step.reshape(-1), torch.linalg.solve(row_major, -grad.reshape(-1)),
                               rtol=1e-10, atol=0.0)
    col_major = torch.kron(a, torch.eye(3, dtype=DTYPE)) + torch.kron(torch.eye(5, dtype=DTYPE), u)
    torch.testing.assert_close(step.T.reshape(-1),
                               torch.linalg.solve(col_major, -grad.T.reshape(-1)),
                               rtol=1e-10, atol=0.0)
    value = kronecker_model_value(grad, step, fresh_eigenbasis(a), fresh_eigenbasis(u))
    assert value == pytest.approx(model_value(grad, step, a, u), rel=1e-12)
    assert value == pytest.approx(0.5 * float((grad * step).sum()), rel=1e-12)
    assert value < 0
    # U = 0 (a first layer): the eigenbasis solve and Cholesky agree with −G A⁻¹.
    expected = -grad @ torch.linalg.inv(a)
    torch.testing.assert_close(kronecker_step(grad, fresh_eigenbasis(a)), expected,
                               rtol=1e-10, atol=0.0)
    torch.testing.assert_close(input_layer_step(grad, inverse_factor(a)), expected,
                               rtol=1e-10, atol=0.0)
    torch.testing.assert_close(input_layer_step(grad, inverse_factor(a), 4.0), expected / 4,
                               rtol=1e-10, atol=0.0)
    assert kronecker_model_value(grad, expected, fresh_eigenbasis(a)) == pytest.approx(
        model_value(grad, expected, a), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_stale_eigenbasis_keeps_the_bound(seed: int) -> None:
    """Bases from other weights (an earlier step) bound today's factors, so B' ⪰ B ⪰ 𝓗, and the
    step solves B' exactly."""
    case = linear_case("relu", seed)
    _, hessian = psi_derivatives(case.module, case.z, case.g, case.c)
    delta = DELTA_REL * case.terms().lam_bound + 1e-3
    a, u = kronecker_factors(case.terms(), delta, 1.0)
    assert u is not None
    old = dataclasses.replace(linear_case("relu", seed + 10), z=case.z, c=case.c)
    old_a, old_u = kronecker_factors(old.terms(), delta, 1.0)
    assert old_u is not None
    a_basis = stale_eigenbasis(a, fresh_eigenbasis(old_a).vectors)
    u_basis = stale_eigenbasis(u, fresh_eigenbasis(old_u).vectors)
    stale = bound_matrix(a_basis.matrix(), u_basis.matrix(), case.layer)
    assert min_eig(stale - bound_matrix(a, u, case.layer)) >= -1e-10
    assert min_eig(stale - local_hessian(hessian, case.z, delta)) >= -1e-10
    grad = terms_gradient(case.terms())
    step = kronecker_step(grad, a_basis, u_basis)
    torch.testing.assert_close(step @ a_basis.matrix() + u_basis.matrix() @ step, -grad,
                               rtol=0.0, atol=1e-10 * float(grad.abs().max()))
    assert kronecker_model_value(grad, step, a_basis, u_basis) == pytest.approx(
        model_value(grad, step, a_basis.matrix(), u_basis.matrix()), rel=1e-10)
    # With its own current basis the stale bound is the factor itself (r = λ).
    current = stale_eigenbasis(a, fresh_eigenbasis(a).vectors)
    torch.testing.assert_close(current.matrix(), a, rtol=0.0, atol=1e-12 * float(a.abs().max()))


def test_damping_floor_and_first_layer_gram() -> None:
    """Damping and the floor only raise a factor; a first layer on fewer samples than inputs
    (A singular) gets a finite step once floored; max m·Z̃ᵀZ̃ bounds A, and its step is the
    Cholesky solve of the scaled Gram matrix."""
    gen = torch.Generator().manual_seed(3)
    a = spd(6, gen, rank=3)
    for damp in (0.0, 0.1, 0.3):
        damped = damped_factor(a, damp)
        assert min_eig(damped - a) >= 0.0
        assert float(torch.trace(damped - a)) == pytest.approx(
            (damp + 1e-12) * float(torch.trace(a)), rel=1e-12)
    assert rounding_floor(torch.float64) == 1e-12
    assert rounding_floor(torch.float32) == pytest.approx(10 * 2.0 ** -23)
    assert damped_factor(a.float()).dtype == torch.float64
    grad = torch.randn(2, 6, generator=gen, dtype=DTYPE)
    with pytest.raises(ValueError, match="positive definite"):
        inverse_factor(torch.zeros(6, 6, dtype=DTYPE))
    step = input_layer_step(grad, inverse_factor(damped_factor(a)))
    assert bool(torch.isfinite(step).all())
    zero = kronecker_step(torch.zeros_like(grad), fresh_eigenbasis(torch.zeros(6, 6, dtype=DTYPE)))
    assert bool((zero == 0).all())  # no curvature, no gradient: no step (not 0/0)
    case = linear_case("relu", 2)
    terms = case.terms()
    a_first, _ = kronecker_factors(terms, None, 1.0)
    gram = input_gram(terms.inputs)
    scale = float(terms.theta_curvature.max())
    assert min_eig(scale * gram - a_first) >= -1e-12
    # In float32 the sum differs from float64's by rounding only.
    torch.testing.assert_close(input_gram(terms.inputs, torch.float32).double(), gram,
                               rtol=1e-5, atol=1e-5 * float(gram.abs().max()))
    lower = inverse_factor(damped_factor(gram, 0.1))  # once per batch
    grad = terms_gradient(terms)
    expected = -grad @ torch.linalg.inv(scale * damped_factor(gram, 0.1))
    assert_scaled_close(input_layer_step(grad, lower, scale), expected, 1e-10)


@pytest.mark.parametrize("size", [6, 300])
def test_the_inverse_taken_in_place_has_the_bits_of_the_out_of_place_routines(size: int) -> None:
    """inverse_factor(in_place=True) leaves the inverse in the factor's own storage (one d²
    matrix alive on stage 0) with exactly the copying call's bits, exactly symmetric, and
    torch's out-of-place Cholesky and inverse to rounding (to the bit with some LAPACK builds;
    an AMD EPYC's differs by 4e-16 on the 6 × 6 matrix); the copying call leaves its input
    alone."""
    gen = torch.Generator().manual_seed(5)
    a = damped_factor(spd(size, gen), 0.1)
    expected = torch.cholesky_inverse(torch.linalg.cholesky(a))
    kept = a.clone()
    copied = inverse_factor(a)
    torch.testing.assert_close(copied, expected, rtol=0,
                               atol=1e-14 * float(expected.abs().max()))
    assert torch.equal(a, kept)
    inverse = inverse_factor(a, in_place=True)
    assert inverse.data_ptr() == a.data_ptr()
    assert torch.equal(inverse, copied)
    assert torch.equal(inverse, inverse.T)


@pytest.mark.parametrize("width", [5, 128, 300])  # one block, exactly one, several and a rest
def test_a_gram_matrix_summed_in_place_has_the_bits_of_the_sum_of_symmetrised_parts(
        width: int) -> None:
    """Stage 0 sums its microbatches' Z̃ᵀZ̃ in place (one d² matrix alive): the result is
    bit-for-bit the sum of the separately symmetrised matrices, exactly symmetric, and so is
    the damped factor shifted in that storage."""
    gen = torch.Generator().manual_seed(width)
    parts = [torch.randn(n, width, generator=gen) for n in (7, 11, 3)]

    def symmetrised(rows: Tensor) -> Tensor:
        product = rows.double().T @ rows.double()
        return (product + product.T) * 0.5

    expected = symmetrised(parts[0])
    for rows in parts[1:]:
        expected = expected + symmetrised(rows)
    summed = input_gram(parts[0])
    for rows in parts[1:]:
        assert input_gram(rows, into=summed) is summed
    assert torch.equal(summed, expected)
    assert torch.equal(summed, summed.T)
    copied = damped_factor(expected, 0.1)
    shifted = damped_factor(summed, 0.1, in_place=True)
    assert shifted.data_ptr() == summed.data_ptr() and torch.equal(shifted, copied)


class _NewTensors(TorchDispatchMode):
    """The shapes of the tensors each op makes anew (in-place ops make none)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in (*args, *(kwargs or {}).values())
                 if isinstance(t, Tensor)}
        if isinstance(out, Tensor) and out.untyped_storage().data_ptr() not in given:
            self.shapes.append(tuple(out.shape))  # not a view, not written in place
        return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_gram_matrix_summed_in_blocks_is_the_whole_one_without_its_products(
        dtype: torch.dtype) -> None:
    """gram_block: stage 0's Z̃ᵀZ̃ summed a few samples at a time by addmm is the microbatch-
    at-a-time sum up to rounding, exactly symmetric, and forms no d × d matrix but the sum
    and no rows of a whole microbatch; the microbatch-at-a-time sum forms one per microbatch."""
    gen = torch.Generator().manual_seed(2)
    # wider than symmetrize_'s blocks, whose temporaries are then narrower than the sum
    inputs = [torch.randn(n, 200, generator=gen, dtype=dtype) for n in (30, 30, 17)]

    def rows_of(x: Tensor) -> Tensor:
        return fold_bias(x, True)

    whole = summed_input_gram(inputs, rows_of)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for block in (1, 8, 30, 64):
        made = _NewTensors()
        with made:
            blocked = summed_input_gram(inputs, rows_of, block)
        assert blocked.dtype == dtype and torch.equal(blocked, blocked.T)
        torch.testing.assert_close(blocked, whole, rtol=tolerance,
                                   atol=tolerance * float(whole.abs().max()))
        assert made.shapes.count((201, 201)) == 1, block  # the sum, formed once
        rows = [shape for shape in made.shapes if len(shape) == 2 and shape[1] == 201
                and shape != (201, 201)]
        assert rows and max(shape[0] for shape in rows) == min(block, 30), block
    made = _NewTensors()
    with made:
        summed_input_gram(inputs, rows_of)
    assert made.shapes.count((201, 201)) == len(inputs)


def test_a_factor_indefinite_by_rounding_is_floored_until_cholesky_accepts_it() -> None:
    """One dominant direction (a first layer's inputs' mean) and rounding of about
    eps·λ_max leave A indefinite beyond the floor relative to tr/dim: the inverse takes the
    first tenfold floor that works, with the bits of the direct inverse at that floor; a
    factor that needs no more is inverted as before; a non-finite one fails in one line."""
    gen = torch.Generator().manual_seed(11)
    dim, floor = 40, rounding_floor(torch.float32)
    mean = torch.randn(dim, 1, generator=gen, dtype=DTYPE)
    noise = torch.randn(dim, dim, generator=gen, dtype=DTYPE)
    rounding = (noise + noise.T) * 1e-7 * float(mean.square().sum())  # ≈ eps·λ_max
    a = mean @ mean.T + rounding
    assert min_eig(damped_factor(a, 0.0, floor)) < 0.0  # the trace floor does not cover it
    with pytest.raises(ValueError, match="positive definite"):
        inverse_factor(damped_factor(a, 0.0, floor))
    floors: list[float] = []

    def damped_with(f: float) -> Tensor:
        floors.append(f)
        return damped_factor(a, 0.0, f)

    inverse = floored_inverse(damped_with, floor)
    assert len(floors) > 1 and floors == [floor * 10.0 ** k for k in range(len(floors))]
    assert torch.equal(inverse, inverse_factor(damped_factor(a, 0.0, floors[-1])))
    assert min_eig(damped_factor(a, 0.0, floors[-1]) - a) >= 0.0  # still an upper bound
    spd_a = spd(6, gen)
    assert torch.equal(floored_inverse(lambda f: damped_factor(spd_a, 0.1, f), floor),
                       inverse_factor(damped_factor(spd_a, 0.1, floor)))
    nan = torch.full((4, 4), float("nan"), dtype=DTYPE)
    with pytest.raises(ValueError, match="stayed indefinite.*float64"):
        floored_inverse(lambda f: nan.clone(), floor)


# ------------------------------------------------------------------------ conv geometry
def test_conv_geometry_and_pooling_selection() -> None:
    """Coverage γ of cnn.py's blocks and strided ones; max pooling's ΠᵀΠ counts overlaps."""
    assert ConvGeometry.of(nn.Conv2d(1, 1, 3, padding=1)).coverage((6, 6)) == 9
    assert ConvGeometry.of(nn.Conv2d(1, 1, 3, padding=1, stride=2)).coverage((6, 6)) == 4
    assert ConvGeometry.of(nn.Conv2d(1, 1, 3, stride=3)).coverage((6, 6)) == 1
    assert ConvGeometry.of(nn.Conv2d(1, 1, 3, padding="valid")).output_size((6, 5)) == (4, 3)
    with pytest.raises(ValueError, match="groups"):
        ConvGeometry.of(nn.Conv2d(2, 2, 3, groups=2))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    for pool in (nn.MaxPool2d(2), nn.MaxPool2d(3, stride=1)):
        out = pool(x.requires_grad_(True))
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
        (expected,) = torch.autograd.grad(out, x, g)
        selected, counts = unpooled(x.detach(), g, pool)
        torch.testing.assert_close(selected, expected, rtol=0.0, atol=1e-15)
        assert float(counts.sum()) == out.numel()  # every pooled output selects one input
        if pool.stride == pool.kernel_size:
            assert float(counts.max()) == 1.0
    with pytest.raises(TypeError, match="MaxPool2d"):
        unpooled(x.detach(), F.avg_pool2d(x.detach(), 2), nn.AvgPool2d(2))  # type: ignore[arg-type]
