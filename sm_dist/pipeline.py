"""What the training loop asks of a pipeline, in one process or many: requests and results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from sm_dist.config import STEERED_OPTIMIZERS, InnerStepsConfig, OptimizerConfig
from sm_dist.schedule import UpdatePhase
from sm_dist.timeline import TimelineEvent
from sm_dist.updates import StageUpdateReport

Microbatches = list[tuple[Tensor, Tensor]]
EVAL_CHUNK = 8192  # rows per forward-only evaluation chunk


@dataclass
class BatchResult:
    """What one forward pass measured: h at the iterate (Σ ℓ / n) and the correct predictions."""

    loss: float
    correct: int
    samples: int


@dataclass
class IterationRequest:
    """One training iteration: forward and backward of a batch, the update, maybe evaluation."""

    iteration: int
    microbatches: Microbatches
    n: int  # samples in the batch: the loss is Σ ℓ / n
    same_batch: bool  # the same samples as the previous iteration (power-iteration warm start)
    update: UpdatePhase
    eval_data: tuple[Tensor, Tensor] | None = None  # after the update
    last: bool = False  # no iteration follows: nothing to wait for, so no bubble to fill


@dataclass
class IterationResult:
    batch: BatchResult
    reports: list[StageUpdateReport]  # one per stage
    test: tuple[float, int, int] | None = None  # (Σ loss, correct, samples) after the update


class PendingIteration(Protocol):
    def wait(self) -> IterationResult: ...


class Pipeline(Protocol):
    """A pipeline of stages as the training loop drives it."""

    num_stages: int
    events: list[TimelineEvent]  # what each stage did when (empty in one process)

    def submit(self, request: IterationRequest) -> PendingIteration: ...
    def checkpoint(self) -> Pending: ...  # every stage's state after what was submitted so far
    def restore_checkpoint(self, states: list[dict[str, Any]]) -> None: ...
    def grad_sq_norm(self) -> float: ...
    def trial_loss(self, iteration: int, alpha: float, microbatches: Microbatches,
                   n: int, surrogate: bool = False) -> BatchResult: ...
    def end_trial(self, iteration: int, accept: bool) -> None: ...
    def take_step(self, iteration: int, alpha: float) -> None: ...
    def surrogate_pass(self, iteration: int, microbatches: Microbatches,
                       n: int) -> BatchResult: ...
    def evaluate(self, iteration: int, x: Tensor, y: Tensor) -> tuple[float, int]: ...
    def state_dicts(self) -> list[dict[str, Tensor]]: ...


class Pending(Protocol):
    def wait(self) -> Any: ...


class Done:
    """A result that is already there (the in-process pipeline)."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def wait(self) -> Any:
        return self.result


def update_phase(cfg: OptimizerConfig, last: bool = False) -> UpdatePhase:
    """The update phase an optimizer runs after each backward (GD+Armijo and SSO: none, the
    coordinator steers their steps pass by pass)."""
    if cfg.name in STEERED_OPTIMIZERS:
        return UpdatePhase("none")
    if cfg.name == "cgblock":
        assert isinstance(cfg.inner_steps, int)
        return UpdatePhase("cgblock", cfg.inner_steps)
    if cfg.name != "sm":
        return UpdatePhase("step")
    steps = cfg.inner_steps
    if isinstance(steps, InnerStepsConfig):
        fill = steps.max - steps.min if steps.fill_bubbles and not last else 0
        return UpdatePhase("sm", steps.min, fill)
    return UpdatePhase("sm", steps, 0)


def eval_chunks(x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    return [(x[i:i + EVAL_CHUNK], y[i:i + EVAL_CHUNK]) for i in range(0, len(x), EVAL_CHUNK)]
