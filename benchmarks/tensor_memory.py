"""Each stage's peak of live tensor memory while it trains: on the CPU, the counterpart of CUDA's
`max_memory_allocated` (above what was allocated when training started), free of what resident
memory adds (torch's libraries, the allocator's cached and fragmented pages, thread arenas).

Trains the job in this process (`--single-process`) under torch.profiler with profile_memory:
every action of a stage runs inside a `record_function` named after the stage, every tensor
allocation is charged to the stage whose action made it and given back when it is freed. A
tensor sent to a neighbour is copied as it is sent and the copy charged to the receiver, as
when the neighbour is another process or device: there the sender's tensor goes once sent and
the receiver holds its own until it takes it (in one process they would share one tensor,
held by the sender until the receiver's turn comes). Tensors that existed before
training (parameters, data) do not count, and neither do evaluation passes. Prints one JSON
object: {"tensor_peak_mb": [per stage], "wall_time": seconds (profiled, so slower)}.

    python benchmarks/tensor_memory.py JOB [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._pytree import tree_map

import sm_dist
from sm_dist.pipeline import executor, local
from sm_dist.pipeline.actions import EVALUATE

TAG = "sm_dist.stage."


def instrument() -> None:
    """Name each stage's training actions for the profiler; copy what a stage receives."""
    perform = executor.PlanRun.perform

    def tagged(run: executor.PlanRun, position: int) -> None:
        if run.plan.actions[position].kind == EVALUATE:
            return perform(run, position)
        with record_function(f"{TAG}{run.stage.index}"):
            return perform(run, position)

    send = local.LocalChannel.send

    def copied(channel: local.LocalChannel, stage: int, key: Any, payload: Any) -> None:
        with record_function(f"{TAG}{stage}"):  # the receiver's copy, held in its mailbox
            payload = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                               payload)
        send(channel, stage, key, payload)

    executor.PlanRun.perform = tagged  # type: ignore[method-assign]
    local.LocalChannel.send = copied  # type: ignore[method-assign]


def stage_peaks(events: list[Any]) -> dict[int, int]:
    """Peak live bytes per stage from the profiler's event tree (allocations and frees)."""
    allocations = []  # (time, is_allocation, ptr, bytes, stage)
    stack: list[tuple[Any, int | None]] = [(event, None) for event in events]
    while stack:
        event, stage = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == "cpu":
                allocations.append((event.start_time_ns, fields.alloc_size > 0, fields.ptr,
                                    fields.alloc_size, stage))
            continue
        if event.name.startswith(TAG):
            stage = int(event.name[len(TAG):])
        stack.extend((child, stage) for child in event.children)
    allocations.sort(key=lambda a: (a[0], a[1]))  # at one instant, a free before an allocation
    owner: dict[int, tuple[int, int]] = {}
    live: dict[int, int] = {}
    peak: dict[int, int] = {}
    for _, allocated, ptr, size, stage in allocations:
        if allocated:
            if stage is None:
                continue  # the coordinator's own work (batches, records)
            owner[ptr] = (stage, size)
            live[stage] = live.get(stage, 0) + size
            peak[stage] = max(peak.get(stage, 0), live[stage])
        elif ptr in owner:
            stage_of, size_of = owner.pop(ptr)
            live[stage_of] -= size_of
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    torch.set_num_threads(1)
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sm_dist.train(args.job, single_process=True, overrides=args.sets, live=False,
                          out=Path(tmp) / "run")
        wall = time.perf_counter() - start
    peaks = stage_peaks(prof.profiler.kineto_results.experimental_event_tree())
    print(json.dumps({"tensor_peak_mb": [peaks.get(s, 0) / 2**20 for s in range(max(peaks) + 1)],
                      "wall_time": wall}))


if __name__ == "__main__":
    main()
