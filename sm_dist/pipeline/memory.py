"""A stage process's memory while it trains: the peak since training started, and the base.

CUDA: `torch.cuda.max_memory_allocated` (tensors only), its peak statistics reset at the start.
CPU: the process's peak resident memory (VmHWM), reset at the start by writing 5 to
/proc/self/clear_refs (Linux), so that start-up and plotting do not count. Where the reset is
refused, the peak counts from the process's start and `reset` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class MemoryReading:
    """Bytes: at the start of training (`base`) and the most held since (`peak`)."""

    base: int
    peak: int
    resident: bool  # True: a CPU process's resident memory; False: CUDA tensor memory
    since_start: bool = True  # False: the CPU peak could not be reset (counts from start-up)

    @property
    def training(self) -> int:
        """What training added on top of what the process held when it started."""
        return max(self.peak - self.base, 0)


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryProbe:
    """Measures one device's memory for the stage on it; `start` once training begins."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base: int | None = None
        self._since_start = True

    def start(self) -> None:
        """Forget the peak so far: from here on, the peak is training's."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
            self._since_start = True
        except OSError:
            self._since_start = False
        self._base = _status_kib("VmRSS") * 1024 if _STATUS.exists() else 0

    def reading(self) -> MemoryReading | None:
        """The base and the peak so far; None before `start` or where nothing can be read."""
        if self._base is None:
            return None
        if self.device.type == "cuda":
            return MemoryReading(self._base, torch.cuda.max_memory_allocated(self.device),
                                 resident=False)
        if not _STATUS.exists():
            return None
        return MemoryReading(self._base, _status_kib("VmHWM") * 1024, resident=True,
                             since_start=self._since_start)
