"""benchmarks/tensor_memory.py: live tensor bytes charged to the stage whose action allocated
them, from the profiler's event tree (exact on a scripted tree), and a real profiled run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._C._profiler import _EventType

from tests.conftest import REPO, write_job

_spec = importlib.util.spec_from_file_location("tensor_memory",
                                               REPO / "benchmarks" / "tensor_memory.py")
assert _spec is not None and _spec.loader is not None
tensor_memory = importlib.util.module_from_spec(_spec)
sys.modules["tensor_memory"] = tensor_memory  # its dataclasses look their module up
_spec.loader.exec_module(tensor_memory)


@dataclass
class Fields:
    ptr: int
    alloc_size: int
    device: torch.device = torch.device("cpu")


@dataclass
class Event:
    name: str
    start_time_ns: int = 0
    children: list[Event] = field(default_factory=list)
    extra_fields: Any = None
    tag: Any = _EventType.TorchOp


def allocation(time: int, ptr: int, size: int) -> Event:
    return Event("[memory]", time, extra_fields=Fields(ptr, size), tag=_EventType.Allocation)


def test_bytes_are_charged_to_the_allocating_stage_until_freed() -> None:
    events = [
        allocation(0, 99, 1000),  # before any stage's action: the coordinator's, not counted
        Event("sm_dist.stage.0", 1, [Event("aten::mm", 1, [allocation(1, 1, 100),
                                                            allocation(2, 2, 50)])]),
        Event("sm_dist.stage.1", 3, [allocation(3, 3, 70), allocation(4, 1, -100)]),
        # stage 1 freed stage 0's tensor 1 at time 4; the address is reused by stage 0:
        Event("sm_dist.stage.0", 5, [allocation(5, 1, 30), allocation(6, 2, -50),
                                     allocation(7, 99, -1000)]),
    ]
    # stage 0: 100, 150 (peak), 50 after the free at 4, 80 at 5, 30 at 6; stage 1: 70.
    assert tensor_memory.stage_peaks(events) == {0: 150, 1: 70}


def test_a_free_comes_before_an_allocation_at_the_same_instant() -> None:
    events = [Event("sm_dist.stage.0", 0, [allocation(0, 1, 100), allocation(1, 1, -100),
                                           allocation(1, 1, 100)])]
    assert tensor_memory.stage_peaks(events) == {0: 100}


def test_a_profiled_run_reports_every_stage(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", {
        "name": "tensors",
        "model": {"mlp": {"widths": [6, 8, 8, 3], "activation": "tanh"}, "balance": [1, 2]},
        "data": {"dataset": "synthetic", "microbatches": 2,
                 "synthetic": {"features": 6, "classes": 3, "train_size": 32, "test_size": 8}},
        "optimizer": {"name": "sm", "inner_steps": 2, "recompute": True},
        "run": {"iterations": 2, "eval_every": 0, "checkpoint_every": 0, "threads": 1}})
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tensor_memory.py"),
                           str(job)], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    peaks = json.loads(done.stdout.strip().splitlines()[-1])["tensor_peak_mb"]
    assert len(peaks) == 2 and all(p > 0 for p in peaks)


MB = 2**20


def test_the_breakdown_names_what_a_stage_held_at_its_peak() -> None:
    gram = "sm_dist.action.K (input-layer Gram factor)"
    events = [
        Event("sm_dist.stage.0", 0, [Event("sm_dist.action.F (forward)", 0,
                                           [allocation(0, 1, 100 * MB)])]),
        Event("sm_dist.stage.0", 1, [Event(gram, 1, [allocation(1, 2, 300 * MB),
                                                     allocation(2, 3, 200 * MB),
                                                     allocation(3, 3, -200 * MB)])]),
        Event("sm_dist.stage.0", 4, [Event("sm_dist.action.B (backward)", 4,
                                           [allocation(4, 1, -100 * MB),
                                            allocation(5, 4, 50 * MB)])]),
        Event("sm_dist.stage.1", 6, [allocation(6, 5, 999 * MB)]),  # another stage: not in it
    ]
    peaks = tensor_memory.peak_details(events, detail=0)
    assert peaks[0].size == 600 * MB and peaks[1].size == 999 * MB
    assert peaks[0].during == "K (input-layer Gram factor)"
    assert peaks[0].held == [(300 * MB, "K (input-layer Gram factor)"),
                             (200 * MB, "K (input-layer Gram factor)"), (100 * MB, "F (forward)")]
    assert peaks[1].held == []  # only the stage asked for is broken down
    assert tensor_memory.breakdown_lines(peaks[0], 0, largest=2) == [
        "stage 0: peak 600.00 MiB of live tensors, during K (input-layer Gram factor); alive "
        "then, by the action that allocated them:",
        "    500.00 MiB  K (input-layer Gram factor)",
        "    100.00 MiB  F (forward)",
        "  its 2 largest tensors, MiB: 300.00 (K), 200.00 (K)"]
    assert tensor_memory.stage_peaks(events) == {0: 600 * MB, 1: 999 * MB}
