"""Stage 0's Z̃ᵀZ̃ summed over microbatches in place; a Gram matrix symmetrised in its own storage."""

from __future__ import annotations

import torch
from torch import Tensor

from sm_dist.math.kronecker import DTYPE

# Rows per block of the in-place symmetrisation: its temporaries are _BLOCK × d, not d × d.
_BLOCK = 128


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


def symmetrize_(matrix: Tensor) -> Tensor:
    """matrix ← (matrix + matrixᵀ)/2 in place, block by block (IEEE addition commutes, so the
    two mirrored entries get the same bits)."""
    size = matrix.shape[0]
    for start in range(0, size, _BLOCK):
        rows = slice(start, min(start + _BLOCK, size))
        for col_start in range(start, size, _BLOCK):
            cols = slice(col_start, min(col_start + _BLOCK, size))
            mean = torch.add(matrix[rows, cols], matrix[cols, rows].T).mul_(0.5)
            matrix[rows, cols] = mean
            matrix[cols, rows] = mean.T
    return matrix
