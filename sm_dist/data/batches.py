"""Batches for training: seeded epoch minibatches (or the full set) and their microbatches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def split_microbatches(x: Tensor, y: Tensor, microbatches: int) -> list[tuple[Tensor, Tensor]]:
    """Split a batch into `microbatches` consecutive pieces whose sizes differ by at most one."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}: they must match")
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    if microbatches > len(x):
        raise ValueError(
            f"cannot split a batch of {len(x)} samples into {microbatches} microbatches: "
            f"use at most {len(x)} microbatches or a larger batch"
        )
    return list(zip(torch.tensor_split(x, microbatches), torch.tensor_split(y, microbatches)))


class BatchStream:
    """Endless stream of training batches: the full set every step, or seeded epoch minibatches.

    A batch size of at least the number of samples behaves as "full": the stored tensors are
    returned as they are, since every such batch is the same set of samples anyway.
    """

    def __init__(self, x: Tensor, y: Tensor, batch: int | str, *, shuffle: bool, seed: int) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}: they must match")
        if len(x) == 0:
            raise ValueError("cannot stream batches from an empty dataset")
        if batch == "full":
            self.batch_size = len(x)
        elif isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
            self.batch_size = min(batch, len(x))
        else:
            raise ValueError(f"batch must be 'full' or a positive integer, got {batch!r}")
        self.x = x
        self.y = y
        self.num_samples = len(x)
        self.full = self.batch_size == self.num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._generator = torch.Generator().manual_seed(seed)
        # Generator state before the current epoch's permutation was drawn: enough to redraw it.
        self._epoch_start_state = self._generator.get_state()
        self._order = self._draw_order()
        self._last_indices: Tensor | None = None
        self._started = False

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one pass over the data (the last one may be smaller)."""
        return self.batches_in_epoch(self.num_samples, self.batch_size)

    @staticmethod
    def batches_in_epoch(num_samples: int, batch: int | str) -> int:
        """Batches of size `batch` ('full': one) in one pass over `num_samples` samples."""
        return 1 if batch == "full" else -(-num_samples // min(int(batch), num_samples))

    def epochs_done(self) -> float:
        """Passes over the data so far, counting the current epoch's batches handed out."""
        if self.full:
            return float(self.epoch + int(self._started))
        return self.epoch + self.position / self.num_samples

    def _draw_order(self) -> Tensor | None:
        """This epoch's sample order (None means stored order, with no index tensor needed)."""
        if self.full or not self.shuffle:
            return None
        return torch.randperm(self.num_samples, generator=self._generator)

    def next_batch(self) -> tuple[Tensor, Tensor, bool]:
        """The next batch, and whether it holds the same samples as the previous call's batch."""
        if self.full:
            same = self._started
            self._started = True
            self.epoch += int(same)
            return self.x, self.y, same

        if self.position >= self.num_samples:
            self.epoch += 1
            self.position = 0
            self._epoch_start_state = self._generator.get_state()
            self._order = self._draw_order()
        start, stop = self.position, min(self.position + self.batch_size, self.num_samples)
        self.position = stop
        if self._order is None:
            indices = torch.arange(start, stop)
            bx, by = self.x[start:stop], self.y[start:stop]
        else:
            indices = self._order[start:stop]
            bx, by = self.x[indices.to(self.x.device)], self.y[indices.to(self.y.device)]
        # Exact set comparison: true only in the rare case an epoch's last batch and the
        # next epoch's first happen to hold the same samples.
        previous = self._last_indices
        same = (
            previous is not None
            and len(previous) == len(indices)
            and torch.equal(previous.sort().values, indices.sort().values)
        )
        self._last_indices = indices
        self._started = True
        return bx, by, same

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream exactly where it is."""
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "generator_state": self._epoch_start_state.clone(),
            "last_indices": None if self._last_indices is None else self._last_indices.clone(),
            "started": self._started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict`; the stream must have the same data and settings."""
        for key in ("num_samples", "batch_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume batch stream: saved {key}={state[key]!r} but this stream has "
                    f"{key}={getattr(self, key)!r}; resume with the same data and batch settings"
                )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._generator.set_state(state["generator_state"].clone())
        self._epoch_start_state = self._generator.get_state()
        self._order = self._draw_order()
        last = state["last_indices"]
        self._last_indices = None if last is None else last.clone()
        self._started = state["started"]
