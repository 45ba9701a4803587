"""The Kronecker bound's per-sample terms for a Conv2d layer, its activation and max pooling."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sm_dist.math.curvature import initial_vectors
from sm_dist.math.kronecker import (
    DTYPE,
    Activation,
    LayerTerms,
    activation_derivatives,
    curvature_bounds,
    fold_bias,
    largest_where_positive,
    nonnegative_curvature,
    unit_power_rounds,
)
from sm_dist.math.symmetric import symmetrize_

Pair = tuple[int, int]


def _pair(value: int | tuple[int, ...]) -> Pair:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


@dataclass(frozen=True)
class ConvGeometry:
    """How a Conv2d (groups 1, zero padding) reads its input: what F.unfold needs."""

    kernel: Pair
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        """The geometry of a module; the bound assumes each patch entry reads one input pixel
        or a zero, which rules out groups, non-zero padding modes and 'same' padding."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only groups=1 convolutions with zero padding are covered")
        padding = conv.padding
        if isinstance(padding, str):
            if padding != "valid":
                raise ValueError(f"padding {padding!r} is not covered: give it as integers")
            padding = (0, 0)
        return cls(_pair(conv.kernel_size), _pair(conv.stride), _pair(padding),
                   _pair(conv.dilation))

    @classmethod
    def covers(cls, conv: nn.Conv2d) -> bool:
        """Whether the bound covers the module (`of` accepts it)."""
        try:
            cls.of(conv)
        except ValueError:
            return False
        return True

    def output_size(self, input_size: Pair) -> Pair:
        """The output's (height, width) for an input of `input_size`."""
        sizes = []
        for axis in range(2):
            span = self.dilation[axis] * (self.kernel[axis] - 1) + 1
            sizes.append((input_size[axis] + 2 * self.padding[axis] - span)
                         // self.stride[axis] + 1)
        return (sizes[0], sizes[1])

    def coverage(self, input_size: Pair) -> int:
        """γ = max over input pixels of the patch entries that read it: 𝒰ᵀ𝒰 = diag(counts)
        for the unfold map 𝒰 (each entry reads one pixel or a zero), so ‖𝒰‖² = γ."""
        return _coverage(self, input_size)


@functools.cache  # a few geometries and sizes per model: not an unfold per block of samples
def _coverage(geometry: ConvGeometry, input_size: Pair) -> int:
    ones = torch.ones(1, 1, *input_size, dtype=DTYPE)
    columns = F.unfold(ones, geometry.kernel, geometry.dilation, geometry.padding,
                       geometry.stride)
    counts = F.fold(columns, input_size, geometry.kernel, geometry.dilation, geometry.padding,
                    geometry.stride)
    return int(counts.max())


def pool_indices(out: Tensor) -> Tensor | None:
    """The argmax indices max pooling's forward saved for its own backward, read from the
    autograd graph of its output `out` (None where it saved none: no graph, another op, or a
    graph already freed): the backward need not pool again (8 of the CNN's 106 ms)."""
    node = out.grad_fn
    if node is None or type(node).__name__ != "MaxPool2DWithIndicesBackward0":
        return None
    try:
        return node._saved_result1  # the documented grad_fn._saved_<name> of its output 1
    except RuntimeError:  # freed by a backward that did not retain the graph
        return None


def unpooled(activated: Tensor, grad_out: Tensor, pool: nn.MaxPool2d | None,
             indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(Πᵀg, diag(ΠᵀΠ)) at the activation's output, for the pooling's local 0/1 selection Π.

    Every pooled output selects one input, so ΠᵀΠ is diagonal and counts how many windows
    select each input: 1 or 0 for non-overlapping windows, up to the overlap otherwise.
    `indices`: the forward's (pool_indices), else found by pooling `activated` again.
    """
    if pool is None:
        return grad_out.reshape(activated.shape).to(activated.dtype), torch.ones_like(activated)
    if type(pool) is not nn.MaxPool2d:
        raise TypeError("only MaxPool2d is covered after a convolution (average pooling is not "
                        "a selection: docs/kronecker-math-draft.md)")
    if indices is None:
        _, indices = F.max_pool2d(activated, pool.kernel_size, pool.stride, pool.padding,
                                  pool.dilation, ceil_mode=pool.ceil_mode, return_indices=True)
    flat_index = indices.flatten(2)
    g = grad_out.to(activated.dtype).reshape(indices.shape).flatten(2)
    zeros = torch.zeros_like(activated).flatten(2)
    selected_g = zeros.clone().scatter_add_(2, flat_index, g)
    counts = zeros.scatter_add_(2, flat_index, torch.ones_like(g))
    return selected_g.view_as(activated), counts.view_as(activated)


@dataclass(frozen=True)
class ConvPixels:
    """A convolution's terms per sample k and output pixel l, channels first: u and M are
    (n, d_out, H', W'); m, κ are (n, L); λ is (n,). LayerTerms without the patches."""

    cotangents: Tensor  # u = σ'(a) ⊙ Πᵀg
    curvature: Tensor  # M = c·σ'²·diag(ΠᵀΠ) + Πᵀg ⊙ σ''
    theta: Tensor  # m = max(0, max_i M_i)
    cross: Tensor | None  # κ ≥ ‖M W₀‖², None for a first layer
    lam_bound: Tensor | None  # certified λ_k (asked for), None for a first layer
    coverage: int  # γ
    nonnegative: bool

    def size(self) -> Tensor:
        """|M|, what λ's power rounds iterate with."""
        return self.curvature if self.nonnegative else self.curvature.abs()

    def rows(self, per_pixel: Tensor) -> Tensor:
        """(n, d_out, H', W') as LayerTerms' rows (n, L, d_out)."""
        return per_pixel.flatten(2).transpose(1, 2)


def conv_pixel_terms(inputs: Tensor, weight: Tensor, bias: Tensor | None, grad_out: Tensor,
                     c: Tensor, geometry: ConvGeometry, activation: Activation | None = None,
                     pool: nn.MaxPool2d | None = None, *, spectral_sq: float | None = None,
                     pre: Tensor | None = None, indices: Tensor | None = None,
                     below: bool = True, lam_bound: bool = True) -> ConvPixels:
    """The terms of f(z) = pool(σ(conv(z, W) + b)) around the stored inputs z (n, C, H, W),
    per output pixel: `grad_out` is g at the layer's output (after the pooling), `c` the
    per-sample curvature from above, `pre` the convolution's output the forward computed (else
    computed again; after ReLU its output serves, the same σ'), `indices` the pooling's
    (pool_indices). κ and λ by curvature_bounds, λ only if `lam_bound`; `below` False: a
    first layer (no κ, no λ)."""
    n, dtype = inputs.shape[0], inputs.dtype
    w = weight.to(dtype)
    if pre is None:
        b = None if bias is None else bias.to(dtype)
        pre = F.conv2d(inputs, w, b, geometry.stride, geometry.padding, geometry.dilation)
    pre = pre.to(dtype)
    scale = c.to(dtype).reshape(n, 1, 1, 1)
    nonnegative = nonnegative_curvature(activation)
    # Each per-pixel tensor is the pre-activation's size (6 MB on the CNN's stage 1): after
    # ReLU what is no longer needed is overwritten, so few are alive at once.
    if type(activation) is nn.ReLU and (pool is None or indices is not None):
        slope = torch.gt(pre, 0, out=torch.empty_like(pre))  # σ(a) not needed to unpool
        g, counts = unpooled(pre, grad_out, pool, indices)
        curvature = counts.mul_(slope).mul_(scale)  # σ' is 0 or 1 and σ'' = 0
        cotangents = g.mul_(slope) if pool is not None else g * slope  # else g is grad_out
    else:
        activated, slope, bend = activation_derivatives(activation, pre)
        g, counts = unpooled(activated, grad_out, pool, indices)
        if nonnegative:  # σ' is 0 or 1 and σ'' = 0: the same values
            curvature = scale * slope * counts
        else:
            curvature = scale * (slope * slope) * counts + g * bend
        cotangents = slope * g
    del slope
    theta = curvature.amax(dim=1).clamp_min(0.0).flatten(1)
    coverage = geometry.coverage((inputs.shape[-2], inputs.shape[-1]))
    pixels = ConvPixels(cotangents, curvature, theta, None, None, coverage, nonnegative)
    if not below:
        return pixels
    cross, lam = curvature_bounds(pixels.rows(pixels.size()), w.reshape(w.shape[0], -1),
                                  coverage, spectral_sq, lam_bound)
    return dataclasses.replace(pixels, cross=cross, lam_bound=lam)


def conv_layer_terms(inputs: Tensor, weight: Tensor, bias: Tensor | None, grad_out: Tensor,
                     c: Tensor, geometry: ConvGeometry, activation: Activation | None = None,
                     pool: nn.MaxPool2d | None = None, *,
                     spectral_sq: float | None = None, pre: Tensor | None = None,
                     below: bool = True) -> LayerTerms:
    """conv_pixel_terms as LayerTerms, with rows (sample, output pixel): z̃ the unfolded
    patch (+1), u and M over the output channels. The reference the dense tests check; the
    optimizer forms A and U from the pixels (conv_factor_shares), without these rows."""
    pixels = conv_pixel_terms(inputs, weight, bias, grad_out, c, geometry, activation, pool,
                              spectral_sq=spectral_sq, pre=pre, below=below)
    kept = fold_bias(conv_patches(inputs, geometry), bias is not None)
    return LayerTerms(inputs=kept, cotangents=pixels.rows(pixels.cotangents),
                      curvature=pixels.rows(pixels.curvature), theta_curvature=pixels.theta,
                      cross_curvature=pixels.cross, lam_bound=pixels.lam_bound,
                      coverage=pixels.coverage, nonnegative=pixels.nonnegative)


def conv_largest_curvature(pre: Tensor, out: Tensor, c: Tensor,
                           activation: Activation | None,
                           pool: nn.MaxPool2d | None) -> float | None:
    """max over the samples of m_k = max(0, max M_k) without the terms, where that is cheap:
    after ReLU with no pooling or a max pooling whose windows do not overlap, M = c·σ'·counts
    with σ' and counts 0 or 1, so M_k's largest entry is c_k where an active unit reaches the
    output (the output, `out`, is positive there). None: the terms are needed."""
    if type(activation) is not nn.ReLU or (pool is not None and not _disjoint(pool)):
        return None
    return largest_where_positive(pre if pool is None else out, c)


def _disjoint(pool: nn.MaxPool2d) -> bool:
    kernel, dilation = _pair(pool.kernel_size), _pair(pool.dilation)
    stride = kernel if pool.stride is None else _pair(pool.stride)
    return all(d == 1 and k <= s for k, s, d in zip(kernel, stride, dilation))


def conv_patches(inputs: Tensor, geometry: ConvGeometry) -> Tensor:
    """The unfolded patches z_{k,l} of inputs (n, C, H, W): (n, L, C·kh·kw), unfold's order."""
    return F.unfold(inputs, geometry.kernel, geometry.dilation, geometry.padding,
                    geometry.stride).transpose(1, 2)


def conv_lambda_estimate(weight: Tensor, size: Tensor, geometry: ConvGeometry,
                         input_shape: torch.Size | tuple[int, ...], rounds: int,
                         start: Tensor | None = None,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """λ_k ≈ ‖𝒰ᵀ blockdiag_l(W₀ᵀ|M_{k,l}|W₀) 𝒰‖ from below (‖∂²Ψ/∂z_k²‖ for ReLU), by batched
    power iteration on inputs of `input_shape` (n, C, H, W); `size` is |M| per output pixel,
    (n, d_out, H', W') (ConvPixels.size): two convolutions per round."""
    w = weight.to(size.dtype)

    def product(v: Tensor) -> Tensor:
        a = F.conv2d(v, w, None, geometry.stride, geometry.padding, geometry.dilation)
        return torch.nn.grad.conv2d_input(v.shape, w, a.mul_(size), geometry.stride,
                                          geometry.padding, geometry.dilation)

    if start is None:
        like = torch.empty(tuple(input_shape), dtype=w.dtype, device=size.device)
        start = initial_vectors(like, generator)
    return unit_power_rounds(product, start, rounds)


# Patch entries per block of conv_factor_shares: 2 MB in float32 (CNN stage 2 within 1.5x of
# Adam's live tensors; 1 MB cost 20% more time on stage 1, 4 MB left stage 2 at 1.67x).
_BLOCK_ENTRIES = 1 << 19


def conv_factor_shares(inputs: Tensor, cotangents: Tensor, a_weights: Tensor,
                       u_weights: Tensor | None, geometry: ConvGeometry, with_bias: bool,
                       dtype: torch.dtype, offsets: bool = False) -> tuple[Tensor, Tensor | None]:
    """A = Σ_{k,l} w_A z̃z̃ᵀ over the patches of inputs (n, C, H, W) and U = Σ_{k,l} w_U u uᵀ
    over the cotangents (n, d_out, H', W'), weights (n, L) ≥ 0; formed in `dtype`, exactly
    symmetric.

    kronecker_factors of conv_layer_terms, without the (n·L, C·k²) rows: the patches are
    written a few samples at a time, one kernel offset at a time, already times √w_A, as
    columns R (C·k² [+1], samples·L), and A gains RRᵀ per block (3.7 times faster than
    unfolding the microbatch on this CPU, and a few MB instead of 28 on the CNN's stage 1).
    `offsets`: the looser A ⪯ K·blockdiag (offset_blocks), k² times fewer multiply-adds.
    """
    n, channels = inputs.shape[:2]
    out_size = geometry.output_size((inputs.shape[-2], inputs.shape[-1]))
    locations = out_size[0] * out_size[1]
    offset_count = geometry.kernel[0] * geometry.kernel[1]
    width = channels * offset_count + int(with_bias)
    ph, pw = geometry.padding
    padded = F.pad(inputs, (pw, pw, ph, ph)) if ph or pw else inputs
    roots = a_weights.reshape(n, *out_size).to(dtype).sqrt()
    block = max(1, _BLOCK_ENTRIES // (width * locations))
    parts = (_weighted_columns(padded[first:first + block].to(dtype), roots[first:first + block],
                               geometry, with_bias) for first in range(0, n, block))
    if offsets:
        a = _offset_factor(parts, channels, offset_count, with_bias)
    else:
        a = inputs.new_zeros((width, width), dtype=dtype)
        for columns in parts:
            a.addmm_(columns, columns.T)
    symmetrize_(a)
    if u_weights is None:
        return a, None
    d_out = cotangents.shape[1]
    u_columns = torch.mul(cotangents.reshape(n, d_out, locations).to(dtype).transpose(0, 1),
                          u_weights.reshape(1, n, locations).to(dtype).sqrt())
    u_columns = u_columns.reshape(d_out, n * locations)
    return a, symmetrize_(u_columns @ u_columns.T)


def _offset_factor(parts: Iterator[Tensor], channels: int, offset_count: int,
                   with_bias: bool) -> Tensor:
    """offset_blocks from the √w-weighted columns of _weighted_columns, block by block."""
    blocks: Tensor | None = None
    bias_sum: Tensor | None = None
    for columns in parts:
        per_offset = columns[:channels * offset_count].view(channels, offset_count, -1)
        per_offset = per_offset.transpose(0, 1)  # (k², C, samples·L)
        share = torch.bmm(per_offset, per_offset.transpose(1, 2))
        blocks = share if blocks is None else blocks.add_(share)
        if with_bias:
            weight_sum = columns[-1] @ columns[-1]
            bias_sum = weight_sum if bias_sum is None else bias_sum.add_(weight_sum)
    assert blocks is not None, "no samples"
    return offset_blocks(blocks, bias_sum)


def offset_blocks(blocks: Tensor, bias_sum: Tensor | None) -> Tensor:
    """K·blockdiag(A_oo, Σw) ⪰ A in unfold's order (c, i, j) and the bias last: `blocks` are
    A's diagonal blocks per kernel offset o, (k², C, C), `bias_sum` its bias entry (None: no
    bias), K the number of blocks. z̃ splits into k² + 1 parts z_o (C entries of offset o, and
    the 1), and by Cauchy-Schwarz (Σ_o xₒᵀz_o)² ≤ K Σ_o (xₒᵀz_o)², so z̃z̃ᵀ ⪯ K·blockdiag(z_o z_oᵀ)
    sample by sample: a looser bound whose A needs C² products per offset, not (C·k²)²."""
    offset_count, channels = blocks.shape[:2]
    count = offset_count + int(bias_sum is not None)
    size = channels * offset_count + int(bias_sum is not None)
    a = blocks.new_zeros((size, size))
    patch = a[:channels * offset_count, :channels * offset_count]
    # (C, k², C, k²) viewed: entries (c, o, c', o) form offset o's block
    patch.view(channels, offset_count, channels, offset_count).diagonal(dim1=1, dim2=3).copy_(
        blocks.permute(1, 2, 0) * count)
    if bias_sum is not None:
        a[-1, -1] = bias_sum * count
    return a


def _weighted_columns(padded: Tensor, roots: Tensor, geometry: ConvGeometry,
                      with_bias: bool) -> Tensor:
    """√w·z̃ for the patches of (already padded) inputs (m, C, H, W) and their roots √w
    (m, H', W'), as columns (C·kh·kw [+1], m·L): row (c, i, j) in F.unfold's order, then the
    bias's (√w itself); column (sample, output pixel). One strided product per kernel offset."""
    m, channels = padded.shape[:2]
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.stride, geometry.dilation
    out_h, out_w = roots.shape[-2:]
    width = channels * kh * kw
    columns = padded.new_empty((width + int(with_bias), m * out_h * out_w))
    patches = columns[:width].view(channels, kh, kw, m, out_h, out_w)
    source = padded.transpose(0, 1)  # (C, m, H, W)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            torch.mul(source[:, :, top:top + (out_h - 1) * sh + 1:sh,
                             left:left + (out_w - 1) * sw + 1:sw], roots, out=patches[:, i, j])
    if with_bias:
        columns[width] = roots.reshape(-1)
    return columns
