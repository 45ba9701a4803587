"""How a stage's failure reaches the coordinator: as a value naming stage, rank and host."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch.futures import Future

from sm_dist.engine.layout import SINGLE, Layout


class StageError(RuntimeError):
    """A stage failed or stopped answering: says which stage (and replica), on which rank and
    host."""

    def __init__(self, stage: int, rank: int, host: str, message: str,
                 replica: int | None = None) -> None:
        super().__init__(stage, rank, host, message, replica)  # all args, so that it pickles
        self.stage, self.rank, self.host, self.message = stage, rank, host, message
        self.replica = replica

    def __str__(self) -> str:
        where = f"rank {self.rank}" + (f" on {self.host}" if self.host else "")
        replica = "" if self.replica is None else f" replica {self.replica}"
        return f"stage {self.stage}{replica} ({where}): {self.message}"


def rank_error(layout: Layout, rank: int, hosts: dict[int, str], message: str) -> StageError:
    """A StageError for `rank`, named by its stage (and replica, where there are replicas)."""
    replica = layout.replica_of(rank) if layout.replicas > 1 else None
    return StageError(layout.stage_of(rank), rank, hosts.get(rank, ""), message, replica)


@dataclass
class RemoteFailure:
    """An exception raised inside a stage, sent back as a value so its context is not lost."""

    stage: int
    rank: int
    host: str
    error: str
    traceback: str
    replica: int | None = None  # with model.replicas > 1

    @classmethod
    def capture(cls, stage: int, rank: int, host: str,
                replica: int | None = None) -> RemoteFailure:
        """The exception being handled, as raised on this stage."""
        exc = sys.exc_info()[1]
        error = ("unknown error" if exc is None else
                 traceback.format_exception_only(type(exc), exc)[0].strip().splitlines()[0])
        return cls(stage, rank, host, error, traceback.format_exc(), replica)

    def to_error(self) -> StageError:
        return StageError(self.stage, self.rank, self.host, f"{self.error}\n{self.traceback}",
                          self.replica)


def call_value(rank: int, future: Future, hosts: dict[int, str],
               layout: Layout = SINGLE) -> Any:
    """The value of a finished call to `rank`, or a StageError naming its stage: its own
    failure, or its having stopped answering (the connection broke, the call timed out)."""
    try:
        value = future.wait()
    except Exception as err:
        raise rank_error(layout, rank, hosts, f"stopped answering ({_first_line(err)})") from None
    if isinstance(value, RemoteFailure):
        raise value.to_error()
    return value


class Heartbeat:
    """While the coordinator waits, every stage is pinged; one whose ping goes unanswered for
    `timeout` seconds has stopped (a stopped or hung process answers nothing, even on the RPC
    threads that serve pings while its executor works)."""

    def __init__(self, ping: Callable[[int], Future], ranks: Sequence[int],
                 hosts: dict[int, str], timeout: float, layout: Layout = SINGLE) -> None:
        self.ping, self.ranks, self.hosts, self.timeout = ping, list(ranks), hosts, timeout
        self.layout = layout
        self.interval = max(min(timeout / 4, 10.0), 0.5)
        self._sent: dict[int, tuple[float, Future]] = {}

    def check(self) -> None:
        """Send the pings that are due; raise a StageError for a stage that is overdue."""
        now = time.monotonic()
        for rank in self.ranks:
            sent = self._sent.get(rank)
            if sent is None:
                self._sent[rank] = (now, self.ping(rank))
                continue
            when, future = sent
            if future.done():
                try:
                    future.wait()
                except Exception as err:  # its connection broke, or the call timed out
                    raise rank_error(self.layout, rank, self.hosts,
                                     f"stopped answering ({_first_line(err)})") from None
                if now - when >= self.interval:
                    self._sent[rank] = (now, self.ping(rank))
            elif now - when > self.timeout:
                raise rank_error(self.layout, rank, self.hosts,
                                 f"stopped answering: no reply to a heartbeat for "
                                 f"{now - when:.0f}s (run.rpc_timeout {self.timeout:g}s)")

    def blame(self, failure: StageError, grace: float) -> StageError:
        """When `failure` may be a consequence (a stage that waited for a neighbour, a
        replica whose all-reduce lost its peer), the stage that stopped answering or whose
        connection broke, if one did within `grace` seconds; else `failure`."""
        pings = {rank: self.ping(rank) for rank in self.ranks if rank != failure.rank}
        deadline = time.monotonic() + grace
        reporter = f"stage {failure.stage}" + (
            "" if failure.replica is None else f" replica {failure.replica}")
        for rank, future in pings.items():
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.05)
            why = None if future.done() else "stopped answering"
            if why is None:
                try:
                    future.wait()
                except Exception as err:  # a dead process: its connection is gone
                    why = f"stopped answering ({_first_line(err)})"
            if why is not None:
                return rank_error(self.layout, rank, self.hosts, f"{why} ({reporter} "
                                  f"reported: {failure.message.splitlines()[0]})")
        return failure


def wait_all(futures: dict[int, Future], hosts: dict[int, str],
             heartbeat: Heartbeat | None = None, layout: Layout = SINGLE) -> dict[int, Any]:
    """Every call's value; fails as soon as any one fails instead of waiting for the rest, and
    (with a heartbeat) as soon as a stage stops answering."""
    finished = threading.Event()
    for future in futures.values():
        future.add_done_callback(lambda _: finished.set())
    while True:
        finished.clear()  # before looking, so a call finishing meanwhile wakes the wait
        for rank, future in futures.items():
            if future.done():
                try:
                    call_value(rank, future, hosts, layout)  # raises if that call failed
                except StageError as err:
                    if heartbeat is None:
                        raise
                    raise heartbeat.blame(err, min(heartbeat.timeout, 5.0)) from None
        if all(f.done() for f in futures.values()):
            return {rank: call_value(rank, f, hosts, layout) for rank, f in futures.items()}
        if heartbeat is not None:
            heartbeat.check()
        finished.wait(0.5 if heartbeat is not None else 1.0)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
