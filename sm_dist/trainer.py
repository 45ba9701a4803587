"""The training loop: one iteration per batch, the same for every pipeline and optimizer."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from sm_dist.config import JobConfig
from sm_dist.data import BatchStream, Dataset, split_microbatches
from sm_dist.local_pipeline import BatchResult, Microbatches
from sm_dist.math.line_search import ArmijoRule, armijo_backtrack
from sm_dist.updates import StageUpdateReport

Record = dict[str, Any]


class Pipeline(Protocol):
    """What the loop needs from a pipeline, in-process or distributed."""

    def forward_backward(self, microbatches: Microbatches, n: int,
                         same_batch: bool) -> BatchResult: ...
    def sm_update(self, inner_steps: int) -> list[StageUpdateReport]: ...
    def optimizer_step(self) -> None: ...
    def grad_sq_norm(self) -> float: ...
    def trial_loss(self, alpha: float, microbatches: Microbatches, n: int) -> BatchResult: ...
    def end_trial(self, accept: bool) -> None: ...
    def end_iteration(self) -> None: ...
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, int]: ...


@dataclass
class PassCounter:
    """Pipeline passes over the batch so far (one pass = every microbatch through every stage)."""

    forward: int = 0
    backward: int = 0


class GlobalArmijo:
    """GD+Armijo: θ ← θ − α∇h; each trial α is a forward-only pass; α doubles per iteration."""

    def __init__(self, job: JobConfig) -> None:
        cfg = job.optimizer
        self.rule = ArmijoRule(c=cfg.armijo_c, beta=cfg.armijo_beta)
        self.next_step = cfg.armijo_init

    def step(self, pipeline: Pipeline, microbatches: Microbatches, n: int,
             loss: float) -> Record:
        grad_sq = pipeline.grad_sq_norm()
        result = armijo_backtrack(lambda a: pipeline.trial_loss(a, microbatches, n).loss,
                                  loss, grad_sq, self.next_step, self.rule)
        # The last trial evaluated is the accepted one, so its parameters are already in place.
        pipeline.end_trial(result.accepted)
        if result.accepted:
            self.next_step = 2.0 * result.step
        return {"step_size": result.step if result.accepted else 0.0,
                "line_search_trials": result.trials, "grad_norm": math.sqrt(grad_sq)}


def train(job: JobConfig, pipeline: Pipeline, data: Dataset,
          on_record: Callable[[Record], None]) -> list[Record]:
    """Run job.run.iterations iterations; `on_record` gets each iteration's metrics as it ends."""
    opt, run = job.optimizer, job.run
    stream = BatchStream(data.train_x, data.train_y, job.data.batch, shuffle=job.data.shuffle,
                         seed=run.seed)
    armijo = GlobalArmijo(job) if opt.name == "gd_armijo" else None
    passes = PassCounter()
    records: list[Record] = []
    previous: Record | None = None
    start = time.perf_counter()
    for iteration in range(1, run.iterations + 1):
        began = time.perf_counter()
        x, y, same_batch = stream.next_batch()
        microbatches = split_microbatches(x, y, job.data.microbatches)
        measured = pipeline.forward_backward(microbatches, len(x), same_batch)
        passes.forward += 1
        passes.backward += 1
        record: Record = {"iteration": iteration, "train_loss": measured.loss,
                          "train_acc": measured.correct / measured.samples}
        if opt.name == "sm":
            reports = pipeline.sm_update(opt.inner_steps)
            record.update(sm_fields(reports))
        elif armijo is not None:
            extra = armijo.step(pipeline, microbatches, len(x), measured.loss)
            passes.forward += extra["line_search_trials"]
            record.update(extra)
        else:
            pipeline.optimizer_step()
        pipeline.end_iteration()
        if previous is not None and same_batch and "predicted_decrease" in previous:
            actual = measured.loss - previous["train_loss"]
            predicted = previous["predicted_decrease"]
            record["actual_decrease_prev"] = actual
            record["decrease_ratio_prev"] = actual / predicted if predicted else None
        if (run.eval_every and iteration % run.eval_every == 0) or iteration == run.iterations:
            loss_sum, correct = pipeline.evaluate(data.test_x, data.test_y)
            record["test_loss"] = loss_sum / len(data.test_x)
            record["test_acc"] = correct / len(data.test_x)
        now = time.perf_counter()
        record.update(wall_time=now - start, iteration_time=now - began,
                      forward_passes=passes.forward, backward_passes=passes.backward)
        records.append(record)
        on_record(record)
        previous = record
    return records


def sm_fields(reports: list[StageUpdateReport]) -> Record:
    """The SM part of an iteration's record, one list entry per stage."""
    values = [r.local_loss for r in reports]
    return {
        "predicted_decrease": sum(v for v in values if v is not None),
        "inner_steps": [r.inner_steps for r in reports],
        "local_loss": values,
        "curvature": [r.curvature_sent for r in reports],
        "psi_products": [r.psi_products for r in reports],
        "inner_stopped": [r.stopped for r in reports],
    }
