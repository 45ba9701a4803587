"""Adding an optimizer is one module and one registry line: a toy optimizer defined here
(sign-gradient descent), registered, trains through both pipelines and matches a direct
computation, without any change to sm_dist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sm_dist.config.build import build_local_pipeline, build_stage_modules, load_job_data
from sm_dist.config.job import ConfigError, job_from_dict
from sm_dist.optim import registry
from sm_dist.optim.base import Optimizer, StepRule
from sm_dist.pipeline.actions import Action, ActionKind
from sm_dist.pipeline.schedule import UpdateActions
from sm_dist.run.trainer import train
from tests.conftest import run_cli, synthetic_job, write_job

SPEC = "tests.test_optim_plugin:SignGD"  # how a job file names an optimizer outside sm_dist


class SignGDRule(StepRule):
    """θ_s ← θ_s − lr·sign(∂h/∂θ_s) on one stage."""

    def step(self) -> None:
        with torch.no_grad():
            for p in self.stage.params:
                p.sub_(self.config.lr * p.grad.sign())


class SignGD(Optimizer):
    name = "sign_gd"
    summary = "sign-gradient descent (a test of the optimizer interface)"
    rule = SignGDRule
    update_kinds = (ActionKind.APPLY,)
    sweep = "lr"

    def update_actions(self, num_microbatches: int, last: bool) -> UpdateActions:
        return lambda stage: [Action(ActionKind.APPLY)]


@pytest.fixture(autouse=True)
def restore_registry():
    """Registering is process-wide: leave the registry (and the schema's choices) as found."""
    names, known = list(registry.NAMES), dict(registry._REGISTRY)
    yield
    registry.NAMES[:] = names
    registry._REGISTRY.clear()
    registry._REGISTRY.update(known)


def toy_job(name: str) -> dict:
    return synthetic_job(optimizer={"name": name, "lr": 0.02},
                         run={"iterations": 4, "eval_every": 2})


def test_a_registered_optimizer_trains_in_one_process_as_written() -> None:
    registry.register(SignGD)
    job = job_from_dict(toy_job("sign_gd"))
    data = load_job_data(job)
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    records = train(job, pipeline, data, lambda r: None)

    model = torch.nn.Sequential(*build_stage_modules(job))  # the same start, stepped by hand
    params = list(model.parameters())
    losses = []
    for _ in range(job.run.iterations):
        loss = F.cross_entropy(model(data.train_x), data.train_y)
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.02 * g.sign())
    assert [r.train_loss for r in records] == pytest.approx(losses, rel=1e-12)
    assert losses[-1] < losses[0]
    mine = [p for stage in pipeline.stages for p in stage.params]
    for a, b in zip(mine, params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    assert "sign_gd" in registry.NAMES and registry.names_sweeping("lr")[-1] == "sign_gd"


@pytest.mark.slow  # the default run has the single-process plugin tests
def test_an_optimizer_named_by_its_module_trains_through_the_engine(tmp_path: Path) -> None:
    """Every stage process imports the optimizer from the job file's 'module:Class' name."""
    path = write_job(tmp_path / "job.yaml", toy_job(SPEC))
    single = run_cli("train", str(path), "--single-process", "--out", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    multi = run_cli("train", str(path), "--no-live", "--out", "multi", cwd=tmp_path)
    assert multi.returncode == 0, multi.stderr
    a, b = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
            for run in ("single", "multi"))
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-9)
    assert b[-1]["train_loss"] < b[0]["train_loss"]
    assert len(b[0]["busy_fraction"]) == 3  # it ran on the engine, one process per stage


def test_an_optimizer_that_cannot_be_imported_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="optimizer.name: cannot import optimizer 'nowhere:X'"):
        job_from_dict(toy_job("nowhere:X"))
    with pytest.raises(ConfigError, match="not an sm_dist.optim.base.Optimizer subclass"):
        job_from_dict(toy_job("tests.test_optim_plugin:toy_job"))
