"""The training loop: one iteration per batch, the same for every pipeline and optimizer."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from sm_dist.config.build import build_optimizer
from sm_dist.config.job import JobConfig
from sm_dist.data.datasets import Dataset
from sm_dist.optim.base import Optimizer
from sm_dist.pipeline.interface import IterationResult, Pipeline
from sm_dist.pipeline.timeline import iteration_utilisation
from sm_dist.run.checkpoints import ResumePoint
from sm_dist.run.iterations import Iterations, Outcome
from sm_dist.run.metrics import Costs, IterationRecord

OnCheckpoint = Callable[[ResumePoint, list[dict[str, Any]]], None]
RECORD_FIELDS = {f.name for f in dataclasses.fields(IterationRecord)} - {"optimizer"}


class NonFiniteLoss(RuntimeError):
    """Training stopped: the loss exploded or stopped being finite, or the parameters did
    (run.on_nonfinite)."""

    def __init__(self, iteration: int, what: str, loss: float | None = None) -> None:
        super().__init__(iteration, what, loss)
        self.iteration, self.what, self.loss = iteration, what, loss

    def __str__(self) -> str:
        return (f"{self.what} at iteration {self.iteration}: the optimizer diverged, so the "
                "run stopped (run.on_nonfinite: stop)")


EXPLODED = 1e4  # a training loss this many times the first is taken for a diverged run


def exploded(loss: float, first: float | None) -> bool:
    """Not finite, or more than EXPLODED times the run's first training loss."""
    return not math.isfinite(loss) or (first is not None and math.isfinite(first)
                                       and loss > EXPLODED * abs(first))


def finite_states(states: list[dict[str, Any]]) -> bool:
    """Whether every tensor of the stages' checkpoint states is finite."""
    def finite(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return not value.is_floating_point() or bool(torch.isfinite(value).all())
        if isinstance(value, dict):
            return all(finite(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return all(finite(v) for v in value)
        return not isinstance(value, float) or math.isfinite(value)
    return all(finite(state) for state in states)


def train(job: JobConfig, pipeline: Pipeline, data: Dataset,
          on_record: Callable[[IterationRecord], None],
          on_progress: Callable[[IterationRecord], None] | None = None,
          on_checkpoint: OnCheckpoint | None = None,
          resume: ResumePoint | None = None,
          keep_records: bool = True) -> list[IterationRecord]:
    """Run the job's iterations (after `resume.iteration` when resuming; the stages' states
    must be restored already). `on_record` gets each iteration's complete record,
    `on_progress` the same record earlier, as soon as its result is in (without utilisation),
    and `on_checkpoint` the states every run.checkpoint_every iterations and at the end.
    Returns every record (none with `keep_records` off: a long run writes them to disk).

    A record is written once the next iteration's result is in, because the idle time a
    stage has after its update ends only when the next input reaches it.
    """
    optimizer = build_optimizer(job)
    first = resume.iteration + 1 if resume is not None else 1
    iterations = Iterations(job, pipeline, data, optimizer, on_checkpoint is not None, first)
    log = RunLog(optimizer, pipeline, resume)
    if resume is not None:
        iterations.load_state_dict(resume.stream, resume.steering)
    records = RecordKeeper(pipeline, on_record, keep_records)
    pipeline.start_memory_measurement()  # peaks from here on are training's
    try:
        for iteration in iterations.numbers():
            outcome = iterations.run_iteration(iteration)
            record = log.record(iteration, outcome, iterations.batches.epochs_after(iteration))
            if on_progress is not None:
                on_progress(record)
            stop = log.divergence(job, record)
            records.push(record)  # first: a checkpoint that fails (a full disk) keeps it
            if outcome.states is not None and on_checkpoint is not None and stop is None:
                states = outcome.states.wait()
                if job.run.on_nonfinite == "stop" and not finite_states(states):
                    stop = "the model is not finite after the update"  # keep the last finite
                else:
                    on_checkpoint(log.resume_point(iteration, iterations, record), states)
            iterations.batches.forget(iteration)
            if stop is not None:
                raise NonFiniteLoss(iteration, stop, record.train_loss)
    except BaseException:
        with contextlib.suppress(OSError):  # the error in flight says more than a full disk
            records.flush()  # also on failure: every finished iteration is kept
        raise
    records.flush()
    return records.done


class RunLog:
    """What the loop keeps across iterations: the costs so far, the clock, the first training
    loss (the divergence rule's yardstick) and the previous record (the decrease it
    predicted)."""

    def __init__(self, optimizer: Optimizer, pipeline: Pipeline,
                 resume: ResumePoint | None) -> None:
        self.optimizer, self.pipeline = optimizer, pipeline
        self.costs = Costs(hvp_products=[0] * pipeline.num_stages)
        self.previous: IterationRecord | None = None
        self.first_loss: float | None = None
        offset = 0.0
        if resume is not None:
            self.costs = copy.deepcopy(resume.costs)
            self.previous, self.first_loss = resume.last_record, resume.first_loss
            offset = resume.wall_time
        self.clock = Clock(offset)

    def record(self, iteration: int, outcome: Outcome, epoch: float | None) -> IterationRecord:
        """The iteration's record: its pass, its steering, the costs and times so far."""
        result = outcome.result
        self.costs.add_passes(1, min(r.backward_passes for r in result.reports),
                              max(r.tangents_started for r in result.reports))
        self.costs.add_products([r.hvp_products for r in result.reports])
        record = base_record(iteration, result, self.optimizer, self.pipeline.shares_process)
        record.epoch = epoch
        if outcome.steered is not None:
            self.costs.add_passes(outcome.steered.forward_passes,
                                  outcome.steered.backward_passes)
            set_fields(record, outcome.steered.record, self.optimizer)
        set_fields(record, outcome.evaluations, self.optimizer)
        previous = self.previous
        if (record.actual_decrease_prev is None and previous is not None
                and outcome.same_batch and previous.predicted_decrease):
            actual = record.train_loss - previous.train_loss
            record.actual_decrease_prev = actual
            record.decrease_ratio_prev = actual / previous.predicted_decrease
        self.clock.stamp(record, self.costs)
        if self.first_loss is None:
            self.first_loss = record.train_loss
        self.previous = record
        return record

    def divergence(self, job: JobConfig, record: IterationRecord) -> str | None:
        """Why the run stops after this record (run.on_nonfinite: stop), or None."""
        loss = record.train_loss
        if job.run.on_nonfinite != "stop" or not exploded(loss, self.first_loss):
            return None
        if not math.isfinite(loss):
            return "the training loss is not finite"
        return f"the training loss {loss:.3g} is over {EXPLODED:g} times the first"

    def resume_point(self, iteration: int, iterations: Iterations,
                     record: IterationRecord) -> ResumePoint:
        stream, steering = iterations.state_dict(iteration)
        return ResumePoint(iteration, stream, steering, copy.deepcopy(self.costs),
                           record.wall_time, copy.copy(record), self.first_loss)


class RecordKeeper:
    """Finished records, each handed on one iteration late, when the next iteration's events
    complete its utilisation window."""

    def __init__(self, pipeline: Pipeline, on_record: Callable[[IterationRecord], None],
                 keep: bool = True) -> None:
        self.pipeline, self.on_record, self.keep = pipeline, on_record, keep
        self.done: list[IterationRecord] = []  # every record, when kept
        self._pending: IterationRecord | None = None

    def push(self, record: IterationRecord) -> None:
        self.flush()
        self._pending = record

    def flush(self) -> None:
        record, self._pending = self._pending, None
        if record is None:
            return
        # Only iterations t − 1 .. t + 1 can overlap iteration t's window: older events are
        # forgotten, which keeps the cost and the memory flat over a long run.
        events, t = self.pipeline.events, record.iteration
        events.forget_before(t - 1)
        use = iteration_utilisation(events, t, self.pipeline.num_stages)
        if use is not None:
            set_fields(record, {"iteration_time": use.duration,
                                "busy_fraction": use.busy_fraction,
                                "bubble_fraction": use.bubble_fraction,
                                "turnaround_idle": use.turnaround_idle,
                                "update_idle": use.update_idle})
        if self.keep:
            self.done.append(record)
        self.on_record(record)


class Clock:
    """Wall time since the start of the run (continued across a resume) and per iteration."""

    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.start = self.last = time.perf_counter()

    def stamp(self, record: IterationRecord, costs: Costs) -> None:
        now = time.perf_counter()
        set_fields(record, {"wall_time": self.offset + now - self.start,
                            "iteration_time": now - self.last,
                            "forward_passes": costs.forward_passes,
                            "backward_passes": costs.backward_passes,
                            "tangent_passes": costs.tangent_passes,
                            "hvp_products": list(costs.hvp_products)})
        self.last = now


def set_fields(record: IterationRecord, fields: dict[str, Any],
               optimizer: Optimizer | None = None) -> None:
    """Set record fields by name: the record's own, or (any other) its optimizer's section,
    each of which must be a field of the optimizer's Metrics."""
    section = {key: value for key, value in fields.items() if key not in RECORD_FIELDS}
    for key in fields.keys() - section.keys():
        setattr(record, key, fields[key])
    if section:
        if optimizer is None:
            raise AttributeError(f"IterationRecord has no field {next(iter(section))!r}")
        optimizer.Metrics.check(section)
        record.optimizer.update(section)


def base_record(iteration: int, result: IterationResult, optimizer: Optimizer,
                shares_process: bool = False) -> IterationRecord:
    """What an iteration's forward pass, update and evaluation measured."""
    batch = result.batch
    record = IterationRecord(iteration, batch.loss, batch.correct / batch.samples)
    set_fields(record, optimizer.record_fields(result.reports), optimizer)
    if result.test is not None:
        loss_sum, correct, count = result.test
        record.test_loss, record.test_acc = loss_sum / count, correct / count
    if result.train is not None:
        loss_sum, correct, count = result.train
        record.full_train_loss, record.full_train_acc = loss_sum / count, correct / count
    set_fields(record, memory_fields(result, shares_process))
    return record


def memory_fields(result: IterationResult, shares_process: bool) -> dict[str, Any]:
    """The record's memory figures in MiB (none where nothing could be read)."""
    readings = [m for m in result.memory or [] if m is not None]
    if not readings:
        return {}
    if shares_process:  # every stage read the same process: its latest reading is the peak
        readings = [max(readings, key=lambda m: m.peak)]
    mib = 1024.0 * 1024.0
    return {"peak_memory_mb": [round(m.peak / mib, 1) for m in readings],
            "training_memory_mb": [round(m.training / mib, 1) for m in readings],
            "memory_kind": "resident" if readings[0].resident else "cuda_allocated"}
