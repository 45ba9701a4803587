"""How a stage's failure reaches the coordinator: as a value naming stage, rank and host."""

from __future__ import annotations

import traceback
from dataclasses import dataclass


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
        text = traceback.format_exc()
        last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
        return cls(stage, rank, host, last, text)

    def to_error(self) -> StageError:
        return StageError(self.stage, self.rank, self.host, f"{self.error}\n{self.traceback}")
