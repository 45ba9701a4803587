"""Whole SM iterations: N = 1 fixed-step SM is GD, and the first loss is ln(classes) (spec §3)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sm_dist.config.build import build_local_pipeline, build_stage_modules, load_job_data
from sm_dist.config.job import JobConfig
from sm_dist.data.batches import split_microbatches
from sm_dist.optim.sm import SMStageOptimizer
from sm_dist.optim.torch_optimizers import TorchStageOptimizer
from sm_dist.pipeline.local import LocalPipeline
from sm_dist.run.trainer import train
from tests.helpers_math import LN10, flat, make_job


def all_params(pipeline: LocalPipeline) -> Tensor:
    return flat([p for stage in pipeline.stages for p in stage.params]).clone()


def iterate_directly(job: JobConfig, iterations: int) -> tuple[list[float], list[Tensor]]:
    """Full-batch iterations driven through the stages' own update rules: losses and iterates."""
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    data = load_job_data(job)
    microbatches = split_microbatches(data.train_x, data.train_y, job.data.microbatches)
    losses, iterates = [], []
    for iteration in range(iterations):
        result = pipeline.forward_backward(microbatches, len(data.train_x), iteration > 0)
        losses.append(result.loss)
        for stage in pipeline.stages:
            part = stage.optimizer
            if isinstance(part, SMStageOptimizer):
                part.begin()
                assert part.step(job.optimizer.inner_steps) == 1
                assert part.finish().inner_steps == 1
            else:
                assert isinstance(part, TorchStageOptimizer)
                part.step()
        pipeline.end_iteration()
        iterates.append(all_params(pipeline))
    return losses, iterates


def train_job(job: JobConfig) -> tuple[list[dict], Tensor]:
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    records = train(job, pipeline, load_job_data(job), lambda record: None)
    return records, all_params(pipeline)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("microbatches", [1, 3])
def test_sm_one_fixed_gd_step_is_gradient_descent(activation: str, microbatches: int) -> None:
    """N = 1, gd_armijo inner solver, inner_lr = α: θ_s ← θ_s − α ∂h/∂θ_s, as plain GD."""
    common: dict[str, Any] = {
        "model": {"mlp": {"activation": activation}},
        "data": {"microbatches": microbatches},
        "run": {"iterations": 4, "eval_every": 0},
    }
    lr = 0.3
    sm_job = make_job(optimizer={"name": "sm", "inner_solver": "gradient", "inner_steps": 1,
                                 "inner_lr": lr}, **common)
    gd_job = make_job(optimizer={"name": "gd", "lr": lr}, **common)
    sm_losses, sm_iterates = iterate_directly(sm_job, 4)
    gd_losses, gd_iterates = iterate_directly(gd_job, 4)
    initial = flat([p for m in build_stage_modules(sm_job) for p in m.parameters()])
    assert float((sm_iterates[0] - initial).norm()) > 1e-3  # the iterate moved
    for a, b in zip(sm_iterates, gd_iterates):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert sm_losses == pytest.approx(gd_losses, rel=1e-12)
    assert sm_losses[-1] < sm_losses[0]

    # The same through the training loop.
    sm_records, sm_final = train_job(sm_job)
    gd_records, gd_final = train_job(gd_job)
    torch.testing.assert_close(sm_final, sm_iterates[-1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gd_final, sm_final, rtol=1e-12, atol=1e-15)
    assert [r.train_loss for r in sm_records] == pytest.approx(sm_losses, rel=1e-12)
    assert [r.train_loss for r in gd_records] == pytest.approx(sm_losses, rel=1e-12)
    assert sm_records[0].metric("inner_steps") == [1, 1, 1]


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("balance", [[1, 1], [2]])
def test_first_loss_of_fresh_ten_class_classifier_is_ln10(activation: str,
                                                          balance: list[int]) -> None:
    job = make_job(model={"mlp": {"widths": [20, 32, 10], "activation": activation},
                          "balance": balance},
                   data={"microbatches": 4, "synthetic": {"features": 20, "classes": 10,
                                                          "train_size": 256}},
                   optimizer={"inner_steps": 2})
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    data = load_job_data(job)
    model = torch.nn.Sequential(*[stage.module for stage in pipeline.stages])
    with torch.no_grad():
        direct = float(F.cross_entropy(model(data.train_x), data.train_y))
    records = train(job, pipeline, data, lambda record: None)
    first = records[0].train_loss
    assert first == pytest.approx(direct, rel=1e-12)
    assert abs(first - LN10) < 0.05
