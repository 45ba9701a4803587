"""The vocabulary of a schedule: action kinds (registered by letter, each with its direction,
phase and colour) and actions. The pipeline's own kinds are here; an optimizer registers the
kinds of its update phase in its own module."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class ScheduleError(ValueError):
    """A schedule that cannot run: a missing or repeated action, or one that would deadlock."""


class Direction(enum.Enum):
    """Where an action's tensor comes from and goes to."""

    UP = "up"  # receives from the stage below, sends to the stage above
    DOWN = "down"  # receives from the stage above, sends to the stage below
    LOCAL = "local"  # needs nothing from another stage


# Colours of the timeline plot, by phase group (optimizers pick theirs from these too).
FORWARD_COLOUR = "#4c72b0"  # inputs travelling up
BACKWARD_COLOUR = "#dd8452"  # gradients travelling down
UPDATE_COLOUR = "#3a923a"  # the update phase
FILL_COLOUR = "#a6d9a6"  # inner steps that fill a bubble, a lighter shade of the update
TANGENT_COLOUR = "#8172b3"  # passes of an update phase through the pipeline (both directions)
IDLE_COLOUR = "#e3e3e3"  # the lane behind the bars: what stays visible is idle time
WEIGHT_COLOUR = "#f2b68a"  # a weight gradient computed apart, a lighter shade of the backward
UNKNOWN_COLOUR = "#999999"  # a kind read from a trace whose optimizer is not loaded here


@dataclass(frozen=True, eq=False)
class ActionKind:
    """One thing a stage can be asked to do, named by one letter; equal kinds share it.

    What the schedule needs to know of a kind is said here, so that the scheduler, the
    executor, the simulator, the timeline, the monitor and the plots treat an optimizer's own
    kinds as they treat the pipeline's.
    """

    letter: str
    name: str  # what the trace and the plot legend call it
    direction: Direction
    phase: str  # the monitor's word for a stage doing it
    colour: str  # the timeline plot's bar colour (RGB hex)
    legend: str  # the plot legend's group
    after_backward: bool = False  # only after the stage's last backward of the pass (updates)
    fills_idle: bool = False  # lasts until the stage's next input arrives (a bubble's filler)
    counts_steps: bool = False  # its index is a number of steps; its detail "k steps" the taken
    step_cost_of: str | None = None  # a step of it costs what one step of this kind costs
    needs_before: str | None = None  # a kind that must come earlier in the stage's list

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActionKind) and other.letter == self.letter

    def __hash__(self) -> int:
        return hash(self.letter)

    def __str__(self) -> str:
        return self.letter

    def __repr__(self) -> str:
        return f"ActionKind({self.letter!r}, {self.name!r})"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Plans travel as the letter alone: every process registers the same kinds.
        return kind_of, (self.letter,)

    @property
    def travels(self) -> bool:
        """Whether it carries a microbatch or chunk index between stages (F, B, E, T, ...)."""
        return self.direction is not Direction.LOCAL


_KINDS: dict[str, ActionKind] = {}


def register_kind(new: ActionKind) -> ActionKind:
    """Make `new` known by its letter (again with the same definition is fine)."""
    if len(new.letter) != 1 or not new.letter.isalpha():
        raise ValueError(f"an action kind's letter is one letter, not {new.letter!r}")
    known = _KINDS.get(new.letter)
    if known is not None and vars(known) != vars(new):
        raise ValueError(f"action kind {new.letter!r} is already {known.name!r}; choose "
                         "another letter")
    _KINDS[new.letter] = new
    return new


def kind_of(letter: str) -> ActionKind:
    """The registered kind of `letter`."""
    try:
        return _KINDS[letter]
    except KeyError:
        known = ", ".join(_KINDS)
        raise ScheduleError(f"unknown action kind {letter!r}; one of {known}") from None


def kind_in_trace(letter: str) -> ActionKind:
    """The kind of a letter read from a trace: registered, or (its optimizer not loaded in
    this process) a local kind drawn in grey under its own letter."""
    if letter in _KINDS:
        return _KINDS[letter]
    return ActionKind(letter, letter, Direction.LOCAL, "update", UNKNOWN_COLOUR, "other")


def known_kinds() -> list[ActionKind]:
    """Every registered kind, in the order of registration (the plot legend's order)."""
    return list(_KINDS.values())


_UP, _DOWN = Direction.UP, Direction.DOWN
FORWARD = register_kind(ActionKind("F", "forward", _UP, "forward", FORWARD_COLOUR, "forward"))
BACKWARD = register_kind(ActionKind("B", "backward", _DOWN, "backward", BACKWARD_COLOUR,
                                    "backward"))
EVALUATE = register_kind(ActionKind("E", "evaluate", _UP, "evaluate", FORWARD_COLOUR,
                                    "forward"))
TRIAL = register_kind(ActionKind("T", "trial forward", _UP, "trial", FORWARD_COLOUR, "forward"))
# Every optimizer ends its update phase with it: apply the step, end the stage's iteration.
APPLY = register_kind(ActionKind("A", "apply update", Direction.LOCAL, "update", UPDATE_COLOUR,
                                 "update", after_backward=True))
# A backward split in two, as zero-bubble schedules run it (the simulator's; a run measures
# both halves with run.split_backward): the input's gradient, which the stage below waits
# for, and the weights' gradient, which can wait for idle time.
BACKWARD_INPUT = register_kind(ActionKind("D", "backward: input gradient", _DOWN, "backward",
                                          BACKWARD_COLOUR, "backward"))
BACKWARD_WEIGHT = register_kind(ActionKind("P", "backward: weight gradient", Direction.LOCAL,
                                           "backward", WEIGHT_COLOUR, "weight gradient"))


@dataclass(frozen=True)
class Action:
    """One thing one stage does: a kind and its index (microbatch, chunk, or step count)."""

    kind: ActionKind
    index: int | None = None  # microbatch / chunk of a travelling kind; a step count else
    step: int = 0  # which repetition of the same kind and index in one plan (a CG step's pass)
    chunk: int = 0  # which of the device's virtual stages (interleaved and V schedules)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ActionKind):  # a letter, as tests and grids write it
            object.__setattr__(self, "kind", kind_of(self.kind))

    def __str__(self) -> str:
        return self.kind.letter if self.index is None else f"{self.kind.letter}{self.index}"


Schedule = list[list[Action]]  # one ordered list per stage
