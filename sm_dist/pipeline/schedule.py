"""The schedule as data: each stage's ordered actions for a pass, validated, drawn as a grid."""

from __future__ import annotations

from collections.abc import Callable

from sm_dist.pipeline.actions import (
    BACKWARD_KINDS,
    FORWARD_KINDS,
    INDEXED_KINDS,
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
)

K = ActionKind
# What a stage does after its last backward (an optimizer's update phase), by stage index.
UpdateActions = Callable[[int], list[Action]]


def gpipe_schedule(num_stages: int, num_microbatches: int, update: UpdateActions | None = None,
                   eval_chunks: int = 0) -> Schedule:
    """GPipe: all forwards (fill), all backwards in reverse order (drain), then the update phase,
    which every stage starts right after its own last backward, then forward-only evaluation."""
    forwards = [Action(K.FORWARD, j) for j in range(num_microbatches)]
    backwards = [Action(K.BACKWARD, j) for j in reversed(range(num_microbatches))]
    evals = [Action(K.EVALUATE, k) for k in range(eval_chunks)]
    return [forwards + backwards + (update(s) if update else []) + evals
            for s in range(num_stages)]


def forward_only_schedule(num_stages: int, chunks: int,
                          kind: ActionKind | str = K.TRIAL) -> Schedule:
    """Forward-only passes (GD+Armijo trials, evaluation)."""
    return [[Action(kind, k) for k in range(chunks)] for _ in range(num_stages)]


def repeat_schedule(schedule: Schedule, iterations: int) -> Schedule:
    """The same plan run `iterations` times back to back, as the engine pipelines them."""
    return [[Action(a.kind, a.index, t, a.step) for t in range(iterations) for a in actions]
            for actions in schedule]


def dependencies(stage: int, action: Action, num_stages: int) -> list[tuple[int, Action]]:
    """Actions of other stages that must finish first: inputs come from below, gradients from
    above. Everything else is ordered by the stage's own list."""
    if action.kind in FORWARD_KINDS and stage > 0:
        return [(stage - 1, action)]
    if action.kind in BACKWARD_KINDS and stage < num_stages - 1:
        return [(stage + 1, action)]
    return []


def next_input(actions: list[Action], position: int) -> Action | None:
    """The first action after `position` that waits for the stage below (what a fill awaits)."""
    return next((a for a in actions[position + 1:] if a.kind in FORWARD_KINDS), None)


def clock_cycles(schedule: Schedule, durations: dict[str, int] | None = None
                 ) -> list[list[tuple[int, int]]]:
    """Start and end slot of every action, with unit durations unless `durations` says
    otherwise (by kind letter, e.g. {"I": 3}). `W` (fill the bubble) lasts until the input of
    the stage's next action is there, and takes no slot when nothing follows it.

    Raises ScheduleError if the stages would wait on each other forever.
    """
    durations = durations or {}
    num_stages = len(schedule)
    done: dict[tuple[int, Action], int] = {}
    times: list[list[tuple[int, int]]] = [[] for _ in schedule]
    free = [0] * num_stages
    pointer = [0] * num_stages
    while any(pointer[s] < len(schedule[s]) for s in range(num_stages)):
        progressed = False
        for s in range(num_stages):
            while pointer[s] < len(schedule[s]):
                action = schedule[s][pointer[s]]
                deps = dependencies(s, action, num_stages)
                if any(dep not in done for dep in deps):
                    break
                start = max([free[s]] + [done[dep] for dep in deps])
                end = start + durations.get(action.kind.value, 1)
                if action.kind is K.FILL:
                    following = next_input(schedule[s], pointer[s])
                    waits_for = [] if following is None else dependencies(s, following,
                                                                          num_stages)
                    if any(dep not in done for dep in waits_for):
                        break  # the fill lasts until that input is known to arrive
                    end = max([start] + [done[dep] for dep in waits_for])
                times[s].append((start, end))
                done[(s, action)] = end
                free[s] = end
                pointer[s] += 1
                progressed = True
        if not progressed:
            stuck = ", ".join(f"stage {s} at {schedule[s][pointer[s]]}"
                              for s in range(num_stages) if pointer[s] < len(schedule[s]))
            raise ScheduleError(f"the schedule deadlocks: {stuck} wait for each other")
    return times


def validate_schedule(schedule: Schedule, num_microbatches: int) -> None:
    """Every stage forwards and backwards each microbatch once, backward after forward, the
    update after every backward; and the stages together cannot deadlock."""
    for s, actions in enumerate(schedule):
        seen: set[Action] = set()
        for position, action in enumerate(actions):
            if action.kind in INDEXED_KINDS and action in seen:
                raise ScheduleError(f"stage {s}: {action} appears twice")
            seen.add(action)
            if action.kind is K.BACKWARD and Action(K.FORWARD, action.index) not in seen:
                raise ScheduleError(f"stage {s}: {action} comes before F{action.index}")
            if (action.kind in (K.TANGENT_FORWARD, K.TANGENT_BACKWARD)
                    and not any(a.kind is K.BUILD for a in seen)):
                raise ScheduleError(f"stage {s}: tangent pass {action} before the local model "
                                    "is built (L)")
            if action.kind in (K.BUILD, K.APPLY) and any(
                    a.kind is K.BACKWARD for a in actions[position + 1:]):
                raise ScheduleError(f"stage {s}: {action} comes before its last backward")
        forwards = {a.index for a in actions if a.kind is K.FORWARD}
        backwards = {a.index for a in actions if a.kind is K.BACKWARD}
        if forwards and forwards != set(range(num_microbatches)):
            raise ScheduleError(f"stage {s}: forwards {sorted(forwards)} but the batch has "
                                f"{num_microbatches} microbatches")
        if forwards != backwards and backwards:
            raise ScheduleError(f"stage {s}: backwards {sorted(backwards)} do not match "
                                f"forwards {sorted(forwards)}")
    if len({tuple(a for a in acts if a.kind is K.FORWARD) for acts in schedule}) > 1:
        raise ScheduleError("stages disagree on the order of the forward microbatches")
    clock_cycles(schedule)


def render_grid(schedule: Schedule, durations: dict[str, int] | None = None,
                iterations: int = 1, width: int | None = None) -> str:
    """The schedule as a stage-by-time grid, one column per clock slot ('.' = idle; an action
    of several slots is named in its first, '--' in the rest); with iterations > 1 the plan
    is drawn that many times back to back, as the engine runs it. Given a `width` in
    characters, the slots are cut into blocks that fit it, one under the other."""
    schedule = repeat_schedule(schedule, iterations)
    times = clock_cycles(schedule, durations)
    slots = max((end for stage in times for _, end in stage), default=0)
    cells = [["." for _ in range(slots)] for _ in schedule]
    for s, actions in enumerate(schedule):
        for action, (start, end) in zip(actions, times[s]):
            for slot in range(start, end):
                cells[s][slot] = str(action) if slot == start else "--"
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
