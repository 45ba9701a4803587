"""The only importer of torch.distributed.rpc: start-up, calls, failures and shutdown.

RPC is in maintenance mode upstream; everything else in sm-dist talks to other processes
through this module, so another transport can replace it here alone.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.rpc as rpc
from torch.futures import Future

from sm_dist.engine.failures import RemoteFailure, call_value, wait_all

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class TransportError(RuntimeError):
    """The process cannot join the job (missing launcher environment, bad world size)."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, from torchrun's (or torch's launcher's) environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls) -> RankInfo:
        missing = [name for name in ENV_VARS if name not in os.environ]
        if missing:
            raise TransportError(f"not started by torchrun: {', '.join(missing)} unset; run "
                                 "`sm-dist train JOB` (it starts the processes) or torchrun")
        env = os.environ
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                   int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), env["MASTER_ADDR"],
                   int(env["MASTER_PORT"]))


def under_launcher() -> bool:
    """True in a process started by torchrun or torch's launcher API."""
    return all(name in os.environ for name in ENV_VARS)


def worker_name(rank: int) -> str:
    return f"stage{rank}"


# The object that remote calls in this process are dispatched to, and who this process is.
_HANDLER: Any = None
_IDENTITY: tuple[int, int, str] = (-1, -1, "")


def current_failure() -> RemoteFailure:
    """The exception being handled, as a RemoteFailure from this process's stage."""
    return RemoteFailure.capture(*_IDENTITY)


def _dispatch(method: str, args: tuple) -> Any:
    try:
        return getattr(_HANDLER, method)(*args)
    except Exception:
        return current_failure()


@rpc.functions.async_execution
def _dispatch_async(method: str, args: tuple) -> Future:
    try:
        return getattr(_HANDLER, method)(*args)
    except Exception:
        done: Future = Future()
        done.set_result(current_failure())
        return done


class Transport:
    """This process's RPC endpoint: one per stage, named stage<rank>, TensorPipe underneath."""

    def __init__(self, info: RankInfo, *, timeout: float, worker_threads: int,
                 device: torch.device, transport: str = "uv") -> None:
        self.info = info
        self.transport = transport
        self.timeout = timeout
        self.worker_threads = worker_threads
        self.device = device
        self.host = socket.gethostname()
        self.hosts: dict[int, str] = {}  # rank -> host, filled by the coordinator

    def start(self, handler: Any) -> None:
        """Join the job; from now on other stages' calls reach `handler`."""
        global _HANDLER, _IDENTITY
        _HANDLER = handler
        _IDENTITY = (self.info.rank, self.info.rank, self.host)
        # shm reaches only this machine, so uv stays as the fallback for the others.
        transports = ["uv"] if self.transport == "uv" else ["shm", "uv"]
        options = rpc.TensorPipeRpcBackendOptions(
            num_worker_threads=self.worker_threads, rpc_timeout=self.timeout,
            init_method="env://", _transports=transports)
        if self.device.type == "cuda":
            # Tensors sent to stage r land on that stage's GPU directly: the GPU of its local
            # rank, round-robin over the node's GPUs (nodes alike).
            options.set_devices([self.device])
            gpus = torch.cuda.device_count()
            for peer in range(self.info.world_size):
                if peer != self.info.rank:
                    options.set_device_map(worker_name(peer), {
                        self.device.index: (peer % self.info.local_world_size) % gpus})
        rpc.init_rpc(worker_name(self.info.rank), rank=self.info.rank,
                     world_size=self.info.world_size, rpc_backend_options=options)

    def call_async(self, rank: int, method: str, *args: Any) -> Future:
        """`handler.method(*args)` on `rank`; completes with its value (or a RemoteFailure)."""
        if rank == self.info.rank:  # this process: no need to serialise anything
            done: Future = Future()
            done.set_result(_dispatch(method, args))
            return done
        return rpc.rpc_async(worker_name(rank), _dispatch, args=(method, args))

    def run_async(self, rank: int, method: str, *args: Any) -> Future:
        """Like call_async for handler methods that return a Future (long-running work); no
        timeout of its own, since a stage waiting for its input has one (see StageWorker)."""
        if rank == self.info.rank:
            return _dispatch_async(method, args)
        return rpc.rpc_async(worker_name(rank), _dispatch_async, args=(method, args), timeout=0)

    def result(self, rank: int, future: Future) -> Any:
        """The value of a call to `rank`, or a StageError naming that stage."""
        return call_value(rank, future, self.hosts)

    def call(self, rank: int, method: str, *args: Any) -> Any:
        return self.result(rank, self.call_async(rank, method, *args))

    def results(self, futures: dict[int, Future]) -> dict[int, Any]:
        """Every call's value; fails as soon as any one fails instead of waiting for the rest."""
        return wait_all(futures, self.hosts)

    def shutdown(self, graceful: bool = True) -> None:
        """Leave the job; graceful waits for every stage to finish its outstanding work."""
        rpc.shutdown(graceful=graceful)

