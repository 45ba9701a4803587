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
`--breakdown S` first prints what stage S held at its peak: the action running then, and the
live tensors grouped by the kind of action that allocated them (which is what to cut).

    python benchmarks/tensor_memory.py JOB [--set KEY=VALUE ...] [--breakdown STAGE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
ACTION = "sm_dist.action."  # inside a stage's tag: the kind's letter and name


def instrument() -> None:
    """Name each stage's training actions for the profiler; copy what a stage receives."""
    perform = executor.PlanRun.perform

    def tagged(run: executor.PlanRun, position: int) -> None:
        kind = run.plan.actions[position].kind
        if kind == EVALUATE:
            return perform(run, position)
        with record_function(f"{TAG}{run.stage.index}"), \
                record_function(f"{ACTION}{kind.letter} ({kind.name})"):
            return perform(run, position)

    send = local.LocalChannel.send

    def copied(channel: local.LocalChannel, stage: int, key: Any, payload: Any) -> None:
        with record_function(f"{TAG}{stage}"), \
                record_function(f"{ACTION}received"):  # the receiver's copy, in its mailbox
            payload = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                               payload)
        send(channel, stage, key, payload)

    executor.PlanRun.perform = tagged  # type: ignore[method-assign]
    local.LocalChannel.send = copied  # type: ignore[method-assign]


@dataclass
class Allocation:
    """One allocation (size > 0) or free (size < 0) event, with who made it."""

    time: int
    ptr: int
    size: int
    stage: int | None  # None: the coordinator's own work (batches, records)
    action: str | None  # the action of the stage that made it, "" outside any


def allocations(events: list[Any]) -> list[Allocation]:
    """The CPU allocations and frees of the profiler's event tree, in time order (at one
    instant a free before an allocation)."""
    found: list[Allocation] = []
    stack: list[tuple[Any, int | None, str | None]] = [(event, None, None) for event in events]
    while stack:
        event, stage, action = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == "cpu":
                found.append(Allocation(event.start_time_ns, fields.ptr, fields.alloc_size,
                                        stage, action))
            continue
        if event.name.startswith(TAG):
            stage, action = int(event.name[len(TAG):]), ""
        elif event.name.startswith(ACTION):
            action = event.name[len(ACTION):]
        stack.extend((child, stage, action) for child in event.children)
    found.sort(key=lambda a: (a.time, a.size > 0))
    return found


@dataclass
class Peak:
    """A stage's largest live bytes, the action running then and, for the stage broken down,
    the tensors alive then (their sizes and the actions that allocated them)."""

    size: int = 0
    during: str | None = None
    at: int = 0  # the index, in time order, of the allocation that reached it
    held: list[tuple[int, str]] = field(default_factory=list)  # (bytes, action), largest first


def stage_peaks(events: list[Any]) -> dict[int, int]:
    """Peak live bytes per stage from the profiler's event tree (allocations and frees)."""
    return {stage: peak.size for stage, peak in peak_details(events).items()}


def peak_details(events: list[Any], detail: int | None = None) -> dict[int, Peak]:
    """Each stage's Peak; for stage `detail`, what was alive at it (a second replay up to it)."""
    ordered = allocations(events)
    owner: dict[int, Allocation] = {}
    live: dict[int, int] = {}
    peaks: dict[int, Peak] = {}
    for index, event in enumerate(ordered):
        if event.size > 0:
            if event.stage is None:
                continue
            owner[event.ptr] = event
            live[event.stage] = live.get(event.stage, 0) + event.size
            peak = peaks.setdefault(event.stage, Peak())
            if live[event.stage] > peak.size:
                peak.size, peak.during, peak.at = live[event.stage], event.action, index
        elif event.ptr in owner:
            freed = owner.pop(event.ptr)
            assert freed.stage is not None
            live[freed.stage] -= freed.size
    if detail in peaks:
        alive: dict[int, Allocation] = {}
        for event in ordered[:peaks[detail].at + 1]:
            if event.size > 0 and event.stage is not None:
                alive[event.ptr] = event
            elif event.size < 0:
                alive.pop(event.ptr, None)
        peaks[detail].held = sorted(((a.size, a.action or "outside any action")
                                     for a in alive.values() if a.stage == detail),
                                    key=lambda held: -held[0])
    return peaks


def breakdown_lines(peak: Peak, stage: int, largest: int = 6) -> list[str]:
    """What stage `stage` held at its peak: by allocating action, then its largest tensors."""
    lines = [f"stage {stage}: peak {peak.size / 2**20:.2f} MiB of live tensors, during "
             f"{peak.during or 'no action'}; alive then, by the action that allocated them:"]
    by_action: dict[str, int] = {}
    for size, action in peak.held:
        by_action[action] = by_action.get(action, 0) + size
    for action, size in sorted(by_action.items(), key=lambda item: -item[1]):
        lines.append(f"  {size / 2**20:8.2f} MiB  {action}")
    lines.append(f"  its {largest} largest tensors, MiB: " + ", ".join(
        f"{size / 2**20:.2f} ({action.split(' ')[0]})" for size, action in peak.held[:largest]))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--breakdown", type=int, metavar="STAGE",
                        help="print what this stage held at its peak, by action")
    args = parser.parse_args()
    torch.set_num_threads(1)
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sm_dist.train(args.job, single_process=True, overrides=args.sets, live=False,
                          out=Path(tmp) / "run")
        wall = time.perf_counter() - start
    peaks = peak_details(prof.profiler.kineto_results.experimental_event_tree(), args.breakdown)
    if args.breakdown is not None:
        if args.breakdown not in peaks:
            print(f"tensor_memory: --breakdown {args.breakdown}: no such stage; the job has "
                  f"stages 0 to {max(peaks)}", file=sys.stderr)
            sys.exit(2)
        print("\n".join(breakdown_lines(peaks[args.breakdown], args.breakdown)))
    sizes = [peaks[s].size / 2**20 if s in peaks else 0 for s in range(max(peaks) + 1)]
    print(json.dumps({"tensor_peak_mb": sizes, "wall_time": wall}))


if __name__ == "__main__":
    main()
