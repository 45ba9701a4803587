"""`sm-dist simulate`: a run's own schedule replayed on one device per stage, from the action
costs it measured (`actions.json` of a single-process run, or an engine run's `trace.json`)
and a link model."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm_dist.config.build import build_optimizer
from sm_dist.config.job import JobConfig, job_from_dict
from sm_dist.optim.options import InnerStepsConfig
from sm_dist.pipeline.actions import INDEXED_KINDS, Action, ActionKind
from sm_dist.pipeline.interface import EVAL_CHUNK
from sm_dist.pipeline.schedule import forward_only_schedule, gpipe_schedule
from sm_dist.pipeline.simulator import LINKS, CostModel, Link, Pass, simulate
from sm_dist.pipeline.timeline import (
    TimelineEvent,
    events_from_trace,
    iteration_utilisation,
    read_trace,
)
from sm_dist.report.run_data import ReportError, RunData
from sm_dist.run.metrics import IterationRecord

K = ActionKind


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
    """Median seconds and bytes per unit of every (stage, kind): per microbatch or chunk for
    the indexed kinds, per inner step for I and W, per action for the others."""

    seconds: dict[tuple[int, ActionKind], float]
    nbytes: dict[tuple[int, ActionKind], float]
    source: str  # the file they came from

    def inner_step(self, stage: int) -> float:
        return self.seconds.get((stage, K.INNER), 0.0)

    def model(self, scale: float = 1.0) -> CostModel:
        """Per action; `scale` multiplies the per-microbatch costs (a different split)."""
        def cost(stage: int, action: Action) -> tuple[float, float]:
            key = (stage, action.kind)
            seconds, nbytes = self.seconds.get(key, 0.0), self.nbytes.get(key, 0.0)
            if action.kind in INDEXED_KINDS and action.kind is not K.EVALUATE:
                return seconds * scale, nbytes * scale
            if action.kind is K.INNER:
                return seconds * (action.index or 0), 0.0
            return seconds, nbytes
        return cost


def _units(event: TimelineEvent) -> int:
    if event.kind in (K.INNER, K.FILL):
        return int(event.detail.split()[0]) if event.detail else 0
    return 1


def measured_costs(run: RunData, iterations: range | None = None) -> MeasuredCosts:
    """The run's action costs, from actions.json (single process: one action at a time) or
    else trace.json (the engine: measured while the stages shared the machine)."""
    for name in ("actions.json", "trace.json"):
        path = run.path / name
        if path.is_file():
            events = events_from_trace(read_trace(path))
            break
    else:
        raise SimulateError(f"{run.path} has neither actions.json nor trace.json: no measured "
                            "action costs to simulate from (runs since sm-dist 0.2 write them)")
    per_second: dict[tuple[int, ActionKind], list[float]] = defaultdict(list)
    per_byte: dict[tuple[int, ActionKind], list[float]] = defaultdict(list)
    for e in events:
        if iterations is not None and e.iteration not in iterations:
            continue
        units = _units(e)
        if units == 0:
            continue
        kind = K.INNER if e.kind is K.FILL else e.kind
        per_second[(e.stage, kind)].append((e.end - e.start) / units)
        per_byte[(e.stage, kind)].append(e.sent / units)
    if not per_second:
        raise SimulateError(f"{run.path}: no measured actions in the chosen iterations")
    return MeasuredCosts({k: statistics.median(v) for k, v in per_second.items()},
                         {k: statistics.median(v) for k, v in per_byte.items()}, name)


def run_passes(job: JobConfig, records: list[IterationRecord], microbatches: int,
               test_samples: int | None) -> list[Pass]:
    """Every pass the run's coordinator sent, iteration by iteration, as its records tell:
    the iteration's own pass with the inner steps each stage took, the line-search trials and
    surrogate passes of a steered optimizer, the evaluations."""
    optimizer = build_optimizer(job)
    p = len(job.model.balance)
    chunks = -(-test_samples // EVAL_CHUNK) if test_samples else 1
    fill = isinstance(job.optimizer.inner_steps, InnerStepsConfig)
    passes: list[Pass] = []
    previous: IterationRecord | None = None
    for record in records:
        last = record is records[-1]
        update = optimizer.update_actions(microbatches, last)
        steps = record.inner_steps
        if steps is not None and not fill:
            def update(s: int, base=update, steps=steps) -> list[Action]:
                return [Action(a.kind, steps[s]) if a.kind is K.INNER else a for a in base(s)]
        evaluated = record.test_loss is not None
        if record.step_rejected and not optimizer.steered:  # backward and inner loop skipped
            schedule = [[Action(K.FORWARD, j) for j in range(microbatches)] + [Action(K.APPLY)]
                        for _ in range(p)]
        else:
            schedule = gpipe_schedule(p, microbatches, update,
                                      chunks if evaluated and not optimizer.steered else 0)
        passes.append(Pass(record.iteration, schedule, waits=optimizer.steered))
        if optimizer.steered:
            forward = (record.forward_passes or 0) - ((previous.forward_passes or 0)
                                                      if previous else 0)
            backward = (record.backward_passes or 0) - ((previous.backward_passes or 0)
                                                        if previous else 0)
            for _ in range(max(backward - 1, 0)):  # SSO's surrogate passes
                passes.append(Pass(record.iteration, gpipe_schedule(p, microbatches), True))
            for _ in range(max(forward - backward, 0)):  # forward-only trials
                passes.append(Pass(record.iteration,
                                   forward_only_schedule(p, microbatches, K.TRIAL), True))
            if evaluated:
                passes.append(Pass(record.iteration,
                                   forward_only_schedule(p, chunks, K.EVALUATE), True))
        previous = record
    return passes


@dataclass
class Simulation:
    """A run simulated: its timeline, each iteration's utilisation and its end time."""

    events: list[TimelineEvent]
    iterations: list[int]
    link_name: str
    link: Link
    microbatches: int
    costs: MeasuredCosts

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
                 iterations: range | None = None) -> Simulation:
    """Replay `run` on one device per stage over `link`, with `microbatches` per batch (the
    per-microbatch costs scaled by the run's microbatches over the new count)."""
    job = job_from_dict(run.config, source=f"{run.path / 'config.yaml'}")
    link_name, model = parse_link(link)
    records = [r for r in run.records if iterations is None or r.iteration in iterations]
    if not records:
        raise SimulateError(f"{run.path}: no iterations in the chosen range")
    costs = measured_costs(run, iterations)
    used = job.data.microbatches
    count = microbatches or used
    passes = run_passes(job, records, count, test_samples(run.config))
    events = simulate(passes, costs.model(used / count), model, costs.inner_step)
    return Simulation(events, [r.iteration for r in records], link_name, model, count, costs)


def simulation_json(sim: Simulation) -> str:
    bandwidth = sim.link.bandwidth if math.isfinite(sim.link.bandwidth) else None
    return json.dumps({**sim.utilisation(), "link": sim.link_name,
                       "bandwidth": bandwidth, "latency": sim.link.latency,
                       "microbatches": sim.microbatches, "costs_from": sim.costs.source})


def parse_range(text: str) -> range:
    """a:b (inclusive) → range(a, b + 1)."""
    first, _, last = text.partition(":")
    try:
        return range(int(first), int(last) + 1)
    except ValueError:
        raise SimulateError(f"--iterations {text!r}: write FIRST:LAST, e.g. 2:50") from None



def test_samples(config: dict[str, Any]) -> int:
    """The size of a run's test set, from its config (evaluation chunks are cut from it)."""
    data = config.get("data", {})
    if data.get("dataset") == "synthetic":
        return int(data.get("synthetic", {}).get("test_size", 256))
    return int(data.get("test_subset") or 10_000)  # MNIST and Fashion-MNIST test sets


def simulate_main(run_dir: str, link: str, microbatches: int | None, iterations: str | None,
                  as_json: bool, out: str | None) -> None:
    """`sm-dist simulate`: print the simulated pipeline's figures and draw its timeline."""
    from sm_dist.report.plots import default_timeline_iteration, plot_timeline
    from sm_dist.report.run_data import load_run

    run = load_run(run_dir)
    window = parse_range(iterations) if iterations else None
    sim = simulate_run(run, link, microbatches, window)
    if as_json:
        print(simulation_json(sim))
        return
    use = sim.utilisation()
    stages = len(use["busy_fraction"])
    first, last = use["iterations"]
    print(f"{run.name}: simulated on {stages} devices, link {sim.link_name}, "
          f"{sim.microbatches} microbatches, from the costs in {sim.costs.source}")
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
                      f"({sim.link_name})")
        print(f"timeline: {path}")
