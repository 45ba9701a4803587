"""A convolution's factors formed from its pixels a few samples at a time (what sm_kron's
backward does) against the reference rows of conv_layer_terms; the pooling's saved indices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sm_dist.math.kronecker_conv as kronecker_conv
import sm_dist.optim.kron_layers as kron_layers
from sm_dist.math.curvature import damped_curvature
from sm_dist.math.kronecker import DTYPE, kronecker_factors, row_weights
from sm_dist.math.kronecker_conv import (
    ConvGeometry,
    conv_factor_shares,
    conv_layer_terms,
    conv_pixel_terms,
    pool_indices,
    unpooled,
)
from sm_dist.optim.kron_layers import Damping, KronLayer
from tests.test_math_kronecker import (
    CONV_CASES,
    DELTA_REL,
    ETAS,
    POWER_ROUNDS,
    bound_matrix,
    conv_case,
    local_hessian,
    min_eig,
    psi_derivatives,
)


@pytest.mark.parametrize("block_entries", [1, 200, 1 << 20])  # one sample per block, a few, all
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_factor_shares_are_kronecker_factors_of_the_patch_rows(
        name: str, first: bool, block_entries: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A and U from the pixels, blocks of samples of any size, equal A and U of the unfolded
    rows (kronecker_factors of conv_layer_terms) to rounding, both exactly symmetric."""
    monkeypatch.setattr(kronecker_conv, "_BLOCK_ENTRIES", block_entries)
    case = conv_case(name, 11)
    layer = case.layer
    assert isinstance(layer, nn.Conv2d)
    geometry = ConvGeometry.of(layer)
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    args = (case.z, w, b, case.g, case.c, geometry, case.activation, case.pool)
    reference = conv_layer_terms(*args, below=not first)
    pixels = conv_pixel_terms(*args, below=not first)
    delta = None
    if not first:
        assert reference.lam_bound is not None
        delta = DELTA_REL * reference.lam_bound + 1e-3
    expected_a, expected_u = kronecker_factors(reference, delta, 0.5)
    a_weights, u_weights = row_weights(pixels.theta, pixels.cross, pixels.coverage, delta, 0.5)
    a, u = conv_factor_shares(case.z, pixels.cotangents, a_weights, u_weights, geometry,
                              b is not None, DTYPE)
    torch.testing.assert_close(a, expected_a, rtol=0.0, atol=1e-13 * float(a.abs().max()))
    assert torch.equal(a, a.T)
    if first:
        assert u is None and expected_u is None
    else:
        assert u is not None and expected_u is not None
        torch.testing.assert_close(u, expected_u, rtol=0.0, atol=1e-13 * float(u.abs().max()))
        assert torch.equal(u, u.T)


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_the_offset_factor_is_k_times_as_diagonal_blocks_and_keeps_the_bound(
        name: str, first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """conv_factor_shares(offsets=True) is K times A's diagonal blocks, one per kernel offset
    and the bias (K of them), a few samples at a time; K·blockdiag ⪰ A, and with it the
    Kronecker sum B ⪰ 𝓗, checked densely for every η."""
    monkeypatch.setattr(kronecker_conv, "_BLOCK_ENTRIES", 200)
    case = conv_case(name, 12)
    layer = case.layer
    assert isinstance(layer, nn.Conv2d)
    geometry, with_bias = ConvGeometry.of(layer), layer.bias is not None
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    args = (case.z, w, b, case.g, case.c, geometry, case.activation, case.pool)
    reference = conv_layer_terms(*args, below=not first)
    pixels = conv_pixel_terms(*args, below=not first)
    _, hessian = psi_derivatives(case.module, case.z, case.g, case.c)
    delta = None
    if not first:
        lam = case.lam_estimate(reference, POWER_ROUNDS, 12)
        _, delta = damped_curvature(lam, delta_rel=DELTA_REL, delta_abs=0.0, delta_floor=1e-12)
    local = local_hessian(hessian, case.z, delta)
    offsets = geometry.kernel[0] * geometry.kernel[1]
    block_of = torch.arange(reference.inputs.shape[-1]) % offsets  # unfold's order (c, i, j)
    if with_bias:
        block_of[-1] = offsets  # the bias is a block of its own
    same_block = block_of[:, None] == block_of[None, :]
    count = offsets + int(with_bias)
    for eta in ETAS:
        a_weights, u_weights = row_weights(pixels.theta, pixels.cross, pixels.coverage, delta,
                                           eta)
        whole, u = conv_factor_shares(case.z, pixels.cotangents, a_weights, u_weights,
                                      geometry, with_bias, DTYPE)
        loose, loose_u = conv_factor_shares(case.z, pixels.cotangents, a_weights, u_weights,
                                            geometry, with_bias, DTYPE, offsets=True)
        torch.testing.assert_close(loose, count * whole * same_block, rtol=0.0,
                                   atol=1e-13 * float(loose.abs().max()))
        assert torch.equal(loose, loose.T)
        assert (u is None and loose_u is None) or (
            u is not None and loose_u is not None and torch.equal(u, loose_u))
        assert min_eig(loose - whole) >= -1e-12 * float(whole.abs().max())
        assert min_eig(bound_matrix(loose, loose_u, layer) - local) >= -1e-10, f"eta={eta}"


def test_pool_indices_are_the_forwards_and_spare_pooling_again() -> None:
    """The indices read from the pooled output's graph are the ones pooling again finds (so
    unpooled gives the same Πᵀg and counts); none without a graph or once it is freed."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=DTYPE)
    x[0, 0, :2, :2] = 1.0  # a tie in a window: the forward's choice must be kept
    for pool in (nn.MaxPool2d(2), nn.MaxPool2d(3, stride=1)):
        leaf = x.clone().requires_grad_(True)
        out = pool(leaf.relu())
        indices = pool_indices(out)
        assert indices is not None
        _, again = F.max_pool2d(x.relu(), pool.kernel_size, pool.stride, return_indices=True)
        assert torch.equal(indices, again)
        g = torch.randn(out.shape, generator=gen, dtype=DTYPE)
        for mine, theirs in zip(unpooled(x.relu(), g, pool, indices), unpooled(x.relu(), g, pool)):
            assert torch.equal(mine, theirs)
        torch.autograd.grad(out, leaf, g)
        assert pool_indices(out) is None  # the graph is freed
    with torch.no_grad():
        assert pool_indices(nn.MaxPool2d(2)(x)) is None
    assert pool_indices(F.avg_pool2d(x.requires_grad_(True), 2)) is None


def test_a_conv_layers_backward_is_the_same_with_the_forwards_indices() -> None:
    """KronLayer.backward with the pooling's saved indices: the same c sent down and factors,
    to the bit, as pooling again."""
    gen = torch.Generator().manual_seed(4)
    conv, act, pool = nn.Conv2d(2, 3, 3, padding=1).double(), nn.ReLU(), nn.MaxPool2d(2)
    damping = Damping(0.3, 1e-4, 1e-12, 0.0, 1.0, 0.0)
    saved, again = KronLayer(conv, act, pool), KronLayer(conv, act, pool)
    for j in range(2):
        z = torch.randn(4, 2, 6, 6, generator=gen, dtype=DTYPE)
        pre = conv(z)
        out = pool(act(pre))
        indices = pool_indices(out)
        g = torch.randn(out.shape, generator=gen, dtype=DTYPE)
        c = torch.rand(4, generator=gen, dtype=DTYPE)
        sent = [layer.backward(j, z, pre.detach(), out.detach(), g, c, 1, damping, DTYPE,
                               torch.Generator().manual_seed(j), idx)
                for layer, idx in ((saved, indices), (again, None))]
        assert sent[0] is not None and sent[1] is not None and torch.equal(sent[0], sent[1])
    assert saved.formed is not None and again.formed is not None
    for mine, theirs in zip(saved.formed, again.formed):
        assert mine is not None and theirs is not None and torch.equal(mine, theirs)


@pytest.mark.parametrize("pool", [None, nn.MaxPool2d(2)])
def test_relu_pixel_terms_in_place_leave_their_inputs_alone(pool: nn.MaxPool2d | None) -> None:
    """After ReLU the pixel terms overwrite their own temporaries: u = σ'·Πᵀg and M =
    c·σ'·ΠᵀΠ as written out, and neither g nor the pre-activation changes."""
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    z = torch.randn(4, 2, 6, 6, generator=gen, dtype=DTYPE)
    pre = conv(z)
    out = pre.relu() if pool is None else pool(pre.relu())
    indices = None if pool is None else pool_indices(out)
    g = torch.randn(out.shape, generator=gen, dtype=DTYPE)
    c = torch.rand(4, generator=gen, dtype=DTYPE)
    g_before, pre_before = g.clone(), pre.detach().clone()
    pixels = conv_pixel_terms(z, conv.weight.detach(), conv.bias.detach(), g, c,
                              ConvGeometry.of(conv), nn.ReLU(), pool, pre=pre.detach(),
                              indices=indices)
    assert torch.equal(g, g_before) and torch.equal(pre.detach(), pre_before)
    (selected,) = torch.autograd.grad(out, pre, g, retain_graph=True)  # σ'·Πᵀg
    counts = torch.autograd.grad(out, pre, torch.ones_like(out))[0] if pool is not None else (
        (pre > 0).double())
    assert torch.equal(pixels.cotangents, selected)
    torch.testing.assert_close(pixels.curvature, c.reshape(4, 1, 1, 1) * counts,
                               rtol=0.0, atol=0.0)


@pytest.mark.parametrize("rounds", [0, 2])
def test_a_conv_layers_backward_a_few_samples_at_a_time_is_the_whole_microbatchs(
        rounds: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """One sample at a time or the microbatch at once: the same c sent down and the same
    factors, to rounding (λ's power rounds from the same warm start, kept in half precision)."""
    gen = torch.Generator().manual_seed(6)
    conv, act, pool = nn.Conv2d(2, 3, 3, padding=1).double(), nn.ReLU(), nn.MaxPool2d(2)
    damping = Damping(0.3, 1e-4, 1e-12, 0.0, 1.0, 0.0)
    layers = {"one": KronLayer(conv, act, pool), "all": KronLayer(conv, act, pool)}
    start = torch.randn(5, 2, 6, 6, generator=gen, dtype=DTYPE)
    start = (start / start.flatten(1).norm(dim=1).reshape(5, 1, 1, 1)).half()
    for layer in layers.values():
        layer.lam_start[0] = start
    z = torch.randn(5, 2, 6, 6, generator=gen, dtype=DTYPE)
    pre = conv(z)
    out = pool(act(pre))
    g = torch.randn(out.shape, generator=gen, dtype=DTYPE)
    c = torch.rand(5, generator=gen, dtype=DTYPE)
    sent = {}
    for name, layer in layers.items():
        monkeypatch.setattr(kron_layers, "_PIXEL_ENTRIES", 1 if name == "one" else 1 << 18)
        sent[name] = layer.backward(0, z, pre.detach(), out.detach(), g, c, rounds, damping,
                                    DTYPE, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sent["one"], sent["all"], rtol=1e-12, atol=0.0)
    one, whole = layers["one"].formed, layers["all"].formed
    assert one is not None and whole is not None
    for mine, theirs in zip(one, whole):
        assert mine is not None and theirs is not None
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    if rounds:
        assert layers["one"].lam_start[0].dtype == torch.float16
