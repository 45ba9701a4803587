"""The vocabulary of a schedule: action kinds (with direction, phase and colour) and actions."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ScheduleError(ValueError):
    """A schedule that cannot run: a missing or repeated action, or one that would deadlock."""


class Direction(enum.Enum):
    """Where an action's tensor comes from and goes to."""

    UP = "up"  # receives from the stage below, sends to the stage above
    DOWN = "down"  # receives from the stage above, sends to the stage below
    LOCAL = "local"  # needs nothing from another stage


@dataclass(frozen=True)
class KindInfo:
    """Everything the schedule, the timeline, the monitor and the plots say about one kind."""

    name: str  # what the trace and the plot legend call it
    direction: Direction
    phase: str  # the monitor's word for a stage doing it
    colour: str  # the timeline plot's bar colour (RGB hex)
    legend: str  # the plot legend's group


# Colours of the timeline plot, by phase group.
FORWARD_COLOUR = "#4c72b0"  # inputs travelling up
BACKWARD_COLOUR = "#dd8452"  # gradients travelling down
UPDATE_COLOUR = "#3a923a"  # the update phase
FILL_COLOUR = "#a6d9a6"  # inner steps that fill a bubble, a lighter shade of the update
TANGENT_COLOUR = "#8172b3"  # CGBlock's tangent passes (second-order, both directions)
IDLE_COLOUR = "#e3e3e3"  # the lane behind the bars: what stays visible is idle time


class ActionKind(enum.StrEnum):
    """One letter per thing a stage can be asked to do; `info` says the rest.

    A str enum, so that a kind equals its letter ("F"), prints as it, pickles small and reads
    back from a trace file as it was written.
    """

    FORWARD = "F"  # forward of microbatch j, keeping what the backward needs
    BACKWARD = "B"  # backward of microbatch j
    EVALUATE = "E"  # forward-only pass of evaluation chunk k
    TRIAL = "T"  # forward-only pass of microbatch j at trial parameters
    BUILD = "L"  # build the stage's local model from the backward
    INNER = "I"  # n inner steps on the local model
    FILL = "W"  # up to n more inner steps while the stage's next input has not arrived
    APPLY = "A"  # apply the update, end the iteration
    TANGENT_FORWARD = "J"  # carry tangents of microbatch j up
    TANGENT_BACKWARD = "H"  # carry their gradient changes down
    CG_STEP = "C"  # one CG step with the product a tangent pass left

    def __hash__(self) -> int:  # as its letter's, so that ("F", 0) and (FORWARD, 0) are one key
        return hash(self.value)

    @property
    def info(self) -> KindInfo:
        return KIND_INFO[self]

    @property
    def direction(self) -> Direction:
        return KIND_INFO[self].direction

    @classmethod
    def parse(cls, letter: str) -> ActionKind:
        try:
            return cls(letter)
        except ValueError:
            known = ", ".join(k.value for k in cls)
            raise ScheduleError(f"unknown action kind {letter!r}; one of {known}") from None


_UP, _DOWN, _LOCAL = Direction.UP, Direction.DOWN, Direction.LOCAL
KIND_INFO: dict[ActionKind, KindInfo] = {
    ActionKind.FORWARD: KindInfo("forward", _UP, "forward", FORWARD_COLOUR, "forward"),
    ActionKind.BACKWARD: KindInfo("backward", _DOWN, "backward", BACKWARD_COLOUR, "backward"),
    ActionKind.EVALUATE: KindInfo("evaluate", _UP, "evaluate", FORWARD_COLOUR, "forward"),
    ActionKind.TRIAL: KindInfo("trial forward", _UP, "trial", FORWARD_COLOUR, "forward"),
    ActionKind.BUILD: KindInfo("build local loss", _LOCAL, "update", UPDATE_COLOUR, "update"),
    ActionKind.INNER: KindInfo("inner steps", _LOCAL, "update", UPDATE_COLOUR, "update"),
    ActionKind.FILL: KindInfo("fill inner steps", _LOCAL, "update (fill)", FILL_COLOUR, "fill"),
    ActionKind.APPLY: KindInfo("apply update", _LOCAL, "update", UPDATE_COLOUR, "update"),
    ActionKind.TANGENT_FORWARD: KindInfo("tangent forward", _UP, "tangent pass",
                                         TANGENT_COLOUR, "tangent"),
    ActionKind.TANGENT_BACKWARD: KindInfo("tangent backward", _DOWN, "tangent pass",
                                          TANGENT_COLOUR, "tangent"),
    ActionKind.CG_STEP: KindInfo("CG step", _LOCAL, "update", UPDATE_COLOUR, "update"),
}
FORWARD_KINDS = tuple(k for k in ActionKind if k.direction is Direction.UP)
BACKWARD_KINDS = tuple(k for k in ActionKind if k.direction is Direction.DOWN)
# The kinds that carry a microbatch or chunk index (the others carry a step count or nothing).
INDEXED_KINDS = FORWARD_KINDS + BACKWARD_KINDS


@dataclass(frozen=True)
class Action:
    """One thing one stage does: a kind and its index (microbatch, chunk, or step count)."""

    kind: ActionKind
    index: int | None = None  # microbatch / chunk for F, B, E, T, J, H; step count for I, W
    iteration: int = 0  # distinguishes repeated plans when several are drawn in one grid
    step: int = 0  # CGBlock: which CG step's tangent pass a J, H or C belongs to

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ActionKind):  # a letter, as tests and grids write it
            object.__setattr__(self, "kind", ActionKind.parse(self.kind))

    def __str__(self) -> str:
        return self.kind.value if self.index is None else f"{self.kind.value}{self.index}"


Schedule = list[list[Action]]  # one ordered list per stage
