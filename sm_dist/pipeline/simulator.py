"""A simulation of passes on one device per stage: the list scheduler of pipeline/schedule.py
with each action's measured cost and each transfer a link's latency plus its bytes over the
bandwidth.

A kind that fills the idle time (SM's `W`) takes steps of what one step of its step kind costs
until the input of the stage's next input action arrives (or its limit), and stops on the
step boundary after it; a pass that waits starts only when every action before it has ended.
The result is a timeline of `TimelineEvent`s, read by the same utilisation code and plots as a
real run's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sm_dist.pipeline.actions import Action, kind_of
from sm_dist.pipeline.schedule import Pass, Place, Timing, list_schedule
from sm_dist.pipeline.timeline import TimelineEvent


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

# What an action costs where it runs (stage, pass): (seconds, bytes it sends to its neighbour).
CostModel = Callable[[Place, Action], tuple[float, float]]


def fill_steps(action: Action, start: float, until: float | None, step: float) -> int:
    """The steps a fill takes from `start` when it must end by `until` (its input's arrival
    less the actions between): the whole steps that end by then, at most the fill's limit
    (its index), as the engine's FillBudget takes them knowing the bubble."""
    if until is None or until <= start or step <= 0:
        return 0
    return min(action.index or 0, math.floor((until - start) / step + 1e-9))


def simulate(passes: list[Pass], cost: CostModel, link: Link) -> list[TimelineEvent]:
    """The timeline of `passes` run back to back on one device per stage."""
    def step_cost(place: Place, action: Action) -> float:
        letter = action.kind.step_cost_of or action.kind.letter
        return cost(place, Action(kind_of(letter), 1))[0]

    def fill(place: Place, action: Action, start: float, input_at: float | None) -> float:
        step = step_cost(place, action)
        return fill_steps(action, start, input_at, step) * step

    timing = Timing(duration=lambda p, a: cost(p, a)[0],
                    transfer=lambda p, a: link.transfer(cost(p, a)[1]), fill=fill)
    events = []
    for s, lane in enumerate(list_schedule(passes, timing)):
        for slot in lane:
            action = slot.action
            detail = ""
            if action.kind.fills_idle:
                step = step_cost((s, slot.number), action)
                detail = f"{round((slot.end - slot.start) / step) if step > 0 else 0} steps"
            elif action.kind.counts_steps:
                detail = f"{action.index} steps"
            events.append(TimelineEvent(s, passes[slot.number].iteration, action.kind,
                                        action.index, slot.start, slot.end, detail))
    events.sort(key=lambda e: (e.start, e.stage))
    return events
