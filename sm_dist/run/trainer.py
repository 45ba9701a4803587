"""The training loop: one iteration per batch, the same for every pipeline and optimizer."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sm_dist.config.build import build_optimizer
from sm_dist.config.job import JobConfig
from sm_dist.data.batches import BatchStream, split_microbatches
from sm_dist.data.datasets import Dataset
from sm_dist.optim.base import Optimizer
from sm_dist.pipeline.interface import (
    IterationRequest,
    IterationResult,
    Pending,
    Pipeline,
    eval_chunks,
)
from sm_dist.pipeline.schedule import gpipe_schedule
from sm_dist.pipeline.timeline import iteration_utilisation
from sm_dist.run.checkpoints import ResumePoint
from sm_dist.run.metrics import Costs, IterationRecord

OnCheckpoint = Callable[[ResumePoint, list[dict[str, Any]]], None]


class NonFiniteLoss(RuntimeError):
    """Training stopped: the loss exploded or stopped being finite, or the parameters did
    (run.on_nonfinite)."""

    def __init__(self, iteration: int, what: str) -> None:
        super().__init__(iteration, what)
        self.iteration, self.what = iteration, what

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

    Iteration t+1 is submitted before t's result is read, so a distributed pipeline can start
    it as soon as stage 0 is free (an optimizer the coordinator steers cannot: its steps come
    after t's backward). A record is written once the next iteration's result is in, because
    the idle time a stage has after its update ends only when the next input reaches it.
    """
    optimizer = build_optimizer(job)
    steering = optimizer.steering()
    batches = BatchRequests(job, data, optimizer, evaluate_in_pass=steering is None)
    costs = Costs(hvp_products=[0] * pipeline.num_stages)
    first, previous, offset = 1, None, 0.0
    if resume is not None:
        batches.stream.load_state_dict(resume.stream)
        if steering is not None and resume.steering is not None:
            steering.load_state_dict(resume.steering)
        costs = copy.deepcopy(resume.costs)
        first, previous, offset = resume.iteration + 1, resume.last_record, resume.wall_time
    records = RecordKeeper(pipeline, on_record, keep_records)
    first_loss = resume.first_loss if resume is not None else None
    clock = Clock(offset)

    def checkpoint_and_submit(iteration: int, following: IterationRequest | None
                              ) -> tuple[Pending[list[Any]] | None, Pending[IterationResult]
                                         | None]:
        """The states after `iteration` (when one is due), then the next iteration."""
        every = job.run.checkpoint_every
        due = on_checkpoint is not None and (iteration == job.run.iterations
                                             or bool(every and iteration % every == 0))
        states = pipeline.checkpoint() if due else None
        return states, pipeline.submit(following) if following is not None else None

    pipeline.start_memory_measurement()  # peaks from here on are training's
    current = batches.request(first)
    pending = pipeline.submit(current)
    try:
        for iteration in range(first, job.run.iterations + 1):
            following = batches.request(iteration + 1) if iteration < job.run.iterations else None
            if steering is None:
                states, ahead = checkpoint_and_submit(iteration, following)
            result = pending.wait()
            costs.add_passes(1, min(r.backward_passes for r in result.reports),
                             max(r.tangents_started for r in result.reports))
            costs.add_products([r.hvp_products for r in result.reports])
            record = base_record(iteration, result, optimizer, pipeline.shares_process)
            record.epoch = batches.epochs_after(iteration)
            if steering is not None:
                steered = steering.step(pipeline, iteration, current.microbatches, current.n,
                                        result.batch.loss)
                costs.add_passes(steered.forward_passes, steered.backward_passes)
                update(record, steered.record)
                for prefix, x, y in batches.evaluations(iteration):
                    loss_sum, correct = pipeline.evaluate(iteration, x, y)
                    update(record, {f"{prefix}_loss": loss_sum / len(x),
                                    f"{prefix}_acc": correct / len(x)})
                states, ahead = checkpoint_and_submit(iteration, following)
            if (record.actual_decrease_prev is None and previous is not None
                    and current.same_batch and previous.predicted_decrease):
                actual = record.train_loss - previous.train_loss
                record.actual_decrease_prev = actual
                record.decrease_ratio_prev = actual / previous.predicted_decrease
            clock.stamp(record, costs)
            if on_progress is not None:
                on_progress(record)
            if first_loss is None:
                first_loss = record.train_loss
            diverged = job.run.on_nonfinite == "stop" and exploded(record.train_loss, first_loss)
            if states is not None and on_checkpoint is not None and not diverged:
                stage_states = states.wait()
                if job.run.on_nonfinite == "stop" and not finite_states(stage_states):
                    diverged = True  # keep the last finite checkpoint
                else:
                    point = ResumePoint(iteration, batches.state_after(iteration),
                                        steering.state_dict() if steering else None,
                                        copy.deepcopy(costs), record.wall_time,
                                        copy.copy(record), first_loss)
                    on_checkpoint(point, stage_states)
            batches.forget(iteration)
            records.push(record)
            if diverged:
                what = ("the model is not finite after the update"
                        if not exploded(record.train_loss, first_loss)
                        else "the training loss is not finite"
                        if not math.isfinite(record.train_loss)
                        else f"the training loss {record.train_loss:.3g} is over {EXPLODED:g} "
                             "times the first")
                raise NonFiniteLoss(iteration, what)
            previous, current, pending = record, following, ahead  # type: ignore[assignment]
    finally:
        records.flush()  # also on failure: every finished iteration is kept
    return records.done


class BatchRequests:
    """Each iteration's batch as a request to the pipeline, and the batch stream's state after
    it (kept until the iteration's checkpoint is written, then dropped)."""

    def __init__(self, job: JobConfig, data: Dataset, optimizer: Optimizer,
                 evaluate_in_pass: bool) -> None:
        self.job, self.data, self.optimizer = job, data, optimizer
        self.evaluate_in_pass = evaluate_in_pass  # else the coordinator evaluates afterwards
        self.stream = BatchStream(data.train_x, data.train_y, job.data.batch,
                                  shuffle=job.data.shuffle, seed=job.run.seed)
        self._states: dict[int, dict[str, Any]] = {}
        self._epochs: dict[int, float | None] = {}

    def evaluations(self, iteration: int) -> list[tuple[str, Tensor, Tensor]]:
        """The sets evaluated after `iteration`'s update, each with its record fields' prefix:
        the test set every run.eval_every iterations (a data set without one: never), the
        training set every run.eval_train_every; both after the last iteration."""
        def due(every: int) -> bool:
            return iteration == self.job.run.iterations or bool(every and iteration % every == 0)
        sets = []
        if len(self.data.test_x) and due(self.job.run.eval_every):
            sets.append(("test", self.data.test_x, self.data.test_y))
        if self.job.run.eval_train_every and due(self.job.run.eval_train_every):
            sets.append(("full_train", self.data.train_x, self.data.train_y))
        return sets

    def request(self, iteration: int) -> IterationRequest:
        x, y, same_batch = self.stream.next_batch()
        self._states[iteration] = self.stream.state_dict()
        last = iteration == self.job.run.iterations
        # An epoch's last minibatch may hold fewer samples than there are microbatches.
        microbatches = split_microbatches(x, y, min(self.job.data.microbatches, len(x)))
        sets = self.evaluations(iteration) if self.evaluate_in_pass else []
        chunks = [chunk for _, ex, ey in sets for chunk in eval_chunks(ex, ey)]
        test_chunks = len(eval_chunks(*sets[0][1:])) if sets and sets[0][0] == "test" else 0
        schedule = gpipe_schedule(self.optimizer.num_stages, len(microbatches),
                                  self.optimizer.update_actions(len(microbatches), last),
                                  len(chunks))
        self._epochs[iteration] = None if self.stream.full else self.stream.epochs_done()
        return IterationRequest(iteration, microbatches, len(x), same_batch, schedule,
                                chunks or None, test_chunks, last)

    def epochs_after(self, iteration: int) -> float | None:
        """Passes over the training set once `iteration`'s minibatch is taken (None: full)."""
        return self._epochs[iteration]

    def state_after(self, iteration: int) -> dict[str, Any]:
        return self._states[iteration]

    def forget(self, iteration: int) -> None:
        for done in [k for k in self._states if k <= iteration]:
            del self._states[done], self._epochs[done]


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
            update(record, {"iteration_time": use.duration, "busy_fraction": use.busy_fraction,
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
        update(record, {"wall_time": self.offset + now - self.start,
                        "iteration_time": now - self.last,
                        "forward_passes": costs.forward_passes,
                        "backward_passes": costs.backward_passes,
                        "tangent_passes": costs.tangent_passes,
                        "hvp_products": list(costs.hvp_products)})
        self.last = now


def update(record: IterationRecord, fields: dict[str, Any]) -> None:
    """Set record fields by name (each must be one of IterationRecord's)."""
    for key, value in fields.items():
        if not hasattr(record, key):
            raise AttributeError(f"IterationRecord has no field {key!r}")
        setattr(record, key, value)


def base_record(iteration: int, result: IterationResult, optimizer: Optimizer,
                shares_process: bool = False) -> IterationRecord:
    """What an iteration's forward pass, update and evaluation measured."""
    batch = result.batch
    record = IterationRecord(iteration, batch.loss, batch.correct / batch.samples)
    update(record, optimizer.record_fields(result.reports))
    if result.test is not None:
        loss_sum, correct, count = result.test
        record.test_loss, record.test_acc = loss_sum / count, correct / count
    if result.train is not None:
        loss_sum, correct, count = result.train
        record.full_train_loss, record.full_train_acc = loss_sum / count, correct / count
    update(record, memory_fields(result, shares_process))
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
