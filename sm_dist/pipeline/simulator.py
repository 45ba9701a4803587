"""A discrete-event simulation of schedules on one device per stage: each action takes its
measured cost, each transfer a link's latency plus its bytes over the bandwidth.

The same dependencies as the engine: an input kind waits for the stage below to finish it and
its tensor to cross the link, a backward kind for the stage above; a stage runs its actions in
plan order; a fill (`W`) takes steps of one inner step's cost until the input of the stage's
next forward kind arrives (or its limit); a pass the coordinator steers starts only when every
action of the pass before it has ended. The result is a timeline of `TimelineEvent`s, read by
the same utilisation code and plots as a real run's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sm_dist.pipeline.actions import FORWARD_KINDS, Action, ActionKind, Schedule, ScheduleError
from sm_dist.pipeline.schedule import dependencies
from sm_dist.pipeline.timeline import TimelineEvent

K = ActionKind


@dataclass(frozen=True)
class Link:
    """A stage-to-stage link: every transfer takes latency + bytes / bandwidth."""

    bandwidth: float  # bytes per second
    latency: float  # seconds

    def transfer(self, nbytes: float) -> float:
        return self.latency + (nbytes / self.bandwidth if math.isfinite(self.bandwidth) else 0.0)


# Named links (bandwidth per direction; latencies are typical figures, see docs/performance.md).
LINKS = {
    "nvlink": Link(450e9, 2e-6),  # NVLink 4 (H100/H200): 900 GB/s both directions together
    "pcie4": Link(32e9, 5e-6),  # PCIe 4.0 x16: 32 GB/s per direction
    "pcie5": Link(64e9, 5e-6),  # PCIe 5.0 x16: 64 GB/s per direction
    "100gbe": Link(12.5e9, 10e-6),  # 100 Gb/s Ethernet (RDMA-class latency)
    "10gbe": Link(1.25e9, 50e-6),  # 10 Gb/s Ethernet over TCP
    "none": Link(math.inf, 0.0),  # free transfers: the schedule's own shape
}


@dataclass(frozen=True)
class Pass:
    """One pass the coordinator sends: every stage's actions, and whether it must wait for
    everything sent before it to end (passes the coordinator steers)."""

    iteration: int
    schedule: Schedule
    waits: bool = False


# What an action costs on its stage: (seconds, bytes it sends to its neighbour).
CostModel = Callable[[int, Action], tuple[float, float]]


def simulate(passes: list[Pass], cost: CostModel, link: Link,
             inner_step: Callable[[int], float]) -> list[TimelineEvent]:
    """The timeline of `passes` run back to back on one device per stage. `inner_step(s)` is
    the cost of one inner step on stage s (what a fill step takes)."""
    num_stages = len(passes[0].schedule) if passes else 0
    lanes: list[list[tuple[int, Action]]] = [[] for _ in range(num_stages)]
    for number, one in enumerate(passes):
        for s, actions in enumerate(one.schedule):
            lanes[s].extend((number, a) for a in actions)
    done: dict[tuple[int, int, Action], tuple[float, float]] = {}  # (pass, s, a) -> end, bytes
    pass_end = [0.0] * len(passes)
    remaining = [sum(len(a) for a in one.schedule) for one in passes]
    free, pointer = [0.0] * num_stages, [0] * num_stages
    events: list[TimelineEvent] = []

    def ready(number: int, s: int, action: Action) -> float | None:
        """When `action`'s input from a neighbour is there (0 if it needs none); None: not
        known yet."""
        times = []
        for other, dep in dependencies(s, action, num_stages):
            key = (number, other, dep)
            if key not in done:
                return None
            end, nbytes = done[key]
            times.append(end + link.transfer(nbytes))
        return max(times, default=0.0)

    while any(pointer[s] < len(lanes[s]) for s in range(num_stages)):
        progressed = False
        for s in range(num_stages):
            while pointer[s] < len(lanes[s]):
                number, action = lanes[s][pointer[s]]
                first = pointer[s] == 0 or lanes[s][pointer[s] - 1][0] != number
                barrier = 0.0
                if first and passes[number].waits and number > 0:
                    if any(remaining[k] for k in range(number)):
                        break  # the coordinator waits for the passes before this one
                    barrier = max(pass_end[:number])
                arrives = ready(number, s, action)
                if arrives is None:
                    break
                start = max(free[s], arrives, barrier)
                seconds, nbytes = cost(s, action)
                if action.kind is K.FILL:
                    wait = _fill_until(lanes[s], pointer[s], s, ready)
                    if wait is None:
                        break  # the fill lasts until that input is known to arrive
                    step = inner_step(s)
                    limit = action.index or 0
                    steps = 0 if wait <= start or step <= 0 else min(
                        limit, math.ceil((wait - start) / step))
                    seconds, detail = steps * step, f"{steps} steps"
                else:
                    detail = f"{action.index} steps" if action.kind is K.INNER else ""
                end = start + seconds
                done[(number, s, action)] = (end, nbytes)
                events.append(TimelineEvent(s, passes[number].iteration, action.kind,
                                            action.index, start, end, detail))
                free[s] = end
                pass_end[number] = max(pass_end[number], end)
                remaining[number] -= 1
                pointer[s] += 1
                progressed = True
        if not progressed:
            stuck = ", ".join(f"stage {s} at {lanes[s][pointer[s]][1]}"
                              for s in range(num_stages) if pointer[s] < len(lanes[s]))
            raise ScheduleError(f"the simulated schedule deadlocks: {stuck}")
    return events


def _fill_until(lane: list[tuple[int, Action]], position: int, s: int,
                ready: Callable[[int, int, Action], float | None]) -> float | None:
    """When the input a fill waits for arrives: the next forward kind of the stage, in this
    pass or a later one; 0 when nothing follows (the last pass has no bubble to fill)."""
    for number, action in lane[position + 1:]:
        if action.kind in FORWARD_KINDS:
            return ready(number, s, action)
    return 0.0
