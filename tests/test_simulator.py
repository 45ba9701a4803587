"""The pipeline simulator on synthetic costs: GPipe's idle fraction exactly, the clock-cycle
makespan with a free link, fill steps that end when the input arrives, links, steered passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sm_dist.optim.cgblock import cg_update_actions
from sm_dist.optim.sm import FILL, INNER, sm_update_actions
from sm_dist.pipeline.actions import APPLY, BACKWARD, FORWARD, TRIAL, Action
from sm_dist.pipeline.schedule import Pass, clock_cycles, gpipe_schedule, list_schedule
from sm_dist.pipeline.simulator import LINKS, Link, simulate
from sm_dist.pipeline.timeline import iteration_utilisation


def unit(seconds: float = 1.0, nbytes: float = 0.0, step: float | None = None):
    """Every action `seconds`, an inner step `step` (default: `seconds`) each."""
    per_step = seconds if step is None else step
    return lambda place, action: (per_step * (action.index or 0) if action.kind == INNER
                                  else per_step if action.kind == FILL else seconds, nbytes)


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_equal_costs_give_gpipes_idle_fraction(p: int, m: int) -> None:
    events = simulate([Pass(1, gpipe_schedule(p, m))], unit(), LINKS["none"])
    use = iteration_utilisation(events, 1, p)
    assert use is not None
    assert use.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert use.duration == 2 * (m + p - 1)


@pytest.mark.parametrize("name,schedule,passes", [
    ("gpipe", gpipe_schedule(4, 3, lambda s: [Action(APPLY)]), 1),
    ("sm fill", gpipe_schedule(3, 2, lambda s: sm_update_actions(s, 1, 99)), 2),
    ("cgblock", gpipe_schedule(3, 2, lambda s: cg_update_actions(2, 2)), 1),
])
def test_a_free_link_gives_the_unit_schedule_times_the_cost(name: str, schedule,
                                                            passes: int) -> None:
    """The list scheduler's unit slots, scaled by a cost of 0.25 s per action (and step)."""
    sent = [Pass(t, schedule) for t in range(passes)]
    slots = [[(slot.start, slot.end) for slot in lane] for lane in list_schedule(sent)]
    events = simulate(sent, unit(0.25), LINKS["none"])
    by_stage = [[(e.start, e.end) for e in events if e.stage == s] for s in range(len(slots))]
    assert by_stage == [[(0.25 * a, 0.25 * b) for a, b in stage] for stage in slots]
    if passes == 1:
        assert slots == [[(float(a), float(b)) for a, b in lane]
                         for lane in clock_cycles(schedule)]


def test_fill_steps_take_the_bubble_and_no_more() -> None:
    """Two iterations of SM with fill on 3 stages: stage s fills with the whole inner steps
    that end, with its apply after them, before the next iteration's first microbatch reaches
    it, never past its limit: the fill delays nothing."""
    passes = [Pass(t, gpipe_schedule(3, 2, lambda s: sm_update_actions(s, 1, 50)))
              for t in (1, 2)]
    events = simulate(passes, unit(1.0, step=0.4), LINKS["none"])
    fills = {e.stage: e for e in events if e.kind == FILL and e.iteration == 1}
    forward0 = {e.stage: e for e in events
                if e.kind == FORWARD and e.iteration == 2 and e.index == 0}
    for s, fill in fills.items():
        gap = forward0[s - 1].end - fill.start  # when the input arrives
        steps = int(fill.detail.split()[0])
        assert steps * 0.4 <= gap - 1.0 + 1e-9 < (steps + 1) * 0.4
        # then its update (A, 1 s), done by the time the next forward's input arrives
        assert fill.end + 1.0 <= forward0[s - 1].end + 1e-9
        assert forward0[s].start == pytest.approx(forward0[s - 1].end)
    limited = simulate(passes[:1] + [Pass(2, passes[1].schedule)],
                       unit(1.0, step=1e-3), LINKS["none"])
    assert max(int(e.detail.split()[0]) for e in limited if e.kind == FILL) == 50


def test_a_link_delays_every_transfer_by_latency_and_bytes() -> None:
    link = Link(bandwidth=1e3, latency=0.5)  # 1 kB/s: 100 bytes take 0.1 s
    events = simulate([Pass(1, gpipe_schedule(2, 1))], unit(1.0, 100.0), link)
    timeline = {(e.stage, e.kind): (e.start, e.end) for e in events}
    assert timeline[(1, FORWARD)] == (1.6, 2.6)
    assert timeline[(1, BACKWARD)] == (2.6, 3.6)
    assert timeline[(0, BACKWARD)] == (4.2, 5.2)


def test_a_steered_pass_waits_for_everything_before_it() -> None:
    first = Pass(1, gpipe_schedule(2, 2))
    trial = Pass(1, [[Action(TRIAL, 0)], [Action(TRIAL, 0)]], waits=True)
    events = simulate([first, trial], unit(1.0), LINKS["none"])
    end_of_first = max(e.end for e in events if e.kind != TRIAL)
    assert min(e.start for e in events if e.kind == TRIAL) == end_of_first


# ------------------------------------------------------------------- sm-dist simulate
def test_simulate_a_single_process_run_and_an_engine_run(tmp_path: Path) -> None:
    """Both kinds of run directory can be replayed; the JSON has the figures the docs name.
    The engine run is a real launch; the other commands run in this process (run_here)."""
    import json

    from tests.conftest import run_cli, run_here, synthetic_job, write_job

    job = synthetic_job(optimizer={"name": "sm", "inner_steps": {"min": 2, "max": 20}},
                        run={"iterations": 4, "eval_every": 2})
    path = write_job(tmp_path / "job.yaml", job)
    for runner, how, out in ((run_here, ["--single-process"], "single"),
                             (run_cli, ["--no-live"], "multi")):
        result = runner("train", str(path), *how, "--out", out, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "single" / "actions.json").is_file()
    for out in ("single", "multi"):
        result = run_here("simulate", out, "--json", "--link", "10gbe", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        figures = json.loads(result.stdout)
        assert figures["iteration_time"] > 0 and 0 <= figures["bubble_fraction"] < 1
        assert len(figures["busy_fraction"]) == 3 and figures["link"] == "10gbe"
        assert figures["costs_from"] == ("actions.json" if out == "single" else "trace.json")
    printed = run_here("simulate", "single", "--microbatches", "4", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert "iteration time" in printed.stdout and "bubble" in printed.stdout
    assert (tmp_path / "single" / "simulated-timeline.png").is_file()
    bad = run_here("simulate", "single", "--link", "fast", cwd=tmp_path)
    assert bad.returncode == 2 and "--link 'fast'" in bad.stderr
