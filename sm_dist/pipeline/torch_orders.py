"""The action orders of torch.distributed.pipelining's own schedule classes (their
`pipeline_order`), as this package's schedules, for the simulator: GPipe, 1F1B, interleaved
1F1B, a zero-bubble schedule with one stage per device (ZB-H1) and ZB-V.

torch builds an order from mocked stages without a process group (its
`_schedule_visualizer.get_schedule_ops`, what its own schedule plots use). Only the order of
each device's compute actions is taken; when they run comes from this package's list
scheduler and the costs a run measured. A full backward is `B`; a zero-bubble schedule's
input-gradient and weight-gradient halves are `D` and `P`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sm_dist.pipeline.actions import (
    BACKWARD,
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    EVALUATE,
    FORWARD,
    Action,
    ActionKind,
    Schedule,
)


@dataclass(frozen=True)
class TorchSchedule:
    """One of torch's schedule classes: its name there, its virtual stages per device and how
    they are placed (`loop`: stage v on device v mod p; `v`: device d holds d and 2p−1−d)."""

    torch_name: str
    chunks: int
    style: str
    what: str  # one line for the docs and the command line


SCHEDULES = {
    "gpipe": TorchSchedule("GPipe", 1, "loop", "GPipe: every forward, then every backward"),
    "1f1b": TorchSchedule("1F1B", 1, "loop",
                          "1F1B: a backward after each forward once the pipeline is full"),
    "interleaved": TorchSchedule("Interleaved1F1B", 2, "loop",
                                 "interleaved 1F1B: two virtual stages per device"),
    "zb": TorchSchedule("InterleavedZeroBubble", 1, "loop",
                        "zero bubble (ZB-H1): the backward split, weight gradients deferred"),
    "zbv": TorchSchedule("ZBVZeroBubble", 2, "v",
                         "ZB-V: zero bubble on two virtual stages per device, in a V"),
}
_KINDS: dict[str, ActionKind] = {"F": FORWARD, "B": BACKWARD, "I": BACKWARD_INPUT,
                                 "W": BACKWARD_WEIGHT}


class TorchScheduleError(ValueError):
    """A schedule torch cannot build for these devices and microbatches, or no torch for it."""


def placement(name: str, devices: int) -> tuple[int, ...]:
    """The device of each virtual stage of schedule `name` on `devices` devices."""
    chosen = SCHEDULES[name]
    stages = devices * chosen.chunks
    if chosen.style == "v":
        return tuple(v if v < devices else 2 * devices - 1 - v for v in range(stages))
    return tuple(v % devices for v in range(stages))


def torch_order(name: str, devices: int, microbatches: int) -> Schedule:
    """Each device's forward and backward actions in schedule `name`'s order, as torch's class
    builds it (a device's chunk c is its c-th virtual stage, see `placement`)."""
    chosen = SCHEDULES[name]
    where = placement(name, devices)
    chunk_of = {v: [u for u, d in enumerate(where) if d == where[v]].index(v)
                for v in range(len(where))}
    rows = _pipeline_order(chosen, devices, microbatches)
    order = [[Action(_KINDS[a.computation_type.value], a.microbatch_index, 0,
                     chunk_of[a.stage_index])
              for a in row if a is not None and a.computation_type.value in _KINDS]
             for row in rows]
    return [_numbered(row, microbatches) for row in order]


def _pipeline_order(chosen: TorchSchedule, devices: int, microbatches: int) -> list[list]:
    """torch's `pipeline_order` of the class on mocked stages (no process group), as torch's
    own _schedule_visualizer builds it; also with one stage per device for the zero-bubble
    class, which that helper refuses."""
    try:
        from unittest import mock

        from torch.distributed.pipelining import schedules
        from torch.distributed.pipelining.stage import PipelineStage
    except ImportError as err:
        raise TorchScheduleError(f"--schedule needs torch.distributed.pipelining: {err}") from None
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = 0, devices, None
    stage.num_stages = devices * chosen.chunks
    cls = schedules.get_schedule_class(chosen.torch_name)
    single = issubclass(cls, schedules.PipelineScheduleSingle)
    quiet = logging.getLogger("torch.distributed.pipelining.schedules")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        built = cls(stage if single else [stage] * chosen.chunks, microbatches)
    except (ValueError, AssertionError, RuntimeError) as err:
        raise TorchScheduleError(f"torch's {chosen.torch_name} cannot run {microbatches} "
                                 f"microbatches on {devices} devices: {err}") from None
    finally:
        quiet.level = level
    return [list(built.pipeline_order[d]) for d in range(devices)]


def _numbered(row: list[Action], microbatches: int) -> list[Action]:
    """The device's actions with each (kind, chunk)'s microbatches 0..M−1 in the order they
    come. torch 2.14's 1F1B order numbers the last device's forwards from 1 (F1..FM) while
    its runtime runs F0..F(M−1) in that order: where a kind's numbers are not 0..M−1, they are
    renumbered in order; where they are, nothing changes."""
    out, seen = [], {}
    groups: dict[tuple[ActionKind, int], list[int]] = {}
    for action in row:
        groups.setdefault((action.kind, action.chunk), []).append(action.index or 0)
    for action in row:
        key = (action.kind, action.chunk)
        if sorted(groups[key]) == list(range(microbatches)):
            out.append(action)
            continue
        count = seen.get(key, 0)
        seen[key] = count + 1
        out.append(Action(action.kind, count, action.step, action.chunk))
    return out


def trains(sent: Schedule) -> bool:
    """Whether a pass is a training pass: forwards and backwards of the batch."""
    kinds = {a.kind for lane in sent for a in lane}
    return FORWARD in kinds and BACKWARD in kinds


def rescheduled(sent: Schedule, name: str) -> tuple[Schedule, Schedule]:
    """A dispatched GPipe training pass on schedule `name`: (its forwards and backwards in
    torch's order for that schedule, then each stage's update actions; the evaluation chunks
    it carried, as a pass of their own that follows). Forward-only passes run as they ran."""
    devices = len(sent)
    microbatches = sum(a.kind == FORWARD for a in sent[0])
    order = torch_order(name, devices, microbatches)
    lanes = []
    for lane, ordered in zip(sent, order, strict=True):
        # A stage's own actions between its forwards and backwards (an optimizer's
        # prepare_actions) go right after its last forward in the new order.
        first_backward = next(k for k, a in enumerate(lane) if a.kind == BACKWARD)
        prepared = [a for a in lane[:first_backward] if a.kind != FORWARD]
        after = [a for a in lane[first_backward:] if a.kind not in (BACKWARD, EVALUATE)]
        last_forward = max(k for k, a in enumerate(ordered) if a.kind == FORWARD)
        lanes.append([*ordered[:last_forward + 1], *prepared, *ordered[last_forward + 1:],
                      *after])
    evals = [[a for a in lane if a.kind == EVALUATE] for lane in sent]
    return lanes, evals
