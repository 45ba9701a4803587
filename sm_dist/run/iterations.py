"""Each iteration's batch, its pass through the pipeline, the coordinator's steering after it and
the checkpoint states after it: `Iterations.run_iteration`, the same for every pipeline and
optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from sm_dist.config.job import JobConfig
from sm_dist.data.batches import BatchStream, split_microbatches
from sm_dist.data.datasets import Dataset
from sm_dist.optim.base import Optimizer, SteeredStep
from sm_dist.pipeline.interface import (
    IterationRequest,
    IterationResult,
    Pending,
    Pipeline,
    eval_chunks,
)
from sm_dist.pipeline.schedule import gpipe_schedule


class BatchRequests:
    """Each iteration's batch as a request to the pipeline, and the batch stream's state after
    it (kept until the iteration's checkpoint is written, then dropped)."""

    def __init__(self, job: JobConfig, data: Dataset, optimizer: Optimizer) -> None:
        self.job, self.data, self.optimizer = job, data, optimizer
        self.evaluate_in_pass = True  # else the coordinator evaluates after steering
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
                                  len(chunks), self.optimizer.prepare_actions(len(microbatches)))
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


@dataclass
class Outcome:
    """What one iteration gave: its pass's result, what the steering after it did and passed,
    and the stages' checkpoint states after it (when one is due)."""

    result: IterationResult
    same_batch: bool
    steered: SteeredStep | None
    evaluations: dict[str, float]  # the steered optimizers' evaluations after their steps
    states: Pending[list[Any]] | None


class Iterations:
    """The iterations of a run, one `run_iteration` call each.

    Iteration t+1 is submitted before t's result is read, so that a distributed pipeline can
    start it as soon as stage 0 is free; an optimizer the coordinator steers cannot overlap
    (its steps come after t's backward), so its next iteration is submitted after them.
    """

    def __init__(self, job: JobConfig, pipeline: Pipeline, data: Dataset, optimizer: Optimizer,
                 checkpoints: bool, first: int) -> None:
        self.job, self.pipeline, self.checkpoints = job, pipeline, checkpoints
        self.batches = BatchRequests(job, data, optimizer)
        self.steering = optimizer.steering(minibatches=not self.batches.stream.full)
        self.batches.evaluate_in_pass = self.steering is None
        self.first = first
        self._current: IterationRequest | None = None
        self._pending: Pending[IterationResult] | None = None

    def numbers(self) -> range:
        return range(self.first, self.job.run.iterations + 1)

    def run_iteration(self, iteration: int) -> Outcome:
        """Iteration `iteration`'s result, its steering, and the next one under way."""
        if self._pending is None:  # the first: nothing is under way yet
            self._current = self.batches.request(iteration)
            self._pending = self.pipeline.submit(self._current)
        current, pending = self._current, self._pending
        assert current is not None
        last = iteration == self.job.run.iterations
        following = None if last else self.batches.request(iteration + 1)
        if self.steering is None:
            states, ahead = self._checkpoint_and_submit(iteration, following)
        result = pending.wait()
        steered, evaluations = None, {}
        if self.steering is not None:
            steered = self.steering.step(self.pipeline, iteration, current.microbatches,
                                         current.n, result.batch.loss)
            evaluations = self._evaluate(iteration)
            states, ahead = self._checkpoint_and_submit(iteration, following)
        self._current, self._pending = following, ahead
        return Outcome(result, current.same_batch, steered, evaluations, states)

    def _checkpoint_and_submit(self, iteration: int, following: IterationRequest | None
                               ) -> tuple[Pending[list[Any]] | None,
                                          Pending[IterationResult] | None]:
        """The states after `iteration` (when one is due), then the next iteration."""
        every = self.job.run.checkpoint_every
        due = self.checkpoints and (iteration == self.job.run.iterations
                                    or bool(every and iteration % every == 0))
        states = self.pipeline.checkpoint() if due else None
        return states, self.pipeline.submit(following) if following is not None else None

    def _evaluate(self, iteration: int) -> dict[str, float]:
        """The evaluations due after a steered iteration, as record fields."""
        fields = {}
        for prefix, x, y in self.batches.evaluations(iteration):
            loss_sum, correct = self.pipeline.evaluate(iteration, x, y)
            fields.update({f"{prefix}_loss": loss_sum / len(x), f"{prefix}_acc": correct / len(x)})
        return fields

    def state_dict(self, iteration: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the batch stream's state after `iteration`, the steering's state)."""
        steering = self.steering.state_dict() if self.steering is not None else None
        return self.batches.state_after(iteration), steering

    def load_state_dict(self, stream: dict[str, Any], steering: dict[str, Any] | None) -> None:
        self.batches.stream.load_state_dict(stream)
        if self.steering is not None and steering is not None:
            self.steering.load_state_dict(steering)
