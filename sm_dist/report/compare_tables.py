"""compare.md of an `sm-dist compare` grid: tables like the paper's Tables 1-4, cost, lr sweeps."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sm_dist.optim.options import InnerStepsConfig
from sm_dist.report.grid import (
    LR_SWEEP_OPTIMIZERS,
    RunResult,
    lr_text,
    model_heading,
    steps_text,
)
from sm_dist.report.run_data import RunData
from sm_dist.report.summary import summarize
from sm_dist.run.metrics import IterationRecord

Steps = int | InnerStepsConfig


@dataclass
class Row:
    """One line of the main tables and one curve of the figure: an optimizer at one N, or a
    learning-rate sweep stood for by its best run."""

    name: str  # "sm (N=10)", "adam (lr=0.01, best of 3)", or the optimizer's name
    optimizer: str
    steps: Steps | None  # N, for the inner-step optimizers
    run: RunData


@dataclass
class DepthGroup:
    """The finished runs of one depth (or of the job's own model), in grid order."""

    depth: int | None
    heading: str  # "mlp4: 4 layers, widths 784-512-512-512-10, stages [1, 1, 1, 1]"
    results: list[RunResult]
    rows: list[Row] = field(default_factory=list)
    sweeps: dict[str, list[RunResult]] = field(default_factory=dict)  # lr-swept: every lr

    @property
    def steps(self) -> list[Steps]:
        """The N of this depth's inner-step runs, in grid order."""
        found: list[Steps] = []
        for row in self.rows:
            if row.steps is not None and row.steps not in found:
                found.append(row.steps)
        return found


# ------------------------------------------------------------------------------ numbers
def loss_text(value: float | None) -> str:
    """A loss to 4 significant digits; None is a loss that was not finite."""
    return "non-finite" if value is None else f"{value:#.4g}"


def acc_text(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def seconds_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def final_loss(run: RunData) -> float | None:
    """The last iteration's training loss; None when it was not finite (written as null) or
    the run stopped there because it diverged (run.on_nonfinite: stop)."""
    value = run.records[-1].train_loss
    if run.stopped or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def first_non_finite(run: RunData) -> int | None:
    """The first iteration whose training loss was not finite (null in metrics.jsonl), or at
    which the run stopped as diverged."""
    for record in run.records:
        value = record.train_loss
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return record.iteration
    return run.records[-1].iteration if run.stopped else None


def loss_at(run: RunData, iteration: int) -> str:
    """The training loss at `iteration` ("-" when the run has no such iteration, "non-finite"
    from the iteration at which a diverged run stopped)."""
    stop = first_non_finite(run) if run.stopped else None
    if stop is not None and iteration >= stop:
        return loss_text(None)
    for record in run.records:
        if record.iteration == iteration:
            return loss_text(record.train_loss)
    return "-"


def test_acc_at(run: RunData, iteration: int) -> str:
    """The test accuracy of the last evaluation at or before `iteration`, with "(@k)" when it
    was measured at an earlier iteration k; "-" when there was none yet."""
    found = [r for r in run.records if r.test_acc is not None and r.iteration <= iteration]
    if not found:
        return "-"
    at = found[-1].iteration
    text = acc_text(found[-1].test_acc)
    return text if at == iteration else f"{text} (@{at})"


def finished(results: Sequence[RunResult]) -> list[tuple[RunResult, RunData]]:
    """The results whose run finished, each with its run."""
    return [(result, result.run) for result in results if result.run is not None]


def best_of(sweep: Sequence[RunResult]) -> RunResult:
    """The run with the lowest finite final training loss (the first of equals; the first run
    when none is finite)."""
    finite = [(loss, index) for index, (_, run) in enumerate(finished(sweep))
              if (loss := final_loss(run)) is not None]
    return sweep[min(finite)[1]] if finite else sweep[0]


def steady_iteration_time(run: RunData) -> float | None:
    """Mean seconds per iteration after the first (whose time includes the start-up); the
    first's own time for a one-iteration run."""
    timed = run.records
    if not timed:
        return None
    first, last = timed[0], timed[-1]
    if last.iteration == first.iteration:
        return last.wall_time / last.iteration
    return (last.wall_time - first.wall_time) / (last.iteration - first.iteration)


def _stage_total(record: IterationRecord, key: str) -> int | float | None:
    value = record.value(key)
    if isinstance(value, list):
        return sum(v for v in value if v is not None)
    return value


# ------------------------------------------------------------------------------ grouping
def group_results(results: Sequence[RunResult]) -> list[DepthGroup]:
    """The finished runs by depth, with their table rows: one per inner-step optimizer and N,
    one per swept optimizer (its best lr), one per other optimizer."""
    groups: dict[int | None, DepthGroup] = {}
    for result in results:
        if result.run is None:
            continue
        depth = result.point.depth
        if depth not in groups:
            groups[depth] = DepthGroup(depth, model_heading(result.point.job), [])
        groups[depth].results.append(result)
    for group in groups.values():
        done: set[str] = set()
        for result in group.results:
            point, name = result.point, result.point.optimizer
            if name in LR_SWEEP_OPTIMIZERS:
                if name in done:
                    continue
                done.add(name)
                sweep = [r for r in group.results if r.point.optimizer == name]
                group.sweeps[name] = sweep
                best = best_of(sweep)
                assert best.run is not None and best.point.lr is not None
                of = "" if len(sweep) == 1 else (
                    f", best of {len(sweep)}" if final_loss(best.run) is not None
                    else f", all {len(sweep)} diverged")
                group.rows.append(Row(f"{name} (lr={lr_text(best.point.lr)}{of})", name, None,
                                      best.run))
            elif point.inner_steps is not None:
                group.rows.append(Row(f"{name} (N={steps_text(point.inner_steps)})", name,
                                      point.inner_steps, result.run))
            else:
                group.rows.append(Row(name, name, None, result.run))
    return list(groups.values())


def figure_rows(groups: Sequence[DepthGroup]) -> list[tuple[str, list[Row]]]:
    """(title, rows drawn) per figure row: one per depth and N; the optimizers without N are
    in every row of their depth."""
    drawn = []
    for group in groups:
        for steps in group.steps or [None]:
            title = group.heading if steps is None else f"{group.heading}, N={steps_text(steps)}"
            drawn.append((title, [r for r in group.rows if r.steps is None or r.steps == steps]))
    return drawn


def pipeline_passes(record: IterationRecord) -> float | None:
    """Passes of the batch through the whole pipeline so far: forward plus backward, a tangent
    pass (CGBlock) counting as both, since it goes up and comes back down."""
    forward, backward = record.forward_passes, record.backward_passes
    if forward is None or backward is None:
        return None
    return forward + backward + 2 * (record.tangent_passes or 0)


def loss_at_passes(run: RunData, passes: float) -> float | None:
    """The training loss of the last iteration within `passes` pipeline passes."""
    within = [r for r in run.records if (p := pipeline_passes(r)) is not None and p <= passes]
    value = within[-1].train_loss if within else None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def rises(run: RunData) -> int:
    """Iterations whose training loss is above the previous iteration's."""
    losses = [r.train_loss for r in run.records]
    return sum(1 for a, b in zip(losses, losses[1:])
               if a is not None and (b is None or not math.isfinite(b) or b > a))


# ------------------------------------------------------------------------------ markdown
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table, the first column left-aligned and the others right-aligned."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [f"| {' | '.join(cells)} |" for cells in (header, align, *rows)]


def _table1(group: DepthGroup, at: Sequence[int]) -> list[str]:
    header = ["optimizer", *[f"loss @{k}" for k in at], *[f"test acc @{k}" for k in at]]
    rows = [[row.name, *[loss_at(row.run, k) for k in at], *[test_acc_at(row.run, k) for k in at]]
            for row in group.rows]
    return markdown_table(header, rows)


def _final_cell(run: RunData) -> str:
    return f"{loss_text(final_loss(run))} / {acc_text(summarize(run)['final_test_acc'])}"


def _tables24(group: DepthGroup) -> list[str]:
    steps = group.steps
    columns = [f"N={steps_text(s)}" for s in steps] or ["final"]
    rows, seen = [], set()
    for row in group.rows:
        if row.steps is None:
            rows.append([row.name, *[_final_cell(row.run)] * len(columns)])
        elif row.optimizer not in seen:
            seen.add(row.optimizer)
            by_steps = {r.steps: r.run for r in group.rows
                        if r.optimizer == row.optimizer and r.steps is not None}
            rows.append([row.optimizer, *[_final_cell(by_steps[s]) if s in by_steps else "-"
                                          for s in steps]])
    return markdown_table(["optimizer", *columns], rows)


def _equal_passes_table(rows: Sequence[Row]) -> list[str]:
    """Final loss, the loss at the smallest pass budget any row used, and rises, per row."""
    totals = [pipeline_passes(row.run.records[-1]) for row in rows]
    whole = [t for row, t in zip(rows, totals) if t is not None and not row.run.stopped]
    budget = min(whole or [t for t in totals if t is not None], default=None)  # stopped: early
    table = []
    for row, total in zip(rows, totals):
        at_budget = loss_at_passes(row.run, budget) if budget is not None else None
        table.append([row.name, "-" if total is None else f"{total:g}",
                      loss_text(final_loss(row.run)), loss_text(at_budget),
                      acc_text(summarize(row.run)["final_test_acc"]), str(rises(row.run))])
    header = ["optimizer", "passes", "final loss",
              f"loss @ {'-' if budget is None else f'{budget:g}'} passes", "final test acc",
              "rises"]
    return markdown_table(header, table)


def _cost_table(results: Sequence[RunResult]) -> list[str]:
    done = finished(results)
    extra = [("hvp_products", "HVPs"), ("tangent_passes", "tangent passes")]
    header = ["run", "iterations", "forward passes", "backward passes",
              *[title for _, title in extra], "wall time", "time / iteration"]
    rows = []
    for result, run in done:
        summary = summarize(run)
        cells = [result.point.label, str(summary["iterations"]),
                 str(summary["forward_passes"] or "-"), str(summary["backward_passes"] or "-")]
        for key, _ in extra:
            total = _stage_total(run.records[-1], key)
            cells.append("-" if total is None else str(total))
        cells += [seconds_text(summary["wall_time"]), seconds_text(steady_iteration_time(run))]
        rows.append(cells)
    return markdown_table(header, rows)


def _sweep_table(sweep: Sequence[RunResult]) -> list[str]:
    best = best_of(sweep)
    rows = []
    for result, run in finished(sweep):
        assert result.point.lr is not None
        rows.append([lr_text(result.point.lr), loss_text(final_loss(run)),
                     acc_text(summarize(run)["final_test_acc"]),
                     "yes" if result is best and final_loss(run) is not None else ""])
    return markdown_table(["lr", "final training loss", "final test acc", "best"], rows)


def compare_markdown(results: Sequence[RunResult], *, at: Sequence[int], job_path: str,
                     overrides: Sequence[str], grid: Sequence[str], command_line: str,
                     out: Path) -> str:
    """The whole of compare.md."""
    groups = group_results(results)
    done = finished(results)
    trained = sum(r.status == "trained" for r in results)
    iterations = sorted({summarize(run)["iterations"] for _, run in done})
    sets = "".join(f" `--set {o}`" for o in overrides)
    lines = [f"# sm-dist compare: {job_path}", "",
             f"- base job: `{job_path}`{' with' + sets if sets else ''}",
             f"- command: `{command_line}`",
             *[f"- {line}" for line in grid],
             f"- {len(results)} runs in `{out / 'runs'}`: {trained} trained now, "
             f"{sum(r.status == 'stopped' for r in results)} trained now and stopped "
             f"(diverged), {sum(r.status == 'collected' for r in results)} collected from "
             f"earlier, {len(results) - len(done)} failed; "
             f"{', '.join(map(str, iterations)) or 'no'} iterations",
             f"- written {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
             "The training loss of an iteration is measured by its forward pass, before its "
             "update; the test accuracy after the update, every `run.eval_every` iterations "
             f"and at the last. {', '.join(LR_SWEEP_OPTIMIZERS)} appear at their best learning "
             "rate (the lowest final training loss; every rate is in the sweep tables). Losses "
             "have 4 "
             "significant digits; `non-finite` is a loss that overflowed (the run diverged).", ""]
    lines += ["## Training loss and test accuracy at chosen iterations (as the paper's Table 1)",
              "", "Test accuracy is that of the last evaluation at or before the iteration; "
              "`(@k)` marks an evaluation at an earlier iteration k.", ""]
    for group in groups:
        lines += [f"### {group.heading}", "", *_table1(group, at), ""]
    lines += ["## Final training loss and test accuracy across N and depth "
              "(as the paper's Tables 2-4)", "",
              "Each cell: the final training loss / the final test accuracy. Optimizers without "
              "inner steps do not depend on N: their value is repeated in every column.", ""]
    for group in groups:
        lines += [f"### {group.heading}", "", *_tables24(group), ""]
    lines += ["## At equal pipeline passes", "", "Per depth and N: each run's pipeline passes "
              "(forward plus backward, a tangent pass counting as both), its final training "
              "loss, its loss after the fewest passes a run of the table that did not stop "
              "early took (the last iteration within that budget: retried steps and line-search "
              "trials count), its "
              "final test accuracy, and the number of iterations whose training loss rose.", ""]
    for title, rows in figure_rows(groups):
        lines += [f"### {title}", "", *_equal_passes_table(rows), ""]
    lines += ["## Cost", "", "Per run, at its end: pipeline forward and backward passes over the "
              "batch (forward-only trial passes count as forward passes), Hessian-vector "
              "products summed over the stages and tangent passes where the run records them, "
              "the wall time (the first iteration includes start-up) and the mean time of an "
              "iteration after the first.", "", *_cost_table(results), ""]
    lines += _sweeps_diverged_and_failed(groups, results)
    return "\n".join(lines)


def _sweeps_diverged_and_failed(groups: list[DepthGroup],
                                results: Sequence[RunResult]) -> list[str]:
    """compare.md's last sections: the learning-rate sweeps, the runs that diverged and the
    runs that failed (each only when there is one)."""
    lines: list[str] = []
    sweeps = [(group, name, sweep) for group in groups for name, sweep in group.sweeps.items()
              if len(sweep) > 1]
    if sweeps:
        lines += ["## Learning-rate sweeps", ""]
        for group, name, sweep in sweeps:
            lines += [f"### {name}, {group.heading}", "", *_sweep_table(sweep), ""]
    diverged = [(r, run, k) for r, run in finished(results)
                if (k := first_non_finite(run)) is not None]
    if diverged:
        lines += ["## Diverged runs", "", "A run stops at the first iteration whose training "
                  "loss is not finite or more than 10^4 times its first (run.on_nonfinite: "
                  "stop); the tables show `non-finite` from there on.", ""]
        for r, run, k in diverged:
            why = run.stop.reason if run.stop is not None else None
            lines.append(f"- {r.point.label}: " + (f"stopped at iteration {k}: {why}" if why else
                         f"the training loss was not finite from iteration {k}"))
        lines.append("")
    failed = [r for r in results if r.run is None]
    if failed:
        lines += ["## Failed runs", "", "These runs are left out of the tables above.", ""]
        for result in failed:
            log = f"; log `{result.log}`" if result.log is not None else ""
            lines.append(f"- {result.point.label}: {result.reason}{log}")
        lines.append("")
    return lines
