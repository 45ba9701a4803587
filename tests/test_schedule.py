"""The schedule is data: exact action lists, clock cycles and grids, validation."""

from __future__ import annotations

import pytest

from sm_dist.optim.cgblock import cg_update_actions
from sm_dist.optim.sm import sm_update_actions
from sm_dist.pipeline.actions import Action, ScheduleError
from sm_dist.pipeline.schedule import (
    clock_cycles,
    forward_only_schedule,
    gpipe_schedule,
    render_grid,
    validate_schedule,
)


def sm_update(steps: int, fill_up_to: int = 0):
    return lambda stage: sm_update_actions(stage, steps, fill_up_to)


def cgblock_update(steps: int, microbatches: int):
    return lambda stage: cg_update_actions(steps, microbatches)


def step_update(stage: int) -> list[Action]:
    return [Action("A")]


def names(schedule: list[list[Action]]) -> list[list[str]]:
    return [[str(a) for a in actions] for actions in schedule]


def test_gpipe_with_sm_update_per_stage() -> None:
    schedule = gpipe_schedule(3, 2, sm_update(5, 7), eval_chunks=1)
    assert names(schedule) == [
        ["F0", "F1", "B1", "B0", "L", "I5", "A", "E0"],  # stage 0 has no bubble to fill
        ["F0", "F1", "B1", "B0", "L", "I5", "W7", "A", "E0"],
        ["F0", "F1", "B1", "B0", "L", "I5", "W7", "A", "E0"],
    ]


def test_gpipe_with_optimizer_step_and_without_update() -> None:
    assert names(gpipe_schedule(2, 3, step_update)) == [
        ["F0", "F1", "F2", "B2", "B1", "B0", "A"]] * 2
    assert names(gpipe_schedule(1, 1)) == [["F0", "B0"]]
    assert names(forward_only_schedule(2, 2, "T")) == [["T0", "T1"], ["T0", "T1"]]


def test_clock_cycles_of_gpipe_are_exact() -> None:
    """F(s, j) at slot s + j; the drain from the top: stage s starts B at 2(p−1−s) + M + s."""
    times = clock_cycles(gpipe_schedule(3, 4, step_update))
    assert [start for start, _ in times[0]] == [0, 1, 2, 3, 8, 9, 10, 11, 12]
    assert [start for start, _ in times[1]] == [1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert [start for start, _ in times[2]] == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert all(end == start + 1 for stage in times for start, end in stage)


def test_grid_gpipe_sgd() -> None:
    assert render_grid(gpipe_schedule(3, 2, step_update)).splitlines() == [
        "stage  0  1  2  3  4  5  6  7  8",
        "    0 F0 F1  .  .  .  . B1 B0  A",
        "    1  . F0 F1  .  . B1 B0  A  .",
        "    2  .  . F0 F1 B1 B0  A  .  .",
    ]


def test_grid_fill_bubbles_over_two_iterations() -> None:
    """W fills each stage's idle time until the next iteration's first microbatch arrives,
    less the apply that follows it: none on stage 0, about 2s - 1 slots on stage s (spec §5),
    and the next iteration starts when it would without fill (slot 11, as I1 then A would)."""
    grid = render_grid(gpipe_schedule(3, 2, sm_update(1, 9)), iterations=2)
    assert grid.splitlines() == [
        "stage  0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17 18 19 20 21",
        "    0 F0 F1  .  .  .  . B1 B0  L I1  A F0 F1  .  .  .  . B1 B0  L I1  A",
        "    1  . F0 F1  .  . B1 B0  L I1 W9 --  A F0 F1  .  . B1 B0  L I1  A  .",
        "    2  .  . F0 F1 B1 B0  L I1 W9 -- -- --  A F0 F1 B1 B0  L I1  A  .  .",
    ]
    # Cut to a width: blocks of the slots that fit, each with its own slot numbers.
    narrow = render_grid(gpipe_schedule(3, 2, sm_update(1, 9)), iterations=2, width=40)
    assert narrow.split("\n\n")[1].splitlines() == [
        "stage 11 12 13 14 15 16 17 18 19 20 21",
        "    0 F0 F1  .  .  .  . B1 B0  L I1  A",
        "    1  A F0 F1  .  . B1 B0  L I1  A  .",
        "    2 --  A F0 F1 B1 B0  L I1  A  .  .",
    ]
    assert all(len(line) <= 40 for line in narrow.splitlines())


def test_validation_accepts_gpipe_and_rejects_broken_schedules() -> None:
    validate_schedule(gpipe_schedule(4, 8, sm_update(3)), 8)
    with pytest.raises(ScheduleError, match="B0 comes before F0"):
        validate_schedule([[Action("B", 0), Action("F", 0)]], 1)
    with pytest.raises(ScheduleError, match="appears twice"):
        validate_schedule([[Action("F", 0), Action("F", 0), Action("B", 0)]], 1)
    with pytest.raises(ScheduleError, match="forwards"):
        validate_schedule([[Action("F", 0), Action("B", 0)]], 2)
    with pytest.raises(ScheduleError, match="before its last backward"):
        validate_schedule([[Action("F", 0), Action("A"), Action("B", 0)]], 1)
    deadlock = [[Action("F", 1), Action("F", 0), Action("B", 1), Action("B", 0)],
                [Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1)]]
    with pytest.raises(ScheduleError, match="disagree|deadlock"):
        validate_schedule(deadlock, 2)


def test_deadlock_is_detected_by_the_clock() -> None:
    # Stage 1 runs B0 before F1, but stage 2 needs F1 before it can send B0 down.
    crossed = [[Action("F", 0), Action("F", 1), Action("B", 1), Action("B", 0)],
               [Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)],
               [Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1)]]
    with pytest.raises(ScheduleError, match="stage 1 at B0, stage 2 at F1"):
        clock_cycles(crossed)


def test_unknown_action_kind() -> None:
    with pytest.raises(ScheduleError, match="unknown action kind"):
        Action("X")


def test_cgblock_update_is_one_tangent_pass_per_cg_step() -> None:
    """CGBlock: after the local model (L), each CG step is a GPipe-shaped pass of tangents
    (J up, H down) and a CG step (C) on every stage; the update (A) comes after the last."""
    schedule = gpipe_schedule(2, 2, cgblock_update(2, 2))
    assert names(schedule) == [["F0", "F1", "B1", "B0", "L", "J0", "J1", "H1", "H0", "C",
                                "J0", "J1", "H1", "H0", "C", "A"]] * 2
    assert [a.step for a in schedule[0] if a.kind.letter in "JHC"] == [0] * 5 + [1] * 5
    validate_schedule(schedule, 2)
    times = clock_cycles(gpipe_schedule(2, 2, cgblock_update(1, 2)))
    # Stage 1 waits for stage 0's J0 (tangents go up); stage 0 for stage 1's H1 (they come down).
    assert [start for start, _ in times[0]] == [0, 1, 4, 5, 6, 7, 8, 11, 12, 13, 14]
    assert [start for start, _ in times[1]] == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]


def test_a_tangent_pass_before_the_local_model_is_refused() -> None:
    bad = [[Action("F", 0), Action("B", 0), Action("J", 0), Action("L")]]
    with pytest.raises(ScheduleError, match="comes before the L it needs"):
        validate_schedule(bad, 1)
