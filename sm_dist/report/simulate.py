"""`sm-dist simulate`: the passes a run dispatched (plans.jsonl) replayed on one device per
stage, each action at the cost the run measured for it (`actions.json` of a single-process
run, or an engine run's `trace.json`), each transfer over a link model."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm_dist.config.job import job_from_dict
from sm_dist.optim import registry
from sm_dist.pipeline.actions import (
    BACKWARD,
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    EVALUATE,
    FORWARD,
    Action,
    Schedule,
)
from sm_dist.pipeline.plan_log import PLAN_LOG, read_plan_log
from sm_dist.pipeline.schedule import Pass
from sm_dist.pipeline.simulator import LINKS, CostModel, Link, simulate
from sm_dist.pipeline.timeline import (
    TimelineEvent,
    events_from_trace,
    iteration_utilisation,
    read_trace,
)
from sm_dist.pipeline.torch_orders import (
    SCHEDULES,
    TorchScheduleError,
    placement,
    rescheduled,
    trains,
)
from sm_dist.report.run_data import ReportError, RunData


class SimulateError(ReportError):
    """A run that cannot be simulated (no measured costs), or a bad link or range."""


def parse_link(text: str) -> tuple[str, Link]:
    """A preset name (nvlink, pcie4, pcie5, 100gbe, 10gbe, none) or BANDWIDTH,LATENCY in
    bytes per second and seconds (e.g. 12.5e9,1e-5)."""
    if text in LINKS:
        return text, LINKS[text]
    parts = text.split(",")
    try:
        bandwidth, latency = (float(p) for p in parts)
    except ValueError:
        raise SimulateError(f"--link {text!r}: give a preset ({', '.join(LINKS)}) or "
                            "BANDWIDTH,LATENCY in bytes/s and s, e.g. 12.5e9,1e-5") from None
    if bandwidth <= 0 or latency < 0:
        raise SimulateError(f"--link {text!r}: the bandwidth must be > 0, the latency >= 0")
    return f"{bandwidth:g} B/s, {latency:g} s", Link(bandwidth, latency)


@dataclass
class MeasuredCosts:
    """Median seconds and bytes per unit of every (stage, kind letter): per microbatch or
    chunk for the travelling kinds, per step for the kinds that count steps, per action for the
    others; actions that did nothing ("skipped") are left out of the medians."""

    seconds: dict[tuple[int, str], float]
    nbytes: dict[tuple[int, str], float]
    source: str  # the file they came from

    @property
    def split_backward(self) -> bool:
        """Whether the run timed its backwards in halves (run.split_backward)."""
        return any(letter == "D" for _, letter in self.seconds)

    def unit(self, stage: int, action: Action) -> tuple[float, float]:
        """(seconds, bytes) of one unit of `action`'s kind on `stage` (a fill's step: a step
        of the kind it fills with)."""
        key = (stage, action.kind.step_cost_of or action.kind.letter)
        return self.seconds.get(key, 0.0), self.nbytes.get(key, 0.0)


def _units(event: TimelineEvent) -> int:
    """How many units an event's cost covers (0: it did nothing)."""
    if event.detail == "skipped":
        return 0
    if event.kind.counts_steps:
        return int(event.detail.split()[0]) if event.detail else 0
    return 1


def read_events(run: RunData) -> tuple[list[TimelineEvent], str]:
    """The run's measured actions: actions.json (single process: one action at a time) or else
    trace.json (the engine: measured while the stages shared the machine)."""
    for name in ("actions.json", "trace.json"):
        path = run.path / name
        if path.is_file():
            return events_from_trace(read_trace(path)), name
    raise SimulateError(f"{run.path} has neither actions.json nor trace.json: no measured "
                        "action costs to simulate from")


def measured_costs(events: list[TimelineEvent], source: str,
                   iterations: range | None = None) -> MeasuredCosts:
    """The medians of the events' costs per unit, per stage and kind; a backward timed in
    halves (run.split_backward) also gives the input-gradient (D) and weight-gradient (P)
    halves that zero-bubble schedules run apart."""
    per_second: dict[tuple[int, str], list[float]] = defaultdict(list)
    per_byte: dict[tuple[int, str], list[float]] = defaultdict(list)
    for e in events:
        units = _units(e)
        if units == 0 or (iterations is not None and e.iteration not in iterations):
            continue
        key = (e.stage, e.kind.step_cost_of or e.kind.letter)
        per_second[key].append((e.end - e.start) / units)
        per_byte[key].append(e.sent / units)
        if e.kind == BACKWARD and e.detail.startswith("split "):
            halves = [float(x) for x in e.detail.split()[1:3]]
            for letter, seconds, sent in zip("DP", halves, (e.sent, 0), strict=True):
                per_second[(e.stage, letter)].append(seconds)
                per_byte[(e.stage, letter)].append(sent)
    if not per_second:
        raise SimulateError(f"{source}: no measured actions in the chosen iterations")
    seconds = {k: statistics.median(v) for k, v in per_second.items()}
    for (stage, letter), whole in list(seconds.items()):
        # The halves are timed around the two traversals only; the whole backward also
        # holds its receive and send: scaled to it, a schedule reorders the same work.
        if letter == "B" and (stage, "D") in seconds:
            halves = seconds[(stage, "D")] + seconds[(stage, "P")]
            if halves > 0:
                for half in "DP":
                    seconds[(stage, half)] *= whole / halves
    return MeasuredCosts(seconds, {k: statistics.median(v) for k, v in per_byte.items()},
                         source)


@dataclass
class Replay:
    """The run's dispatched passes as they ran: a step-counting action's index is the steps
    it took; `skipped` holds (pass, stage, action) of the actions that did nothing."""

    passes: list[Pass]
    skipped: set[tuple[int, int, Action]]


def dispatched(run: RunData, events: list[TimelineEvent], iterations: range | None = None,
               schedule: str | None = None, microbatches: int | None = None) -> Replay:
    """plans.jsonl's passes (those of `iterations`), each action as its event says it ran;
    with `microbatches`, each batch cut into that many instead; with a `schedule`, each
    training pass in that schedule's order (torch_orders.py)."""
    path = run.path / PLAN_LOG
    if not path.is_file():
        raise SimulateError(f"{run.path} has no {PLAN_LOG} (the passes its coordinator sent); "
                            "train the run again with this version to simulate it")
    ran: dict[tuple[int, int], list[TimelineEvent]] = defaultdict(list)
    for e in events:
        if e.replica == 0:
            ran[(e.plan, e.stage)].append(e)
    passes: list[Pass] = []
    skipped: set[tuple[int, int, Action]] = set()
    for plan_id, sent in read_plan_log(path):
        if iterations is not None and sent.iteration not in iterations:
            continue
        number, lanes = len(passes), []
        for s, actions in enumerate(sent.schedule):
            done = ran.get((plan_id, s), [])
            lane = []
            for position, action in enumerate(actions):
                event = done[position] if position < len(done) else None
                action = _as_ran(action, event)
                if event is not None and event.detail == "skipped":
                    skipped.add((number, s, action))
                lane.append(action)
            lanes.append(lane)
        if microbatches is not None:
            lanes = resplit(lanes, microbatches)
        if schedule is None or not trains(lanes):
            passes.append(Pass(sent.iteration, lanes, sent.waits))
            continue
        ordered, evals = rescheduled(lanes, schedule)
        where = placement(schedule, len(lanes)) if SCHEDULES[schedule].chunks > 1 else None
        passes.append(Pass(sent.iteration, ordered, sent.waits, where))
        if any(evals):
            passes.append(Pass(sent.iteration, evals))
    if not passes:
        raise SimulateError(f"{run.path}: no dispatched passes in the chosen iterations")
    return Replay(passes, skipped)


def _as_ran(action: Action, event: TimelineEvent | None) -> Action:
    """A step-counting action with the steps it took (a fill keeps its limit: the simulation
    decides how long it fills; a skipped one takes none)."""
    if event is None or not action.kind.counts_steps:
        return action
    if event.detail == "skipped":
        return Action(action.kind, 0, action.step)
    if action.kind.fills_idle:
        return action
    return Action(action.kind, _units(event), action.step)


def resplit(schedule: Schedule, microbatches: int) -> Schedule:
    """The same passes with each batch cut into `microbatches` instead: every run of one
    travelling kind over the batch's microbatches (F0..F3, B3..B0) becomes one over the new
    count, in the same direction; evaluation chunks stay."""
    out = []
    for actions in schedule:
        lane: list[Action] = []
        for action in actions:
            if not action.kind.travels or action.kind == EVALUATE:
                lane.append(action)
            elif not lane or lane[-1].kind != action.kind or lane[-1].step != action.step:
                descending = action.index not in (0, None)
                order = range(microbatches - 1, -1, -1) if descending else range(microbatches)
                lane.extend(Action(action.kind, j, action.step) for j in order)
        out.append(lane)
    return out


def replay_cost(costs: MeasuredCosts, replay: Replay, scale: float,
                chunks: int = 1) -> CostModel:
    """Each action's cost: its kind's measured unit times its units (`scale` multiplies the
    per-microbatch costs, for another split; a schedule of `chunks` virtual stages per device
    gives each a 1/chunks share of its device's forward and backward); an action that did
    nothing costs nothing."""
    def cost(place: tuple[int, int], action: Action) -> tuple[float, float]:
        stage, number = place
        if (number, stage, action) in replay.skipped:
            return 0.0, 0.0
        seconds, nbytes = costs.unit(stage, action)
        if action.kind in (FORWARD, BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT):
            return seconds * scale / chunks, nbytes * scale
        if action.kind.travels and action.kind != EVALUATE:
            return seconds * scale, nbytes * scale
        if action.kind.counts_steps and not action.kind.fills_idle:
            return seconds * (action.index or 0), 0.0
        return seconds, nbytes
    return cost


@dataclass
class Simulation:
    """A run simulated: its timeline, each iteration's utilisation and its end time."""

    events: list[TimelineEvent]
    iterations: list[int]
    link_name: str
    link: Link
    microbatches: int
    costs: MeasuredCosts
    schedule: str = "gpipe"

    def utilisation(self) -> dict[str, Any]:
        """Means over the steady iterations (not the first, which has no iteration before it
        to overlap with, nor the last, which has none after it)."""
        p = 1 + max(e.stage for e in self.events)
        steady = self.iterations[1:-1] if len(self.iterations) > 2 else self.iterations
        uses = [u for t in steady if (u := iteration_utilisation(self.events, t, p))]

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        def columns(name: str) -> list[float | None]:
            rows = [getattr(u, name) for u in uses]
            return [None if any(v is None for v in col) else mean(list(col))  # type: ignore
                    for col in zip(*rows)]

        return {"iteration_time": mean([u.duration for u in uses]),
                "bubble_fraction": mean([u.bubble_fraction for u in uses]),
                "busy_fraction": columns("busy_fraction"),
                "turnaround_idle": columns("turnaround_idle"),
                "update_idle": columns("update_idle"),
                "iterations": [steady[0], steady[-1]]}

    def end_times(self) -> dict[int, float]:
        """Seconds from the start of the simulated run to the end of each iteration (when the
        next one starts, or its own last action)."""
        starts = {t: min(e.start for e in self.events if e.iteration == t)
                  for t in self.iterations}
        ends = {}
        for t, following in zip(self.iterations, self.iterations[1:]):
            ends[t] = starts[following]
        last = self.iterations[-1]
        ends[last] = max(e.end for e in self.events if e.iteration == last)
        origin = starts[self.iterations[0]]
        return {t: end - origin for t, end in ends.items()}


def simulate_run(run: RunData, link: str = "none", microbatches: int | None = None,
                 iterations: range | None = None, schedule: str = "gpipe") -> Simulation:
    """Replay the passes `run` dispatched on one device per stage over `link`, each action
    at its measured cost; with `microbatches` per batch instead of the run's (the
    per-microbatch costs scaled by the run's count over the new one); on `schedule` (the
    engine's own is GPipe), if the run's optimizer may run on it."""
    job = job_from_dict(run.config, source=f"{run.path / 'config.yaml'}")
    link_name, model = parse_link(link)
    check_schedule(job.optimizer.name, schedule)
    events, source = read_events(run)
    costs = measured_costs(events, source, iterations)
    if schedule in ("zb", "zbv") and not costs.split_backward:
        raise SimulateError(f"--schedule {schedule} runs each backward as two halves, which "
                            f"{run.path} did not measure; train it with "
                            "--set run.split_backward=true")
    used = job.data.microbatches
    count = microbatches or used
    try:
        replay = dispatched(run, events, iterations, None if schedule == "gpipe" else schedule,
                            None if count == used else count)
    except TorchScheduleError as err:
        raise SimulateError(str(err)) from None
    chunks = SCHEDULES[schedule].chunks
    timeline = simulate(replay.passes, replay_cost(costs, replay, used / count, chunks), model)
    numbers = sorted({p.iteration for p in replay.passes})
    return Simulation(timeline, numbers, link_name, model, count, costs, schedule)


def check_schedule(optimizer: str, schedule: str) -> None:
    """A schedule the run's optimizer may run on, else a SimulateError saying which it may."""
    if schedule not in SCHEDULES:
        raise SimulateError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    allowed = registry.get(optimizer).schedules()
    if schedule not in allowed:
        raise SimulateError(
            f"--schedule {schedule}: {optimizer} runs on {' and '.join(allowed)} only (its "
            "update needs each stage's whole backward, unsplit, before it: a zero-bubble or "
            "interleaved schedule moves or splits it); choose one of those")


def simulation_json(sim: Simulation) -> str:
    bandwidth = sim.link.bandwidth if math.isfinite(sim.link.bandwidth) else None
    return json.dumps({**sim.utilisation(), "link": sim.link_name, "schedule": sim.schedule,
                       "bandwidth": bandwidth, "latency": sim.link.latency,
                       "microbatches": sim.microbatches, "costs_from": sim.costs.source})


def parse_range(text: str) -> range:
    """a:b (inclusive) → range(a, b + 1)."""
    first, _, last = text.partition(":")
    try:
        return range(int(first), int(last) + 1)
    except ValueError:
        raise SimulateError(f"--iterations {text!r}: write FIRST:LAST, e.g. 2:50") from None



def simulate_main(run_dir: str, link: str, microbatches: int | None, iterations: str | None,
                  as_json: bool, out: str | None, schedule: str = "gpipe") -> None:
    """`sm-dist simulate`: print the simulated pipeline's figures and draw its timeline."""
    from sm_dist.report.plots import default_timeline_iteration, plot_timeline
    from sm_dist.report.run_data import load_run

    run = load_run(run_dir)
    window = parse_range(iterations) if iterations else None
    sim = simulate_run(run, link, microbatches, window, schedule)
    if as_json:
        print(simulation_json(sim))
        return
    use = sim.utilisation()
    stages = len(use["busy_fraction"])
    first, last = use["iterations"]
    print(f"{run.name}: simulated on {stages} devices, {SCHEDULES[schedule].what}, link "
          f"{sim.link_name}, {sim.microbatches} microbatches, from the costs in "
          f"{sim.costs.source}")
    if SCHEDULES[schedule].chunks > 1:
        print(f"each device's stage split into {SCHEDULES[schedule].chunks} virtual stages of "
              "equal cost (an assumption: the run measured whole stages)")
    print(f"iteration time {use['iteration_time'] * 1e3:.2f} ms, bubble "
          f"{use['bubble_fraction']:.1%} (means over iterations {first}..{last})")
    print("stage   busy  idle fwd->bwd  idle bwd->fwd")
    for s in range(stages):
        update = use["update_idle"][s]
        print(f"{s:>5} {use['busy_fraction'][s]:>6.1%} {use['turnaround_idle'][s]:>14.1%} "
              f"{'-' if update is None else format(update, '.1%'):>14}")
    iteration = default_timeline_iteration(sim.events)
    if iteration is not None:
        path = Path(out) if out else run.path / "simulated-timeline.png"
        plot_timeline(sim.events, iteration, stages, path,
                      f"{run.name}: iteration {iteration}, simulated on {stages} devices "
                      f"({schedule}, {sim.link_name})")
        print(f"timeline: {path}")
