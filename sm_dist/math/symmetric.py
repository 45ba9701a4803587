"""A matrix symmetrised in its own storage, block by block (the Kronecker factors' sums)."""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per block of the in-place symmetrisation: its temporaries are _BLOCK × d, not d × d.
_BLOCK = 128


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
