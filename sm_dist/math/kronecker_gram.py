"""Stage 0's Z̃ᵀZ̃ summed over microbatches in place."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sm_dist.math.kronecker import DTYPE
from sm_dist.math.symmetric import symmetrize_


def input_gram(rows: Tensor, dtype: torch.dtype = DTYPE, into: Tensor | None = None) -> Tensor:
    """Z̃ᵀZ̃ of a first layer's rows z̃ (…, P), exactly symmetric, formed in `dtype`.

    A = Σ m z̃z̃ᵀ ⪯ (max m)·Z̃ᵀZ̃, a bound whose matrix does not depend on the backward, so it is
    factored once per batch, in the bubble between stage 0's forwards and its backwards
    (sm_kron's input_bound: gram). `into`: add this microbatch's matrix to a running sum (of
    `dtype`) instead of returning a new one. Either way each entry is (G_ij + G_ji)/2 of the
    product G, so the bits are those of summing whole symmetrised matrices; the product is
    symmetrised in its own storage, so no second d × d matrix (stage 0's 785² in float64 is
    4.9 MiB) is formed for it.
    """
    flat = rows.reshape(-1, rows.shape[-1]).to(dtype)
    symmetric = symmetrize_(flat.T @ flat)
    return symmetric if into is None else into.add_(symmetric)


def summed_input_gram(inputs: Sequence[Tensor], rows_of: Callable[[Tensor], Tensor],
                      block: int = 0) -> Tensor:
    """Σ_j Z̃ⱼᵀZ̃ⱼ over the microbatches `inputs` (z̃ = rows_of(samples)), exactly symmetric,
    in the inputs' dtype.

    block 0: each microbatch's whole product, symmetrised, added to the sum (input_gram);
    while it is formed the sum, that product and the microbatch's rows are alive (12.4 MiB on
    a 785-wide float64 input of 500 samples). block N: the rows of N samples at a time, each
    block's product added into the sum by one addmm and the sum symmetrised once at the end,
    so only the sum and one block's rows are alive; the same matrix up to rounding (the sum's
    order differs), which moves every result that uses it (sm_kron's gram_block).
    """
    if block == 0:
        gram = input_gram(rows_of(inputs[0]), inputs[0].dtype)
        for x in inputs[1:]:
            input_gram(rows_of(x), x.dtype, into=gram)
        return gram
    summed: Tensor | None = None
    for x in inputs:
        for samples in x.split(block):
            rows = rows_of(samples)
            flat = rows.reshape(-1, rows.shape[-1]).to(x.dtype)
            summed = flat.T @ flat if summed is None else summed.addmm_(flat.T, flat)
    assert summed is not None, "no microbatch to sum"
    return symmetrize_(summed)
