"""The only importer of torch.distributed.rpc: start-up, calls, failures and shutdown.

RPC is in maintenance mode upstream; everything else in sm-dist talks to other processes
through this module, so another transport can replace it here alone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed.rpc as rpc
from torch.futures import Future

from sm_dist.engine.failures import Heartbeat, RemoteFailure, call_value, wait_all
from sm_dist.engine.layout import SINGLE, Layout

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


def _attempt_rendezvous(url: str, **kwargs: Any) -> Iterator[tuple[Any, int, int]]:
    """`smdist://`: the job's store (the launcher's or torchrun's agent's, at MASTER_ADDR:
    MASTER_PORT; else rank 0 hosts it on that address alone), with every key prefixed by the
    attempt, so that a restarted attempt never reads the keys of the one before it."""
    import torch.distributed as dist

    query = dict(part.split("=", 1) for part in urlparse(url).query.split("&") if part)
    rank, world_size = int(query["rank"]), int(query["world_size"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = kwargs.get("timeout", timedelta(seconds=300))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or rank != 0:
        store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    else:  # no agent: rank 0 hosts it, listening on MASTER_ADDR only
        listener = socket.create_server((addr, port), family=_family(addr), backlog=128)
        store = dist.TCPStore(addr, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=listener.detach(), wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"sm-dist/attempt-{attempt}", store)
    _STORES.append(prefixed)  # the stage groups' collectives meet here too
    yield prefixed, rank, world_size
    raise RuntimeError("sm-dist's rendezvous cannot be repeated within one attempt")


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _register_rendezvous() -> None:
    import torch.distributed as dist

    try:
        dist.register_rendezvous_handler("smdist", _attempt_rendezvous)
    except RuntimeError:  # registered already in this process
        pass


def listening_interface(bind: str | None, info: RankInfo) -> str:
    """The network interface every socket of this process listens on: `run.bind`, else what
    TP_SOCKET_IFNAME says, else loopback when the whole job is on this machine."""
    name = bind or os.environ.get("TP_SOCKET_IFNAME")
    if name is None:
        if info.world_size != info.local_world_size:
            raise TransportError("a job on several machines needs run.bind: the network "
                                 "interface its stages may listen on (e.g. --set "
                                 "run.bind=eth0); see docs/multi-node.md")
        name = "lo"
    known = [n for _, n in socket.if_nameindex()]
    if name not in known:
        raise TransportError(f"run.bind: no network interface {name!r} on this machine; "
                             f"choose one of {', '.join(known)}")
    return name


def under_launcher() -> bool:
    """True in a process started by torchrun or torch's launcher API."""
    return all(name in os.environ for name in ENV_VARS)


def worker_name(rank: int) -> str:
    return f"stage{rank}"


# The object that remote calls in this process are dispatched to, and who this process is:
# (stage, rank, host, replica or None).
_HANDLER: Any = None
_IDENTITY: tuple[int, int, str, int | None] = (-1, -1, "", None)
_STORES: list[Any] = []  # the store this attempt's rendezvous gave RPC


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
                 device: torch.device, transport: str = "uv", bind: str | None = None,
                 layout: Layout = SINGLE) -> None:
        self.info = info
        self.layout = layout  # which stage and replica each rank holds
        self.bind = bind
        self.transport = transport
        self.timeout = timeout
        self.worker_threads = worker_threads
        self.device = device
        self.host = socket.gethostname()
        self.hosts: dict[int, str] = {}  # rank -> host, filled by the coordinator
        self._heartbeat: Heartbeat | None = None

    def start(self, handler: Any) -> None:
        """Join the job; from now on other stages' calls reach `handler`."""
        global _HANDLER, _IDENTITY
        _HANDLER = handler
        rank, layout = self.info.rank, self.layout
        _IDENTITY = (layout.stage_of(rank), rank, self.host,
                     layout.replica_of(rank) if layout.replicas > 1 else None)
        # Every socket TensorPipe and gloo open listens on this interface alone.
        interface = listening_interface(self.bind, self.info)
        os.environ["TP_SOCKET_IFNAME"] = os.environ["GLOO_SOCKET_IFNAME"] = interface
        _register_rendezvous()
        # shm reaches only this machine, so uv stays as the fallback for the others.
        transports = ["uv"] if self.transport == "uv" else ["shm", "uv"]
        options = rpc.TensorPipeRpcBackendOptions(
            num_worker_threads=self.worker_threads, rpc_timeout=self.timeout,
            init_method="smdist://", _transports=transports)
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
        return call_value(rank, future, self.hosts, self.layout)

    def call(self, rank: int, method: str, *args: Any) -> Any:
        return self.result(rank, self.call_async(rank, method, *args))

    def results(self, futures: dict[int, Future]) -> dict[int, Any]:
        """Every call's value; fails as soon as any one fails instead of waiting for the rest,
        or as soon as a stage stops answering its heartbeat (within run.rpc_timeout)."""
        if self._heartbeat is None:
            self._heartbeat = Heartbeat(self._ping, range(self.info.world_size), self.hosts,
                                        self.timeout, self.layout)
        return wait_all(futures, self.hosts, self._heartbeat, self.layout)

    def _ping(self, rank: int) -> Future:
        return self.call_async(rank, "ping")

    def store(self) -> Any:
        """The store RPC met at (after `start`), for the stage groups' rendezvous."""
        if not _STORES:
            raise TransportError("the stage groups need RPC started first")
        return _STORES[-1]

    def shutdown(self, graceful: bool = True, timeout: float = 0) -> None:
        """Leave the job; graceful waits for every stage to finish its outstanding work (for
        at most `timeout` seconds; 0: as long as it takes)."""
        rpc.shutdown(graceful=graceful, timeout=timeout)

