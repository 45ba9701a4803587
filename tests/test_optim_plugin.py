"""Adding an optimizer is one module and one registry line: a toy optimizer defined here
(sign-gradient descent with a decaying step) brings its own action kind (Q, the sign step),
its own option (`step_decay`) and its own metric (`step_norm`, per stage), trains through both
pipelines and matches a direct computation; its metric reaches metrics.jsonl and its action
the schedule grid and the timeline, without any change to sm_dist."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sm_dist.config.build import build_local_pipeline, build_stage_modules, load_job_data
from sm_dist.config.job import ConfigError, job_from_dict
from sm_dist.optim import registry
from sm_dist.optim.base import BaseStageOptimizer, Optimizer, StageReport
from sm_dist.optim.metrics import OptimizerMetrics, metric
from sm_dist.optim.options import LearningRateOptions
from sm_dist.pipeline.actions import (
    APPLY,
    UPDATE_COLOUR,
    Action,
    ActionKind,
    Direction,
    register_kind,
)
from sm_dist.pipeline.executor import Handler, PlanRun
from sm_dist.pipeline.schedule import UpdateActions
from sm_dist.run.trainer import train
from tests.conftest import run_cli, run_here, synthetic_job, write_job

SPEC = "tests.test_optim_plugin:SignGD"  # how a job file names an optimizer outside sm_dist

# The sign step: each stage works out lr_t·sign(∂h/∂θ_s) after its last backward.
SIGN_STEP = register_kind(ActionKind("Q", "sign step", Direction.LOCAL, "update",
                                     UPDATE_COLOUR, "update", after_backward=True))


@dataclass(kw_only=True)
class SignGDOptions(LearningRateOptions):
    """The step lr·step_decay^t of iteration t (counted from 0)."""
    step_decay: float = field(default=1.0, metadata={"gt": 0, "max": 1})


@dataclass
class SignGDReport(StageReport):
    step_norm: float = 0.0  # ‖Δθ_s‖ of this stage's step


@dataclass
class SignMetrics(OptimizerMetrics):
    """The norm of each stage's step."""

    step_norm: list[float] | None = metric("step", format=".3g", per_stage=True, line=True,
                                           column=True)


class SignGDStageOptimizer(BaseStageOptimizer):
    """θ_s ← θ_s − lr·decay^t·sign(∂h/∂θ_s) on one stage: Q works the step out, A applies it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.steps_taken = 0
        self.pending: list[torch.Tensor] = []

    def handlers(self) -> dict[ActionKind, Handler]:
        return {SIGN_STEP: self._sign_step, APPLY: self._apply}

    def _sign_step(self, run: PlanRun, action: Action) -> str:
        size = self.config.lr * self.config.step_decay ** self.steps_taken
        self.pending = [-size * p.grad.sign() for p in self.stage.params]
        return ""

    def _apply(self, run: PlanRun, action: Action) -> str:
        with torch.no_grad():
            for p, step in zip(self.stage.params, self.pending):
                p.add_(step)
        norm = math.sqrt(sum(float((s * s).sum()) for s in self.pending))
        self._report = SignGDReport(step_norm=norm)
        self.steps_taken += 1
        self.stage.end_iteration()
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_taken = state["steps_taken"]


class SignGD(Optimizer):
    name = "sign_gd"
    summary = "sign-gradient descent (a test of the optimizer interface)"
    Options = SignGDOptions
    Metrics = SignMetrics
    stage_optimizer = SignGDStageOptimizer
    kinds = (SIGN_STEP, APPLY)
    sweep = "lr"

    def update_actions(self, num_microbatches: int, last: bool) -> UpdateActions:
        return lambda stage: [Action(SIGN_STEP), Action(APPLY)]

    def record_fields(self, reports: list[StageReport]) -> dict[str, Any]:
        return {"step_norm": [getattr(r, "step_norm", None) for r in reports]}


@pytest.fixture(autouse=True)
def restore_registry():
    """Registering is process-wide: leave the registry (and the schema's choices) as found."""
    names, known = list(registry.NAMES), dict(registry._REGISTRY)
    yield
    registry.NAMES[:] = names
    registry._REGISTRY.clear()
    registry._REGISTRY.update(known)


def toy_job(name: str, decay: float = 0.5) -> dict:
    job = synthetic_job(run={"iterations": 4, "eval_every": 2})
    job["optimizer"] = {"name": name, "lr": 0.02, "step_decay": decay}
    return job


def test_a_registered_optimizer_trains_in_one_process_as_written() -> None:
    registry.register(SignGD)
    job = job_from_dict(toy_job("sign_gd"))
    data = load_job_data(job)
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    records = train(job, pipeline, data, lambda r: None)

    model = torch.nn.Sequential(*build_stage_modules(job))  # the same start, stepped by hand
    params = list(model.parameters())
    losses, norms = [], []
    for t in range(job.run.iterations):
        loss = F.cross_entropy(model(data.train_x), data.train_y)
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.02 * 0.5 ** t * g.sign())
        norms.append(0.02 * 0.5 ** t)
    assert [r.train_loss for r in records] == pytest.approx(losses, rel=1e-12)
    assert losses[-1] < losses[0]
    mine = [p for stage in pipeline.stages for p in stage.params]
    for a, b in zip(mine, params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    # Its metric: stage 0 holds 6·5+5 parameters, each stepped by lr_t.
    assert [r.metric("step_norm")[0] for r in records] == pytest.approx(
        [n * math.sqrt(35) for n in norms], rel=1e-12)
    assert "sign_gd" in registry.NAMES and registry.names_sweeping("lr")[-1] == "sign_gd"


def test_an_optimizer_from_outside_shows_its_action_metric_and_option(tmp_path: Path) -> None:
    """Named by its module in the job file: every stage process imports it; the engine and one
    process compute the same; its metric is in metrics.jsonl and the live line, its action Q
    in the schedule grid and in the timeline (trace.json and the plot's legend); its option
    is validated like the package's own. Only the engine run starts processes; the other
    commands run in this process (run_here)."""
    path = write_job(tmp_path / "job.yaml", toy_job(SPEC))
    single = run_here("train", str(path), "--single-process", "--out", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    multi = run_cli("train", str(path), "--no-live", "--out", "multi", cwd=tmp_path)
    assert multi.returncode == 0, multi.stderr
    a, b = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
            for run in ("single", "multi"))
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-9)
        assert rb["optimizer"]["step_norm"] == pytest.approx(ra["optimizer"]["step_norm"])
    assert b[-1]["optimizer"]["step_norm"][0] == pytest.approx(0.02 * 0.5 ** 3 * math.sqrt(35))
    assert len(b[0]["busy_fraction"]) == 3  # it ran on the engine, one process per stage
    assert "step " in multi.stdout  # the plain progress line shows the metric

    trace = json.loads((tmp_path / "multi" / "trace.json").read_text())
    assert sum(e.get("name") == "Q" for e in trace["traceEvents"]) == 3 * 4
    assert (tmp_path / "multi" / "timeline.png").is_file()
    grid = run_here("schedule", str(path), cwd=tmp_path)
    assert grid.returncode == 0, grid.stderr
    assert "stage 0: F0 F1 B1 B0 Q A" in grid.stdout
    assert " Q " in grid.stdout.split("\n\n", 1)[1]  # in the grid's cells too

    bad = run_here("validate", str(path), "--set", "optimizer.step_decay=2", cwd=tmp_path)
    assert bad.returncode == 2 and "optimizer.step_decay: must be <= 1" in bad.stderr


def test_a_plugins_kinds_are_named_in_the_timelines_legend(tmp_path: Path) -> None:
    from sm_dist.pipeline.timeline import TimelineEvent
    from sm_dist.report.plots import _legend_entries

    events = {TimelineEvent(0, 1, "F", 0, 0.0, 1.0).kind, SIGN_STEP}
    labels = [label for _, label in _legend_entries(events)]
    assert any("Q sign step" in label for label in labels)


def test_an_option_of_another_optimizer_is_named() -> None:
    registry.register(SignGD)
    with pytest.raises(ConfigError, match="'step_decay' is an option of .*sign_gd, not of sm"):
        job_from_dict(synthetic_job(optimizer={"step_decay": 0.5}))


def test_an_optimizer_that_cannot_be_imported_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="optimizer.name: cannot import optimizer 'nowhere:X'"):
        job_from_dict(toy_job("nowhere:X"))
    with pytest.raises(ConfigError, match="not an sm_dist.optim.base.Optimizer subclass"):
        job_from_dict(toy_job("tests.test_optim_plugin:toy_job"))
