"""Stage 0's Z̃ᵀZ̃ summed over microbatches in place."""

from __future__ import annotations

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
