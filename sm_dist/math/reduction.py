"""Sums over the replicas of a stage, as the math sees them: an interface and the lone stage's.

The engine's stage groups (engine/collectives.py) implement `Reducer` with torch.distributed
all-reduces; the math and the optimizers only call it, so that they stay single-process.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Reducer(Protocol):
    """The replicas of one stage: `size` of them, each holding its share of the batch; this
    one is number `index` (its share is the index-th part of every microbatch)."""

    size: int
    index: int

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The sum of `tensor` over the replicas (the same bits on every one)."""

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """The elementwise largest value of `tensor` over the replicas."""


class Alone:
    """A stage without replicas: every reduction is the tensor itself."""

    size = 1
    index = 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        return tensor


ALONE = Alone()
