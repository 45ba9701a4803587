"""compare.md's pipeline-time section: every run replayed on one device per stage from its
measured action costs (sm_dist.report.simulate), on the fastest schedule its optimizer may run
on, then time to reach chosen losses and the loss at equal time, per depth and N."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sm_dist.optim import registry
from sm_dist.optim.options import OptimizerOptions
from sm_dist.report.compare_tables import (
    DepthGroup,
    Row,
    figure_rows,
    loss_text,
    markdown_table,
    seconds_text,
)
from sm_dist.report.grid import RunResult
from sm_dist.report.run_data import RunData
from sm_dist.report.simulate import SimulateError, simulate_run

Times = dict[Path, dict[int, float]]  # run directory -> iteration -> simulated seconds at its end


def fastest_schedule(run: RunData, link: str) -> tuple[str, dict[int, float]]:
    """The schedule the run ends soonest on, of those its optimizer may run on and its
    measurements allow (zero-bubble ones need run.split_backward), and its end times."""
    name = (run.config.get("optimizer") or {}).get("name", OptimizerOptions.name)
    best: tuple[str, dict[int, float]] | None = None
    reasons = []
    for schedule in registry.get(name).schedules():
        try:
            times = simulate_run(run, link, schedule=schedule).end_times()
        except SimulateError as err:
            reasons.append(str(err))
            continue
        if best is None or max(times.values()) < max(best[1].values()):
            best = (schedule, times)
    if best is None:
        raise SimulateError(reasons[0])
    return best


def pipeline_times(results: Sequence[RunResult], link: str
                   ) -> tuple[Times, dict[Path, str], list[str]]:
    """Each finished run's simulated end time of every iteration on its fastest schedule, the
    schedule, and the runs left out (with why: no measured costs)."""
    times: Times = {}
    schedules: dict[Path, str] = {}
    missing = []
    for result in results:
        if result.run is None:
            continue
        try:
            schedules[result.run.path], times[result.run.path] = fastest_schedule(
                result.run, link)
        except SimulateError as err:
            missing.append(f"{result.point.label}: {err}")
    return times, schedules, missing


def time_to_reach(row: Row, times: dict[int, float], loss: float) -> float | None:
    """Simulated seconds until the first iteration whose training loss is at most `loss`."""
    for record in row.run.records:
        value = record.train_loss
        if value is not None and value <= loss and record.iteration in times:
            return times[record.iteration]
    return None


def loss_at_time(row: Row, times: dict[int, float], budget: float) -> float | None:
    within = [r for r in row.run.records if times.get(r.iteration, float("inf")) <= budget]
    return within[-1].train_loss if within else None


def time_section(groups: Sequence[DepthGroup], times: Times, link: str,
                 reach: Sequence[float], missing: Sequence[str],
                 schedules: dict[Path, str] | None = None) -> list[str]:
    schedules = schedules or {}
    lines = ["## Simulated pipeline time", "",
             f"Simulated, not measured: each run's passes replayed on one device per stage "
             f"(`sm-dist simulate RUN --link {link} --schedule S`), every action taking the "
             f"time the run measured for it, every transfer the `{link}` link's latency plus "
             "its bytes over its bandwidth, on the schedule (of those its optimizer may run "
             "on: GPipe and 1F1B for an update built from the backward; also interleaved "
             "1F1B, ZB-H1 and ZB-V for one that needs only the gradient) that ends it soonest, "
             "named after the optimizer. Per depth and N: the time of an iteration, the time "
             "to reach each loss (`-`: not reached), and the loss after the total time of the "
             "shortest run that did not stop early (a run that diverged and stopped shows its "
             "last loss).", ""]
    for title, rows in figure_rows(groups):
        shown = [row for row in rows if row.run.path in times]
        if not shown:
            continue
        totals = [max(times[row.run.path].values()) for row in shown]
        # Runs that diverged and stopped early end soonest: the budget is that of the
        # shortest run that went the distance (all of them, when none did).
        whole = [t for row, t in zip(shown, totals) if not row.run.stopped]
        budget = min(whole or totals)
        header = ["optimizer", "time / iteration", "total",
                  *[f"to loss {loss:g}" for loss in reach], f"loss @ {seconds_text(budget)}"]
        table = []
        for row, total in zip(shown, totals):
            run_times = times[row.run.path]
            named = row.name + (f", {schedules[row.run.path]}"
                                if row.run.path in schedules else "")
            cells = [named, seconds_text(total / len(run_times)), seconds_text(total)]
            cells += [seconds_text(time_to_reach(row, run_times, loss)) for loss in reach]
            started = min(run_times.values()) <= budget  # else no iteration ended by then
            cells.append(loss_text(loss_at_time(row, run_times, budget)) if started else "-")
            table.append(cells)
        lines += [f"### {title}", "", *markdown_table(header, table), ""]
    if missing:
        lines += ["Left out (no measured costs): " + "; ".join(missing), ""]
    return lines
