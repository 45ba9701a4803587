"""The schedule as data: GPipe's passes, their validation, the one list scheduler that times
them (the printed grid, the single-process pipeline's order and the simulator all use it) and
the grid it draws."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sm_dist.pipeline.actions import (
    BACKWARD,
    EVALUATE,
    FORWARD,
    TRIAL,
    Action,
    ActionKind,
    Direction,
    Schedule,
    ScheduleError,
)

# What a stage does after its last backward (an optimizer's update phase), by stage index.
UpdateActions = Callable[[int], list[Action]]


def gpipe_schedule(num_stages: int, num_microbatches: int, update: UpdateActions | None = None,
                   eval_chunks: int = 0, prepare: UpdateActions | None = None) -> Schedule:
    """GPipe: all forwards (fill), then `prepare`'s actions of the stage (work it does while its
    microbatches go up and come back), all backwards in reverse order (drain), then the update
    phase, which every stage starts right after its own last backward, then forward-only
    evaluation."""
    forwards = [Action(FORWARD, j) for j in range(num_microbatches)]
    backwards = [Action(BACKWARD, j) for j in reversed(range(num_microbatches))]
    evals = [Action(EVALUATE, k) for k in range(eval_chunks)]
    return [forwards + (prepare(s) if prepare else []) + backwards
            + (update(s) if update else []) + evals for s in range(num_stages)]


def forward_only_schedule(num_stages: int, chunks: int, kind: ActionKind = TRIAL) -> Schedule:
    """Forward-only passes (GD+Armijo trials, evaluation)."""
    return [[Action(kind, k) for k in range(chunks)] for _ in range(num_stages)]


@dataclass(frozen=True)
class Pass:
    """One pass the coordinator sends: every stage's actions, and whether it waited for every
    pass sent before it to end (a pass the coordinator steers waits; others overlap).

    `placement` (interleaved and V schedules, simulated): the device of each virtual stage of
    the model in order; a device's `chunk` c is the c-th virtual stage placed on it. None:
    one stage per device, device s holds stage s."""

    iteration: int
    schedule: Schedule
    waits: bool = False
    placement: tuple[int, ...] | None = None


def dependencies(stage: int, action: Action, num_stages: int,
                 placement: tuple[int, ...] | None = None) -> list[tuple[int, Action]]:
    """Actions of other stages that must finish first: inputs come from below, gradients from
    above (the neighbouring virtual stage's device under a `placement`). Everything else is
    ordered by the stage's own list."""
    if placement is not None:
        return _virtual_dependencies(stage, action, placement)
    if action.kind.direction is Direction.UP and stage > 0:
        return [(stage - 1, action)]
    if action.kind.direction is Direction.DOWN and stage < num_stages - 1:
        return [(stage + 1, action)]
    return []


def _virtual_dependencies(device: int, action: Action,
                          placement: tuple[int, ...]) -> list[tuple[int, Action]]:
    mine = [v for v, d in enumerate(placement) if d == device]
    virtual = mine[action.chunk]
    neighbour = {Direction.UP: virtual - 1, Direction.DOWN: virtual + 1}.get(
        action.kind.direction)
    if neighbour is None or not 0 <= neighbour < len(placement):
        return []
    other = placement[neighbour]
    chunk = [v for v, d in enumerate(placement) if d == other].index(neighbour)
    return [(other, Action(action.kind, action.index, action.step, chunk))]


def next_input(actions: Sequence[Action], position: int) -> Action | None:
    """The first action after `position` that waits for the stage below (what a fill awaits)."""
    return next((a for a in actions[position + 1:] if a.kind.direction is Direction.UP), None)


# Where an action runs: (stage, the pass it belongs to, counted from 0).
Place = tuple[int, int]


@dataclass(frozen=True)
class Timing:
    """How long actions take: `duration(place, action)`; `transfer(place, action)`, the delay
    from an action's end to its output's arrival at the neighbour; `fill(place, action, start,
    input_at)`, how long a kind that fills the idle time lasts when the input it waits for
    arrives at `input_at` (None: nothing follows it), by default until that input."""

    duration: Callable[[Place, Action], float]
    transfer: Callable[[Place, Action], float] = lambda place, action: 0.0
    fill: Callable[[Place, Action, float, float | None], float] | None = None

    def fill_time(self, place: Place, action: Action, start: float,
                  input_at: float | None) -> float:
        if self.fill is not None:
            return self.fill(place, action, start, input_at)
        return 0.0 if input_at is None else max(input_at - start, 0.0)


UNIT = Timing(lambda place, action: 1.0)


@dataclass(frozen=True)
class Slot:
    """When one action of one pass runs on its stage."""

    number: int  # the pass, counted from 0
    action: Action
    start: float
    end: float


# Where an action sits in its pass: (stage, pass, position in the stage's list).
Position = tuple[int, int, int]


def list_schedule(passes: Sequence[Pass], timing: Timing = UNIT,
                  ready: Callable[[Position], bool] | None = None,
                  perform: Callable[[Position], None] | None = None) -> list[list[Slot]]:
    """Every stage's actions, pass after pass in its own order, each as early as its stage is
    free, its input has arrived and (a pass that waits) every earlier pass has ended: each
    stage's slots in order. Stage by stage, each as far as it can go, then around again.

    To run the passes rather than time them (one process), `perform` is called for each action
    as it is scheduled, and `ready` says whether its input is really there (an optimizer may
    hold back what the schedule would already allow, e.g. gradients until the last backward).
    Raises ScheduleError if the stages would wait on each other forever."""
    num_stages = max((len(p.schedule) for p in passes), default=0)
    lanes = [[(n, i, a) for n, p in enumerate(passes) for i, a in enumerate(p.schedule[s])]
             for s in range(num_stages)]
    state = _ListState(passes, lanes, timing, ready, perform)
    while any(state.pointer[s] < len(lanes[s]) for s in range(num_stages)):
        if not any([state.advance(s) for s in range(num_stages)]):
            stuck = ", ".join(f"stage {s} at {lanes[s][state.pointer[s]][2]}"
                              for s in range(num_stages) if state.pointer[s] < len(lanes[s]))
            raise ScheduleError(f"the schedule deadlocks: {stuck} wait for each other")
    return state.slots


class _ListState:
    """The list scheduler's progress: what has ended when, where each stage is."""

    def __init__(self, passes: Sequence[Pass], lanes: list[list[tuple[int, int, Action]]],
                 timing: Timing, ready: Callable[[Position], bool] | None,
                 perform: Callable[[Position], None] | None) -> None:
        self.passes, self.lanes, self.timing = passes, lanes, timing
        self.ready, self.perform = ready, perform
        self.num_stages = len(lanes)
        self.arrives: dict[tuple[int, int, Action], float] = {}  # (pass, stage, action)
        self.pass_end = [0.0] * len(passes)
        self.remaining = [sum(len(a) for a in p.schedule) for p in passes]
        self.free, self.pointer = [0.0] * self.num_stages, [0] * self.num_stages
        self.slots: list[list[Slot]] = [[] for _ in lanes]

    def input_at(self, number: int, s: int, action: Action) -> float | None:
        """When `action`'s input from a neighbour is there (0 if it needs none); None: not
        known yet."""
        times = []
        placement = self.passes[number].placement
        for other, dep in dependencies(s, action, self.num_stages, placement):
            if (number, other, dep) not in self.arrives:
                return None
            times.append(self.arrives[(number, other, dep)])
        return max(times, default=0.0)

    def fill_input(self, s: int) -> tuple[bool, float | None]:
        """(known, when) a fill at the stage's pointer must end: when the next input action in
        the stage's lane (in this pass or a later one) gets its input, less the actions
        between (the fill leaves them room, as the engine's FillBudget does); None if no input
        action follows."""
        between = 0.0
        for number, _, action in self.lanes[s][self.pointer[s] + 1:]:
            if action.kind.direction is Direction.UP:
                at = self.input_at(number, s, action)
                return at is not None, None if at is None else at - between
            between += self.timing.duration((s, number), action)
        return True, None

    def advance(self, s: int) -> bool:
        """Schedule as many of stage s's next actions as can be timed now; whether any was."""
        progressed = False
        lane = self.lanes[s]
        while self.pointer[s] < len(lane):
            number, position, action = lane[self.pointer[s]]
            first = self.pointer[s] == 0 or lane[self.pointer[s] - 1][0] != number
            barrier = 0.0
            if first and self.passes[number].waits and number > 0:
                if any(self.remaining[k] for k in range(number)):
                    break  # the coordinator waits for the passes before this one
                barrier = max(self.pass_end[:number])
            arrives = self.input_at(number, s, action)
            if arrives is None or (self.ready is not None
                                   and not self.ready((s, number, position))):
                break
            if self.perform is not None:
                self.perform((s, number, position))
            start = max(self.free[s], arrives, barrier)
            place = (s, number)
            if action.kind.fills_idle:
                known, until = self.fill_input(s)
                if not known:
                    break  # the fill lasts until that input is known to arrive
                end = start + self.timing.fill_time(place, action, start, until)
            else:
                end = start + self.timing.duration(place, action)
            self.arrives[(number, s, action)] = end + self.timing.transfer(place, action)
            self.slots[s].append(Slot(number, action, start, end))
            self.free[s] = end
            self.pass_end[number] = max(self.pass_end[number], end)
            self.remaining[number] -= 1
            self.pointer[s] += 1
            progressed = True
        return progressed


def clock_cycles(schedule: Schedule, durations: dict[str, int] | None = None
                 ) -> list[list[tuple[int, int]]]:
    """Start and end slot of every action of one pass, with unit durations unless `durations`
    says otherwise (by kind letter, e.g. {"I": 3}). A kind that fills the idle time lasts
    until the input of the stage's next input action is there, less the actions between, and
    takes no slot when nothing follows it. Raises ScheduleError if the stages would wait on
    each other forever."""
    timing = _unit_timing(durations)
    return [[(int(slot.start), int(slot.end)) for slot in lane]
            for lane in list_schedule([Pass(0, schedule)], timing)]


def _unit_timing(durations: dict[str, int] | None) -> Timing:
    given = durations or {}
    return Timing(lambda place, action: float(given.get(action.kind.letter, 1)))


def validate_schedule(schedule: Schedule, num_microbatches: int) -> None:
    """Every stage forwards and backwards each microbatch once, backward after forward, the
    update after every backward, each kind after the kind it needs; and the stages together
    cannot deadlock."""
    for s, actions in enumerate(schedule):
        _validate_stage(s, actions, num_microbatches)
    forward_orders = {tuple(a for a in acts if a.kind == FORWARD) for acts in schedule}
    if len(forward_orders) > 1:
        raise ScheduleError("stages disagree on the order of the forward microbatches")
    list_schedule([Pass(0, schedule)])


def _validate_stage(s: int, actions: list[Action], num_microbatches: int) -> None:
    seen: set[Action] = set()
    letters: set[str] = set()
    for position, action in enumerate(actions):
        if action.kind.travels and action in seen:
            raise ScheduleError(f"stage {s}: {action} appears twice")
        seen.add(action)
        letters.add(action.kind.letter)
        if action.kind == BACKWARD and Action(FORWARD, action.index) not in seen:
            raise ScheduleError(f"stage {s}: {action} comes before F{action.index}")
        needs = action.kind.needs_before
        if needs is not None and needs not in letters:
            raise ScheduleError(f"stage {s}: {action} ({action.kind.name}) comes before "
                                f"the {needs} it needs")
        if action.kind.after_backward and any(a.kind == BACKWARD
                                              for a in actions[position + 1:]):
            raise ScheduleError(f"stage {s}: {action} comes before its last backward")
    forwards = {a.index for a in actions if a.kind == FORWARD}
    backwards = {a.index for a in actions if a.kind == BACKWARD}
    if forwards and forwards != set(range(num_microbatches)):
        raise ScheduleError(f"stage {s}: forwards {sorted(forwards)} but the batch has "
                            f"{num_microbatches} microbatches")
    if forwards != backwards and backwards:
        raise ScheduleError(f"stage {s}: backwards {sorted(backwards)} do not match "
                            f"forwards {sorted(forwards)}")


def render_grid(schedule: Schedule, durations: dict[str, int] | None = None,
                iterations: int = 1, width: int | None = None) -> str:
    """The schedule as a stage-by-time grid, one column per clock slot ('.' = idle; an action
    of several slots is named in its first, '--' in the rest); with iterations > 1 the pass
    is drawn that many times back to back, as the engine runs it. Given a `width` in
    characters, the slots are cut into blocks that fit it, one under the other."""
    passes = [Pass(t, schedule) for t in range(iterations)]
    lanes = list_schedule(passes, _unit_timing(durations))
    slots = max((int(slot.end) for lane in lanes for slot in lane), default=0)
    cells = [["." for _ in range(slots)] for _ in lanes]
    for s, lane in enumerate(lanes):
        for slot in lane:
            for t in range(int(slot.start), int(slot.end)):
                cells[s][t] = str(slot.action) if t == int(slot.start) else "--"
    cell = max([len(c) for row in cells for c in row] + [2, len(str(slots - 1))])
    fits = slots if width is None else max(1, (width - 6) // (cell + 1))
    per_block = -(-slots // -(-slots // fits)) if slots else 1  # blocks of equal size
    blocks = []
    for first in range(0, slots, per_block) if slots else [0]:
        columns = range(first, min(slots, first + per_block))
        header = "stage " + " ".join(f"{t:>{cell}}" for t in columns)
        rows = [f"{s:>5} " + " ".join(f"{row[t]:>{cell}}" for t in columns)
                for s, row in enumerate(cells)]
        blocks.append("\n".join([header, *rows]))
    return "\n\n".join(blocks)

