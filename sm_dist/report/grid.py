"""The grid of `sm-dist compare`: optimizers, inner steps, depths and learning rates, one job
each, and what the output directory already holds of them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from sm_dist.config.job import (
    ConfigError,
    JobConfig,
    apply_overrides,
    job_differences,
    job_from_dict,
    job_to_dict,
    load_job,
    read_job_file,
)
from sm_dist.config.optimizer_section import switch_note
from sm_dist.config.schema import plural
from sm_dist.optim import registry
from sm_dist.optim.options import InnerStepsConfig, OptimizerOptions
from sm_dist.optim.registry import names_sweeping
from sm_dist.report.run_data import RunData

# Optimizers that take optimizer.inner_steps: one run per N of --inner-steps.
INNER_STEP_OPTIMIZERS = names_sweeping("inner_steps")
# Optimizers that step with optimizer.lr, which is swept: one run per --lrs value, the best
# one reported (the spec gives none of them a step size, so each gets its best from a sweep).
LR_SWEEP_OPTIMIZERS = names_sweeping("lr")


class CompareError(Exception):
    """A grid, job or output directory `sm-dist compare` cannot use; nothing was trained."""


@dataclass(frozen=True)
class GridPoint:
    """One run of the grid: its label (job name and run directory name) and its complete job."""

    label: str
    optimizer: str
    depth: int | None  # Linear layers of model.mlp; None: the job's own model
    inner_steps: int | InnerStepsConfig | None  # N, for the inner-step optimizers only
    lr: float | None  # the learning rate, for the swept optimizers only
    job: JobConfig


@dataclass
class RunResult:
    """What became of one grid point: trained now, collected from an earlier run, or failed."""

    point: GridPoint
    path: Path  # the run directory
    status: str  # "trained", "collected", "stopped" (it diverged) or "failed"
    run: RunData | None = None  # the finished run (None when it failed)
    returncode: int | None = None  # of `sm-dist train`, when it ran
    log: Path | None = None  # its output, when it ran
    reason: str | None = None  # why a run counts as failed


# ------------------------------------------------------------------------------ the grid
def split_layers(layers: int, stages: int) -> list[int]:
    """`layers` over `stages` as evenly as possible, the extra layers on the first stages:
    8 over 4 is [2, 2, 2, 2], 6 over 4 is [2, 2, 1, 1]."""
    base, extra = divmod(layers, stages)
    return [base + 1] * extra + [base] * (stages - extra)


def depth_model(widths: Sequence[int], stages: int, depth: int) -> tuple[list[int], list[int]]:
    """Widths and balance of the `depth`-layer version of the MLP with `widths` split into
    `stages` stages: the same input, output and first hidden width, on min(depth, stages)
    stages."""
    if len(widths) < 3:
        raise CompareError(f"--depths needs a hidden width to repeat, but the job's "
                           f"model.mlp.widths {list(widths)} has no hidden layer; give the job "
                           f"one, e.g. [{widths[0]}, 128, {widths[-1]}]")
    new_widths = [widths[0], *[widths[1]] * (depth - 1), widths[-1]]
    return new_widths, split_layers(depth, min(depth, stages))


def default_at(iterations: int, count: int = 5) -> list[int]:
    """About `count` evenly spaced iterations up to the last: 300 gives 60, 120, ..., 300."""
    return sorted({max(1, math.ceil(iterations * k / count)) for k in range(1, count + 1)})


def steps_text(steps: int | InnerStepsConfig) -> str:
    """N as labels and tables write it: 10, or 10-200 for {min: 10, max: 200}."""
    return str(steps) if isinstance(steps, int) else f"{steps.min}-{steps.max}"


def lr_text(lr: float) -> str:
    return f"{lr:g}"


def point_label(optimizer: str, depth: int | None, steps: int | InnerStepsConfig | None,
                lr: float | None) -> str:
    """mlp4-sm-n10, mlp4-adam-lr0.001, mlp4-<name>; without the mlp part when depth is None."""
    parts = [] if depth is None else [f"mlp{depth}"]
    parts.append(optimizer)
    if steps is not None:
        parts.append(f"n{steps_text(steps)}")
    if lr is not None:
        parts.append(f"lr{lr_text(lr).replace('+', '')}")  # 1e+08 -> 1e08: a valid name
    return "-".join(parts)


def check_list(option: str, values: Sequence[Any] | None) -> None:
    if values is None:
        return
    if not values:
        raise CompareError(f"{option} is empty; give at least one value")
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise CompareError(f"{option} lists {value} twice")
        seen.add(value)


def job_option(base: JobConfig, key: str, takers: Sequence[str],
               optimizer_sets: Sequence[str] = ()) -> Any:
    """The job's value of an option some optimizers take (inner_steps, lr): a --set of it,
    else its own when its optimizer takes it, else the default of the first that does."""
    for item in reversed(optimizer_sets):
        name, _, value = item.partition("=")
        if name.strip() == f"optimizer.{key}":
            return yaml.safe_load(value)
    if hasattr(base.optimizer, key):
        return getattr(base.optimizer, key)
    return getattr(registry.get(takers[0]).Options(), key)


def grid_lines(base: JobConfig, optimizers: Sequence[str], inner_steps: Sequence[int] | None,
               depths: Sequence[int] | None, lrs: Sequence[float] | None) -> list[str]:
    """The grid in words, for the header of compare.md."""
    def listed(values: Sequence[Any]) -> str:
        return ", ".join(str(v) for v in values)

    lines = [f"optimizers: {listed(optimizers)}"]
    if set(optimizers) & set(INNER_STEP_OPTIMIZERS):
        steps = listed(inner_steps) if inner_steps is not None else (
            f"{steps_text(job_option(base, 'inner_steps', INNER_STEP_OPTIMIZERS))} "
            "(the job's)")
        lines.append(f"N (inner steps of {listed(INNER_STEP_OPTIMIZERS)}): {steps}")
    if depths is not None and base.model.mlp is not None:
        lines.append(f"depths (Linear layers, hidden width {base.model.mlp.widths[1]}): "
                     f"{listed(depths)}")
    if set(optimizers) & set(LR_SWEEP_OPTIMIZERS):
        swept = listed([lr_text(lr) for lr in lrs]) if lrs is not None else (
            f"{lr_text(job_option(base, 'lr', LR_SWEEP_OPTIMIZERS))} (the job's)")
        lines.append(f"learning rates of {listed(LR_SWEEP_OPTIMIZERS)}: {swept}")
    return lines


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(--set values for the base job, those of an optimizer's own options): the latter are
    applied to each grid point after its optimizer is chosen (optimizer.name stays a base
    override, as does an option every optimizer has, such as optimizer.replica_mode)."""
    common = {f.name for f in fields(OptimizerOptions)}
    base, own = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if parts[0] == "optimizer" and len(parts) > 1 and parts[1] not in common:
            own.append(item)
        else:
            base.append(item)
    return base, own


def _own_sets(optimizer: str, own: Sequence[str]) -> list[str]:
    """The optimizer-option overrides that `optimizer` takes."""
    if not registry.known(optimizer):
        return list(own)
    keys = registry.option_names(optimizer)
    return [item for item in own if item.split("=", 1)[0].strip().split(".")[1] in keys]


def _check_own_sets(optimizers: Sequence[str], own: Sequence[str]) -> None:
    """Every optimizer-option override must be an option of some optimizer of the grid."""
    for item in own:
        if not any(item in _own_sets(name, [item]) for name in optimizers):
            key = item.split("=", 1)[0].strip()
            raise CompareError(f"--set {key}: no optimizer of --optimizers "
                               f"({', '.join(optimizers)}) has that option; leave it out or "
                               "add the optimizer it belongs to")


def given_options(job_path: str | Path, overrides: Sequence[str]) -> set[str]:
    """The optimizer keys the job file and `overrides` give (not those left at defaults)."""
    raw = apply_overrides(read_job_file(job_path) or {}, overrides)
    section = raw.get("optimizer") if isinstance(raw, dict) else None
    return set(section) - {"name"} if isinstance(section, dict) else set()


def expand_grid(base: JobConfig, optimizers: Sequence[str],
                inner_steps: Sequence[int] | None = None, depths: Sequence[int] | None = None,
                lrs: Sequence[float] | None = None,
                notes: list[str] | None = None,
                optimizer_sets: Sequence[str] = (),
                given: set[str] | None = None) -> list[GridPoint]:
    """Every run of the grid, depth by depth, in the order of `optimizers`: an inner-step
    optimizer once per N (default: the job's optimizer.inner_steps), an lr-swept one once per
    learning rate (default: the job's optimizer.lr), the others once. Each job is `base`
    with its name, optimizer.name (the job's optimizer's own options left out for another),
    inner_steps or lr and (for a depth) model changed, and is validated: an optimizer the
    schema does not know is a ConfigError naming it. `notes` gets a line per optimizer whose
    points leave out some of the job's options. `optimizer_sets` (split_overrides' second
    list) go to the points of the optimizers that take them. `given` (given_options): the
    optimizer keys the job set; another optimizer's point takes those and its own defaults
    for the rest (None: every key of the base job's section, defaults included)."""
    for option, values in (("--optimizers", optimizers), ("--inner-steps", inner_steps),
                           ("--depths", depths), ("--lrs", lrs)):
        check_list(option, values)
    if inner_steps is not None and not set(optimizers) & set(INNER_STEP_OPTIMIZERS):
        raise CompareError(f"--inner-steps applies to {', '.join(INNER_STEP_OPTIMIZERS)}, "
                           "and none of them is in --optimizers; leave it out")
    if lrs is not None and not set(optimizers) & set(LR_SWEEP_OPTIMIZERS):
        raise CompareError(f"--lrs applies to {', '.join(LR_SWEEP_OPTIMIZERS)}, and neither "
                           "is in --optimizers; leave it out (other optimizers use "
                           "optimizer.lr: --set optimizer.lr=...)")
    if depths is not None:
        if base.model.mlp is None:
            raise CompareError(f"--depths builds MLPs of each depth from model.mlp, but the job "
                               f"uses model.factory ({base.model.factory}); leave out --depths "
                               "or write the job with model.mlp")
        bad = [d for d in depths if d < 1]
        if bad:
            raise CompareError(f"--depths {bad[0]}: a depth is a number of layers, at least 1")
    steps_list: list[int | InnerStepsConfig] = (
        list(inner_steps) if inner_steps is not None
        else [job_option(base, "inner_steps", INNER_STEP_OPTIMIZERS, optimizer_sets)])
    lr_list = list(lrs) if lrs is not None else [
        job_option(base, "lr", LR_SWEEP_OPTIMIZERS, optimizer_sets)]
    _note_switches(base, optimizers, notes)
    _check_own_sets(optimizers, optimizer_sets)
    points = []
    for depth in depths if depths is not None else [None]:
        for name in optimizers:
            variants: list[tuple[int | InnerStepsConfig | None, float | None]] = [(None, None)]
            if name in INNER_STEP_OPTIMIZERS:
                variants = [(steps, None) for steps in steps_list]
            elif name in LR_SWEEP_OPTIMIZERS:
                variants = [(None, lr) for lr in lr_list]
            for steps, lr in variants:
                label = point_label(name, depth, steps, lr)
                job = _point_job(base, label, name, depth, steps, lr,
                                 _own_sets(name, optimizer_sets), given)
                points.append(GridPoint(label, name, depth, steps, lr, job))
    return points


def _note_switches(base: JobConfig, optimizers: Sequence[str], notes: list[str] | None) -> None:
    """A line per optimizer of the grid that leaves out some of the job's own options."""
    if notes is None:
        return
    for name in dict.fromkeys(optimizers):
        if name != base.optimizer.name and registry.known(name):
            _, dropped = registry.switch_section(job_to_dict(base)["optimizer"], name)
            if dropped:
                notes.append(switch_note(base.optimizer.name, name, dropped))


def _point_job(base: JobConfig, label: str, optimizer: str, depth: int | None,
               steps: int | InnerStepsConfig | None, lr: float | None,
               sets: Sequence[str] = (), given: set[str] | None = None) -> JobConfig:
    raw = job_to_dict(base)
    raw["name"] = label
    if given is not None and optimizer != base.optimizer.name:
        # Not the base optimizer's defaults (sm_adaptive's scale_max, say): the new one's own.
        raw["optimizer"] = {k: v for k, v in raw["optimizer"].items()
                            if k in given or k == "name"}
    if registry.known(optimizer):
        raw["optimizer"], _ = registry.switch_section(raw["optimizer"], optimizer)
        # The time tables simulate each run on every schedule its optimizer may run on; the
        # zero-bubble ones need the backward's halves timed (the same numbers, bit for bit).
        raw["run"]["split_backward"] = "zb" in registry.get(optimizer).schedules()
    else:  # a 'module:Class' the job's validation imports (and names if it cannot)
        raw["optimizer"]["name"] = optimizer
    if steps is not None:
        raw["optimizer"]["inner_steps"] = steps if isinstance(steps, int) else asdict(steps)
    if lr is not None:
        raw["optimizer"]["lr"] = lr
    if depth is not None:
        assert base.model.mlp is not None  # expand_grid checked it
        widths, balance = depth_model(base.model.mlp.widths, len(base.model.balance), depth)
        raw["model"]["mlp"]["widths"], raw["model"]["balance"] = widths, balance
    # The point's own --set values come before the swept value, which is the grid's.
    return job_from_dict(_with_sets(raw, sets, label, steps, lr), source=f"for grid point {label}")


def _with_sets(raw: dict[str, Any], sets: Sequence[str], label: str,
               steps: int | InnerStepsConfig | None, lr: float | None) -> dict[str, Any]:
    if not sets:
        return raw
    swept = {key: raw["optimizer"][key] for key, value in (("inner_steps", steps), ("lr", lr))
             if value is not None}
    raw = job_to_dict(job_from_dict(raw, sets, source=f"for grid point {label}"))
    raw["optimizer"].update(swept)
    return raw


# ------------------------------------------------------------------------------ run directories
def run_path(out: Path, point: GridPoint) -> Path:
    return out / "runs" / point.label


def existing_run(path: Path, job: JobConfig) -> tuple[str, str]:
    """What `path` holds, with a reason: "none" (no run), "finished" (summary.json) or
    "unfinished" run of `job`, or "different" (another job, or a config.yaml that is none)."""
    if not (path / "config.yaml").exists() and not (path / "metrics.jsonl").exists():
        return "none", "no run"
    try:
        old = load_job(path / "config.yaml")
    except ConfigError as err:
        return "different", f"its config.yaml is not a usable job ({err.errors[0]})"
    differ = job_differences(old, job)
    if differ:
        shown = ", ".join(f"{key}: {there!r} there, {here!r} here"
                          for key, (there, here) in list(differ.items())[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        return "different", f"another job ({shown}{more})"
    if (path / "summary.json").is_file():
        return "finished", "finished"
    return "unfinished", "unfinished (no summary.json)"


def plan_runs(points: Sequence[GridPoint], out: Path, rerun: bool, collect_only: bool
              ) -> list[str]:
    """Per point: "collect" (a finished run of its job is there), "run", or "replace" (move
    an unfinished run, or any run with --rerun, to <out>/replaced/, then run). Every problem
    at once is a CompareError: with --collect-only a run that is not there finished,
    otherwise a run directory holding another job (unless --rerun)."""
    actions, problems = [], []
    for point in points:
        path = run_path(out, point)
        state, reason = existing_run(path, point.job)
        if collect_only:
            actions.append("collect")
            if state != "finished":
                problems.append(f"{point.label}: {reason} in {path}")
        elif state == "different" and not rerun:
            problems.append(f"{path} holds {reason}")
        elif state == "finished" and not rerun:
            actions.append("collect")
        else:
            actions.append("run" if state == "none" else "replace")
    if problems:
        if collect_only:
            raise CompareError(f"--collect-only: {len(problems)} of {len(points)} runs are not "
                               f"there finished:\n  " + "\n  ".join(problems)
                               + "\nrun the same command without --collect-only to train them")
        raise CompareError("\n  ".join([
            f"{plural(len(problems), 'run directory')} of this grid hold other jobs (pass "
            "--rerun to replace them, or choose another --out):", *problems]))
    return actions


def model_heading(job: JobConfig) -> str:
    """The heading of a model's group in compare.md: what it is and how it is split."""
    balance, cnn, transformer = job.model.balance, job.model.cnn, job.model.transformer
    if cnn is not None:
        return f"cnn: channels {'-'.join(map(str, cnn.channels))}, stages {balance}"
    if transformer is not None:
        return (f"transformer: {transformer.blocks} blocks of width {transformer.width}, "
                f"stages {balance}")
    if job.model.mlp is None:
        return f"model {job.model.factory}: stages {balance}"
    widths = job.model.mlp.widths
    layers = len(widths) - 1
    return (f"mlp{layers}: {layers} layers, widths {'-'.join(map(str, widths))}, "
            f"stages {balance}")
