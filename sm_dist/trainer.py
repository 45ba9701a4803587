"""The training loop: one iteration per batch, the same for every pipeline and optimizer."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sm_dist.checkpoints import ResumePoint
from sm_dist.config import JobConfig
from sm_dist.data import BatchStream, Dataset, split_microbatches
from sm_dist.pipeline import IterationRequest, IterationResult, Pipeline, update_phase
from sm_dist.steered import make_steered
from sm_dist.timeline import TimelineEvent, iteration_utilisation
from sm_dist.updates import StageUpdateReport

Record = dict[str, Any]


def train(job: JobConfig, pipeline: Pipeline, data: Dataset,
          on_record: Callable[[Record], None],
          on_progress: Callable[[Record], None] | None = None,
          on_checkpoint: Callable[[ResumePoint, list[dict[str, Any]]], None] | None = None,
          resume: ResumePoint | None = None) -> list[Record]:
    """Run the job's iterations (after `resume.iteration` when resuming; the stages' states
    must be restored already). `on_record` gets each iteration's complete metrics,
    `on_progress` the same record earlier, as soon as its result is in (without utilisation),
    and `on_checkpoint` the states every run.checkpoint_every iterations and at the end.

    Iteration t+1 is submitted before t's result is read, so a distributed pipeline can start
    it as soon as stage 0 is free (GD+Armijo and SSO cannot: the coordinator steers their
    steps after t's backward, see sm_dist/steered.py). A record is
    written once the next iteration's result is in, because the idle time a stage has after
    its update ends only when the next iteration's input reaches it.
    """
    opt, run = job.optimizer, job.run
    stream = BatchStream(data.train_x, data.train_y, job.data.batch, shuffle=job.data.shuffle,
                         seed=run.seed)
    steered = make_steered(job, pipeline.num_stages)
    # Cumulative costs: pipeline passes of the batch (forward, backward, CGBlock's tangent
    # passes) and each stage's second-order products.
    passes: dict[str, Any] = {"forward": 0, "backward": 0, "tangent": 0,
                              "hvp": [0] * pipeline.num_stages}
    first, previous, offset = 1, None, 0.0
    if resume is not None:
        stream.load_state_dict(resume.stream)
        if steered is not None and resume.armijo_step is not None:
            steered.next_step = resume.armijo_step
        passes.update(resume.passes)
        first, previous, offset = resume.iteration + 1, resume.last_record, resume.wall_time
    records: list[Record] = []
    stream_after: dict[int, dict[str, Any]] = {}
    pending_record: Record | None = None
    start = last_time = time.perf_counter()

    def request(iteration: int) -> IterationRequest:
        x, y, same_batch = stream.next_batch()
        stream_after[iteration] = stream.state_dict()
        last = iteration == run.iterations
        evaluate = last or bool(run.eval_every and iteration % run.eval_every == 0)
        return IterationRequest(
            # An epoch's last minibatch may hold fewer samples than there are microbatches.
            iteration, split_microbatches(x, y, min(job.data.microbatches, len(x))), len(x),
            same_batch,
            update_phase(opt, last),
            (data.test_x, data.test_y) if evaluate and steered is None else None, last)

    recent = 0  # index of the first event of iteration t − 1 or later in pipeline.events

    def flush(record: Record | None) -> None:
        nonlocal recent
        if record is None:
            return
        # Only iterations t − 1 .. t + 1 can overlap iteration t's window; events arrive in
        # iteration order, so skipping older ones keeps this cost flat over a long run.
        events, t = pipeline.events, record["iteration"]
        while recent < len(events) and events[recent].iteration < t - 1:
            recent += 1
        add_utilisation(record, events[recent:], pipeline.num_stages)
        records.append(record)
        on_record(record)

    def checkpoint_due(iteration: int) -> bool:
        every = run.checkpoint_every
        return on_checkpoint is not None and (
            iteration == run.iterations or bool(every and iteration % every == 0))

    current = request(first)
    pending = pipeline.submit(current)
    try:
        for iteration in range(first, run.iterations + 1):
            following = request(iteration + 1) if iteration < run.iterations else None
            states = None
            if steered is None:  # the states after this iteration, before the next one starts
                states = pipeline.checkpoint() if checkpoint_due(iteration) else None
                ahead = pipeline.submit(following) if following else None
            result = pending.wait()
            add_costs(passes, result)
            record = base_record(iteration, result)
            if steered is not None:
                done = steered.step(pipeline, iteration, current.microbatches, current.n,
                                    result.batch.loss)
                passes["forward"] += done.forward_passes
                passes["backward"] += done.backward_passes
                record.update(done.record)
                if current.last or (run.eval_every and iteration % run.eval_every == 0):
                    loss_sum, correct = pipeline.evaluate(iteration, data.test_x, data.test_y)
                    record.update(test_loss=loss_sum / len(data.test_x),
                                  test_acc=correct / len(data.test_x))
                states = pipeline.checkpoint() if checkpoint_due(iteration) else None
                ahead = pipeline.submit(following) if following else None
            if previous is not None and current.same_batch and previous.get("predicted_decrease"):
                actual = record["train_loss"] - previous["train_loss"]
                record["actual_decrease_prev"] = actual
                record["decrease_ratio_prev"] = actual / previous["predicted_decrease"]
            now = time.perf_counter()
            record.update(wall_time=offset + now - start, iteration_time=now - last_time,
                          forward_passes=passes["forward"], backward_passes=passes["backward"],
                          tangent_passes=passes["tangent"], hvp_products=list(passes["hvp"]))
            last_time = now
            if on_progress is not None:
                on_progress(record)
            if states is not None and on_checkpoint is not None:
                point = ResumePoint(iteration, stream_after[iteration],
                                    steered.next_step if steered else None,
                                    {**passes, "hvp": list(passes["hvp"])},
                                    record["wall_time"], dict(record))
                on_checkpoint(point, states.wait())
            flush(pending_record)
            pending_record = previous = record
            current, pending = following, ahead  # type: ignore[assignment]
    finally:
        flush(pending_record)  # also on failure: every finished iteration is kept
    return records


def add_costs(passes: dict[str, Any], result: IterationResult) -> None:
    """Add an iteration's forward and backward pass, its tangent passes and its products."""
    passes["forward"] += 1
    passes["backward"] += 1
    passes["tangent"] += max(r.tangents_started for r in result.reports)
    passes["hvp"] = [total + r.hvp_products for total, r in zip(passes["hvp"], result.reports,
                                                                 strict=True)]


def base_record(iteration: int, result: IterationResult) -> Record:
    batch = result.batch
    record: Record = {"iteration": iteration, "train_loss": batch.loss,
                      "train_acc": batch.correct / batch.samples}
    if any(r.inner_steps or r.local_loss is not None for r in result.reports):
        record.update(sm_fields(result.reports))
    if result.test is not None:
        loss_sum, correct, count = result.test
        record.update(test_loss=loss_sum / count, test_acc=correct / count)
    return record


def add_utilisation(record: Record, events: list[TimelineEvent], num_stages: int) -> None:
    """Busy fraction per stage, the bubble fraction and where the idle time sat."""
    use = iteration_utilisation(events, record["iteration"], num_stages)
    if use is None:
        return
    record.update(iteration_time=use.duration, busy_fraction=use.busy_fraction,
                  bubble_fraction=use.bubble_fraction, turnaround_idle=use.turnaround_idle,
                  update_idle=use.update_idle)


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
