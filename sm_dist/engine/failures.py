"""How a stage's failure reaches the coordinator: as a value naming stage, rank and host."""

from __future__ import annotations

import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any

from torch.futures import Future


class StageError(RuntimeError):
    """A stage failed or stopped answering: says which stage, on which rank and host."""

    def __init__(self, stage: int, rank: int, host: str, message: str) -> None:
        super().__init__(stage, rank, host, message)  # all args, so that it pickles
        self.stage, self.rank, self.host, self.message = stage, rank, host, message

    def __str__(self) -> str:
        where = f"rank {self.rank}" + (f" on {self.host}" if self.host else "")
        return f"stage {self.stage} ({where}): {self.message}"


@dataclass
class RemoteFailure:
    """An exception raised inside a stage, sent back as a value so its context is not lost."""

    stage: int
    rank: int
    host: str
    error: str
    traceback: str

    @classmethod
    def capture(cls, stage: int, rank: int, host: str) -> RemoteFailure:
        """The exception being handled, as raised on this stage."""
        exc = sys.exc_info()[1]
        error = ("unknown error" if exc is None else
                 traceback.format_exception_only(type(exc), exc)[0].strip().splitlines()[0])
        return cls(stage, rank, host, error, traceback.format_exc())

    def to_error(self) -> StageError:
        return StageError(self.stage, self.rank, self.host, f"{self.error}\n{self.traceback}")


def call_value(rank: int, future: Future, hosts: dict[int, str]) -> Any:
    """The value of a finished call to stage `rank`, or a StageError naming that stage: its
    own failure, or its having stopped answering (the connection broke, the call timed out)."""
    try:
        value = future.wait()
    except Exception as err:
        raise StageError(rank, rank, hosts.get(rank, ""),
                         f"stopped answering ({_first_line(err)})") from None
    if isinstance(value, RemoteFailure):
        raise value.to_error()
    return value


def wait_all(futures: dict[int, Future], hosts: dict[int, str]) -> dict[int, Any]:
    """Every call's value; fails as soon as any one fails instead of waiting for the rest."""
    finished = threading.Event()
    for future in futures.values():
        future.add_done_callback(lambda _: finished.set())
    while True:
        finished.clear()  # before looking, so a call finishing meanwhile wakes the wait
        for rank, future in futures.items():
            if future.done():
                call_value(rank, future, hosts)  # raises if that call failed
        if all(f.done() for f in futures.values()):
            return {rank: call_value(rank, f, hosts) for rank, f in futures.items()}
        finished.wait(1.0)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
