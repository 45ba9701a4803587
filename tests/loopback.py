"""An in-process loopback transport: every rank's worker in this process, each call on a thread
pool as TensorPipe's worker threads would run it. For unit tests of the engine's pieces."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.futures import Future

from sm_dist.engine.failures import RemoteFailure, call_value, wait_all


class LoopbackWorld:
    """The ranks of one job, reachable by rank; a rank marked dead stops answering."""

    def __init__(self, num_ranks: int, timeout: float = 5.0) -> None:
        self.num_ranks = num_ranks
        self.timeout = timeout
        self.handlers: dict[int, Any] = {}
        self.dead: set[int] = set()
        self.pool = ThreadPoolExecutor(4 * num_ranks + 4)

    def transport(self, rank: int) -> LoopbackTransport:
        return LoopbackTransport(self, rank)

    def close(self) -> None:
        for handler in self.handlers.values():  # a worker left running would find rank 0
            if hasattr(handler, "close"):     # gone and end this process (os._exit)
                handler.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class LoopbackTransport:
    """What StageWorker and RpcPipeline need of a transport, for rank `rank` of `world`."""

    def __init__(self, world: LoopbackWorld, rank: int) -> None:
        self.world = world
        self.rank = rank
        self.timeout = world.timeout
        self.device = torch.device("cpu")
        self.hosts: dict[int, str] = {}

    def _gone(self, rank: int) -> Future:
        future: Future = Future()
        future.set_exception(ConnectionError(f"EOF: rank {rank} is gone"))
        return future

    def call_async(self, rank: int, method: str, *args: Any) -> Future:
        if rank in self.world.dead:
            return self._gone(rank)
        done: Future = Future()

        def run() -> None:
            try:
                done.set_result(getattr(self.world.handlers[rank], method)(*args))
            except Exception:
                done.set_result(RemoteFailure.capture(rank, rank, "loopback"))

        self.world.pool.submit(run)
        return done

    def run_async(self, rank: int, method: str, *args: Any) -> Future:
        if rank in self.world.dead:
            return self._gone(rank)
        return getattr(self.world.handlers[rank], method)(*args)

    def call(self, rank: int, method: str, *args: Any) -> Any:
        return call_value(rank, self.call_async(rank, method, *args), self.hosts)

    def results(self, futures: dict[int, Future]) -> dict[int, Any]:
        return wait_all(futures, self.hosts)
