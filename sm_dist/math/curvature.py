"""Curvature sent down a stage (spec §2 and §4): batched per-sample power iteration and damping."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

GRANULARITIES = ("sample", "microbatch", "batch")


def _row_norms(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).norm(dim=1)


# Row dots take their elementwise products in this many pieces of whole rows: an input-sized
# product would be one more input-sized tensor alive in every round of the power iteration,
# and a fixed number of pieces keeps the kernels per round few on a GPU, whatever the batch.
_DOT_PIECES = 8


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample ⟨a_k, b_k⟩, whole rows at a time, so each row's sum is the unchunked one."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.shape[0] < 2:
        return (a * b).sum(dim=1)
    rows = -(-a.shape[0] // _DOT_PIECES)
    return torch.cat([(x * y).sum(dim=1) for x, y in zip(a.split(rows), b.split(rows),
                                                          strict=True)])


def _inverse_or_zero(norms: Tensor) -> Tensor:
    return torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


def normalize_rows(x: Tensor) -> Tensor:
    """One unit vector per sample; rows of zeros stay zero."""
    return x * _inverse_or_zero(_row_norms(x)).reshape(-1, *([1] * (x.dim() - 1)))


def initial_vectors(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random unit rows to start a power iteration from."""
    start = torch.randn(like.shape, dtype=like.dtype, generator=generator, device="cpu")
    return normalize_rows(start.to(like.device))


def power_iteration(hzz: Callable[[Tensor], Tensor], start: Tensor, rounds: int, *,
                    reuse_start: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sample λ_k ≈ |dominant eigenvalue| of the block-diagonal H_zz, one product per round.

    `hzz` multiplies a batch of per-sample vectors by H_zz; because H_zz is block-diagonal over
    samples, each row iterates independently. Returns (λ per sample, the unit vectors reached),
    the latter to warm-start the next iteration on the same samples. λ is the absolute value
    of the last Rayleigh quotient, which bounds λ_max even when the dominant eigenvalue is
    negative (spec §4).

    The vectors live in one buffer, updated in place (the same values as out of place), so a
    round holds two input-sized tensors, u and H_zz u: `start`'s own buffer when the caller
    hands it over (`reuse_start`: it is overwritten and returned), a copy of it otherwise.
    """
    u = start if reuse_start and start.is_contiguous() else start.clone(
        memory_format=torch.contiguous_format)
    per_row = (-1, *([1] * (u.dim() - 1)))
    u.mul_(_inverse_or_zero(_row_norms(u)).reshape(per_row))
    lam = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
    for _ in range(rounds):
        hu = hzz(u)
        if not hu.is_contiguous() or shares_storage(hu, u):  # not ours to overwrite
            hu = hu.clone(memory_format=torch.contiguous_format)
        lam = _row_dots(u, hu).abs()
        norms = _row_norms(hu)
        hu.mul_(_inverse_or_zero(norms).reshape(per_row))
        # A row whose product vanished (a dead ReLU sample) keeps its vector.
        torch.where((norms == 0).reshape(per_row), u, hu, out=u)
        del hu  # or it would stay alive through the next round's product
    return lam, u


def shares_storage(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are views of one buffer (writing one would change the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def reduce_eigenvalues(lam: Tensor, granularity: str) -> Tensor:
    """Per-sample λ for `sample`, the microbatch's max for `microbatch` (and `batch`, which the
    caller reduces once more over all its microbatches)."""
    if granularity == "sample":
        return lam
    if granularity in ("microbatch", "batch"):
        return lam.max().expand_as(lam).clone() if lam.numel() else lam
    raise ValueError(f"unknown curvature granularity {granularity!r}; choose one of "
                     f"{', '.join(GRANULARITIES)}")


def damped_curvature(lam: Tensor, *, delta_rel: float, delta_abs: float,
                     delta_floor: float) -> tuple[Tensor, Tensor]:
    """(c, δ) with δ = max(delta_rel·λ + delta_abs, delta_floor) and c = λ + δ (δ must be > 0)."""
    delta = (delta_rel * lam + delta_abs).clamp_min(delta_floor)
    return lam + delta, delta
