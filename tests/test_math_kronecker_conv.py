"""A convolution's factors formed from its pixels a few samples at a time (what sm_kron's
backward does) against the reference rows of conv_layer_terms; the pooling's saved indices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sm_dist.math.kronecker_conv as kronecker_conv
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
from tests.test_math_kronecker import CONV_CASES, DELTA_REL, conv_case


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
