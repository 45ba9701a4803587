"""The schedule as data: each stage's ordered actions for a pass, validated, drawn as a grid."""

from __future__ import annotations

from dataclasses import dataclass

# Action kinds, each one StageWorker verb:
#   F j  forward_microbatch      B j  backward_microbatch     E k  evaluate (forward-only) chunk k
#   T j  trial forward (GD+Armijo, forward-only on the batch)
#   L    build_local_loss        I n  run_inner_steps(n)      W n  fill_inner_steps(up to n more)
#   A    apply_update (SM: θ ← θ + d; gd/sgd/adam: the optimizer's step)
#   CGBlock, one tangent pass per CG step (`step` numbers them):
#   J j  tangent_forward         H j  tangent_backward        C    cg_step
FORWARD_KINDS = ("F", "E", "T", "J")  # receive from the stage below, send to the stage above
BACKWARD_KINDS = ("B", "H")  # receive from the stage above, send to the stage below
KINDS = ("F", "B", "E", "T", "L", "I", "W", "A", "J", "H", "C")


class ScheduleError(ValueError):
    """A schedule that cannot run: a missing or repeated action, or one that would deadlock."""


@dataclass(frozen=True)
class Action:
    kind: str
    index: int | None = None  # microbatch / chunk for F, B, E, T, J, H; step count for I, W
    iteration: int = 0  # distinguishes repeated plans when several are drawn in one grid
    step: int = 0  # CGBlock: which CG step's tangent pass a J, H or C belongs to

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"unknown action kind {self.kind!r}; one of {', '.join(KINDS)}")

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}{self.index}"


Schedule = list[list[Action]]  # one ordered list per stage


@dataclass(frozen=True)
class UpdatePhase:
    """What a stage does after its last backward: nothing, an optimizer step, or SM's loop."""

    kind: str = "none"  # none | step | sm | cgblock
    steps: int = 0  # SM: inner steps every stage takes; CGBlock: CG steps (tangent passes)
    fill_up_to: int = 0  # SM with fill_bubbles: at most this many more, while no input waits


def update_actions(update: UpdatePhase, stage: int, num_microbatches: int) -> list[Action]:
    if update.kind == "none":
        return []
    if update.kind == "step":
        return [Action("A")]
    if update.kind == "cgblock":  # each CG step is a GPipe-shaped pass of tangents
        passes = [action for k in range(update.steps) for action in (
            [Action("J", j, step=k) for j in range(num_microbatches)]
            + [Action("H", j, step=k) for j in reversed(range(num_microbatches))]
            + [Action("C", step=k)])]
        return [Action("L"), *passes, Action("A")]
    actions = [Action("L"), Action("I", update.steps)]
    # Stage 0 gets its next input from the coordinator at once: it has no bubble to fill.
    if update.fill_up_to and stage > 0:
        actions.append(Action("W", update.fill_up_to))
    return actions + [Action("A")]


def gpipe_schedule(num_stages: int, num_microbatches: int, update: UpdatePhase = UpdatePhase(),
                   eval_chunks: int = 0) -> Schedule:
    """GPipe: all forwards (fill), all backwards in reverse order (drain), then the update phase,
    which every stage starts right after its own last backward, then forward-only evaluation."""
    forwards = [Action("F", j) for j in range(num_microbatches)]
    backwards = [Action("B", j) for j in reversed(range(num_microbatches))]
    evals = [Action("E", k) for k in range(eval_chunks)]
    return [forwards + backwards + update_actions(update, s, num_microbatches) + evals
            for s in range(num_stages)]


def forward_only_schedule(num_stages: int, chunks: int, kind: str = "T") -> Schedule:
    """Forward-only passes (GD+Armijo trials, evaluation)."""
    return [[Action(kind, k) for k in range(chunks)] for _ in range(num_stages)]


def repeat_schedule(schedule: Schedule, iterations: int) -> Schedule:
    """The same plan run `iterations` times back to back, as the engine pipelines them."""
    return [[Action(a.kind, a.index, t, a.step) for t in range(iterations) for a in actions]
            for actions in schedule]


def _dependencies(stage: int, action: Action, num_stages: int) -> list[tuple[int, Action]]:
    """Actions of other stages that must finish first: inputs come from below, gradients from
    above. Everything else is ordered by the stage's own list."""
    if action.kind in FORWARD_KINDS and stage > 0:
        return [(stage - 1, action)]
    if action.kind in BACKWARD_KINDS and stage < num_stages - 1:
        return [(stage + 1, action)]
    return []


def clock_cycles(schedule: Schedule, durations: dict[str, int] | None = None
                 ) -> list[list[tuple[int, int]]]:
    """Start and end slot of every action, with unit durations unless `durations` says
    otherwise (by kind, e.g. {"I": 3}). `W` (fill the bubble) lasts until the input of the
    stage's next action is there, and takes no slot when nothing follows it.

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
                deps = _dependencies(s, action, num_stages)
                if any(dep not in done for dep in deps):
                    break
                start = max([free[s]] + [done[dep] for dep in deps])
                end = start + durations.get(action.kind, 1)
                if action.kind == "W":
                    following = [a for a in schedule[s][pointer[s] + 1:]
                                 if a.kind in FORWARD_KINDS][:1]
                    waits_for = [d for a in following for d in _dependencies(s, a, num_stages)]
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
            if action.kind in FORWARD_KINDS + BACKWARD_KINDS and action in seen:
                raise ScheduleError(f"stage {s}: {action} appears twice")
            seen.add(action)
            if action.kind == "B" and Action("F", action.index) not in seen:
                raise ScheduleError(f"stage {s}: {action} comes before F{action.index}")
            if action.kind in ("J", "H") and not any(a.kind == "L" for a in seen):
                raise ScheduleError(f"stage {s}: tangent pass {action} before the local model "
                                    "is built (L)")
            if action.kind in ("L", "A") and any(a.kind == "B" for a in actions[position + 1:]):
                raise ScheduleError(f"stage {s}: {action} comes before its last backward")
        forwards = {a.index for a in actions if a.kind == "F"}
        backwards = {a.index for a in actions if a.kind == "B"}
        if forwards and forwards != set(range(num_microbatches)):
            raise ScheduleError(f"stage {s}: forwards {sorted(forwards)} but the batch has "
                                f"{num_microbatches} microbatches")
        if forwards != backwards and backwards:
            raise ScheduleError(f"stage {s}: backwards {sorted(backwards)} do not match "
                                f"forwards {sorted(forwards)}")
    if len({tuple(a for a in acts if a.kind == "F") for acts in schedule}) > 1:
        raise ScheduleError("stages disagree on the order of the forward microbatches")
    clock_cycles(schedule)


def render_grid(schedule: Schedule, durations: dict[str, int] | None = None,
                iterations: int = 1) -> str:
    """The schedule as a stage-by-time grid, one column per clock slot ('.' = idle); with
    iterations > 1 the plan is drawn that many times back to back, as the engine runs it."""
    schedule = repeat_schedule(schedule, iterations)
    times = clock_cycles(schedule, durations)
    width = max((end for stage in times for _, end in stage), default=0)
    cells = [["." for _ in range(width)] for _ in schedule]
    for s, actions in enumerate(schedule):
        for action, (start, end) in zip(actions, times[s]):
            for slot in range(start, end):
                cells[s][slot] = str(action)
    cell = max([len(c) for row in cells for c in row] + [2])
    header = "stage " + " ".join(f"{t:>{cell}}" for t in range(width))
    rows = [f"{s:>5} " + " ".join(f"{c:>{cell}}" for c in row) for s, row in enumerate(cells)]
    return "\n".join([header, *rows])
