"""The Kronecker bound's per-sample terms for a Conv2d layer, its activation and max pooling."""

from __future__ import annotations

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
    assemble_terms,
    fold_bias,
    largest_where_positive,
    nonnegative_curvature,
    unit_power_rounds,
)

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
        ones = torch.ones(1, 1, *input_size, dtype=DTYPE)
        columns = F.unfold(ones, self.kernel, self.dilation, self.padding, self.stride)
        counts = F.fold(columns, input_size, self.kernel, self.dilation, self.padding,
                        self.stride)
        return int(counts.max())


def unpooled(activated: Tensor, grad_out: Tensor,
             pool: nn.MaxPool2d | None) -> tuple[Tensor, Tensor]:
    """(Πᵀg, diag(ΠᵀΠ)) at the activation's output, for the pooling's local 0/1 selection Π.

    Every pooled output selects one input, so ΠᵀΠ is diagonal and counts how many windows
    select each input: 1 or 0 for non-overlapping windows, up to the overlap otherwise.
    """
    if pool is None:
        return grad_out.reshape(activated.shape).to(activated.dtype), torch.ones_like(activated)
    if type(pool) is not nn.MaxPool2d:
        raise TypeError("only MaxPool2d is covered after a convolution (average pooling is not "
                        "a selection: docs/kronecker-math-draft.md)")
    _, index = F.max_pool2d(activated, pool.kernel_size, pool.stride, pool.padding,
                            pool.dilation, ceil_mode=pool.ceil_mode, return_indices=True)
    flat_index = index.flatten(2)
    g = grad_out.to(activated.dtype).reshape(index.shape).flatten(2)
    zeros = torch.zeros_like(activated).flatten(2)
    selected_g = zeros.clone().scatter_add_(2, flat_index, g)
    counts = zeros.scatter_add_(2, flat_index, torch.ones_like(g))
    return selected_g.view_as(activated), counts.view_as(activated)


def conv_layer_terms(inputs: Tensor, weight: Tensor, bias: Tensor | None, grad_out: Tensor,
                     c: Tensor, geometry: ConvGeometry, activation: Activation | None = None,
                     pool: nn.MaxPool2d | None = None, *,
                     spectral_sq: float | None = None, pre: Tensor | None = None,
                     below: bool = True, rows: bool = True) -> LayerTerms:
    """The terms of f(z) = pool(σ(conv(z, W) + b)) around the stored inputs z (n, C, H, W).

    `grad_out` is g at the layer's output (after the pooling), `c` the per-sample curvature
    from above. Rows are (sample, output pixel): z̃ the unfolded patch (+1), u and M the
    pre-activation's per-pixel cotangent and curvature over the output channels. `pre`: the
    convolution's output the forward computed, else computed here again. `below` False: the
    first layer (assemble_terms); `rows` False: no patches (linear_layer_terms).
    """
    n, dtype = inputs.shape[0], inputs.dtype
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    if pre is None:
        pre = F.conv2d(inputs, w, b, geometry.stride, geometry.padding, geometry.dilation)
    pre = pre.to(dtype)
    activated, slope, bend = activation_derivatives(activation, pre)
    g, counts = unpooled(activated, grad_out, pool)
    scale = c.to(dtype).reshape(n, 1, 1, 1)
    if nonnegative_curvature(activation):  # σ' is 0 or 1 and σ'' = 0: the same values
        curvature = scale * slope * counts
    else:
        curvature = scale * (slope * slope) * counts + g * bend
    patches = conv_patches(inputs, geometry) if rows else None

    def pixel_rows(per_pixel: Tensor) -> Tensor:  # (n, d_out, H', W') -> (n, L, d_out)
        return per_pixel.flatten(2).transpose(1, 2)

    coverage = geometry.coverage((inputs.shape[-2], inputs.shape[-1]))
    kept = (fold_bias(patches, b is not None) if patches is not None
            else inputs.new_empty((n, pre.shape[-2] * pre.shape[-1], 0)))
    return assemble_terms(kept, pixel_rows(slope * g), pixel_rows(curvature),
                          w.reshape(w.shape[0], -1), coverage, spectral_sq, below,
                          nonnegative_curvature(activation))


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


def conv_lambda_estimate(weight: Tensor, terms: LayerTerms, geometry: ConvGeometry,
                         input_shape: torch.Size | tuple[int, ...], rounds: int,
                         start: Tensor | None = None,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """λ_k ≈ ‖𝒰ᵀ blockdiag_l(W₀ᵀ|M_{k,l}|W₀) 𝒰‖ from below (‖∂²Ψ/∂z_k²‖ for ReLU), by batched
    power iteration on inputs of `input_shape` (n, C, H, W): two convolutions per round."""
    w = weight.to(terms.curvature.dtype)
    n = input_shape[0]
    out_h, out_w = geometry.output_size((input_shape[-2], input_shape[-1]))
    size = terms.curvature.abs().transpose(1, 2).reshape(n, w.shape[0], out_h, out_w)

    def product(v: Tensor) -> Tensor:
        a = F.conv2d(v, w, None, geometry.stride, geometry.padding, geometry.dilation)
        return torch.nn.grad.conv2d_input(v.shape, w, size * a, geometry.stride,
                                          geometry.padding, geometry.dilation)

    if start is None:
        like = torch.empty(tuple(input_shape), dtype=w.dtype, device=size.device)
        start = initial_vectors(like, generator)
    return unit_power_rounds(product, start, rounds)
