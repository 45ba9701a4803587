"""The replicas of a stage as a torch.distributed process group: the one module of collectives.

Created alongside RPC (not instead of it), on the job's own store: gloo on the CPU, NCCL on
GPUs, every collective bounded by run.rpc_timeout so that none can hang. The optimizers see
it only as a `Reducer` (sm_dist/math/reduction.py): `all_reduce_sum` and `all_reduce_max`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sm_dist.engine.layout import Layout


class CollectiveError(RuntimeError):
    """An all-reduce among a stage's replicas failed: a peer died, or did not come in time."""


class StageGroup:
    """This process's stage and its replicas: sums and maxima over their shares of a batch."""

    def __init__(self, layout: Layout, rank: int, store: Any, device: torch.device,
                 timeout: float) -> None:
        self.size, self.index = layout.replicas, layout.replica_of(rank)
        self.stage = layout.stage_of(rank)
        self.ranks = layout.group(self.stage)
        self.timeout = timeout
        backend = "nccl" if device.type == "cuda" else "gloo"
        limit = timedelta(seconds=timeout)
        # Keys of our own under the job's (attempt-prefixed) store: RPC's stay apart.
        dist.init_process_group(backend, store=dist.PrefixStore("collectives", store),
                                rank=rank, world_size=layout.world_size, timeout=limit)
        # Every rank creates every stage's group, in stage order (torch's rule for new_group).
        groups = [dist.new_group(layout.group(s), timeout=limit, backend=backend)
                  for s in range(layout.stages)]
        self.group = groups[self.stage]

    def _all_reduce(self, tensor: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
        out = tensor.detach().clone()  # the caller's tensor stays as it was
        try:
            dist.all_reduce(out, op=op, group=self.group)
        except Exception as err:  # gloo and NCCL raise their own kinds
            text = str(err).strip().splitlines()
            raise CollectiveError(
                f"all-reduce among stage {self.stage}'s {self.size} replicas (ranks "
                f"{', '.join(map(str, self.ranks))}) failed within run.rpc_timeout "
                f"({self.timeout:g}s): {text[0] if text else type(err).__name__}") from None
        return out

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def close(self) -> None:
        """Leave the groups (at the end of the job, after RPC's shutdown)."""
        try:
            dist.destroy_process_group()
        except Exception:  # a peer gone already: nothing is left to release
            pass
