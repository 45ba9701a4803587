"""GD with a constant step, SGD and Adam: torch's optimizers on each stage's parameters (what
people run on GPipe today), each stage stepping after its own last backward."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from sm_dist.optim.base import Optimizer, StageReport, StepStageOptimizer
from sm_dist.optim.metrics import OptimizerMetrics, metric
from sm_dist.optim.options import LearningRateOptions
from sm_dist.pipeline.actions import APPLY, Action
from sm_dist.pipeline.schedule import UpdateActions
from sm_dist.pipeline.stage import Stage


@dataclass(kw_only=True)
class SGDOptions(LearningRateOptions):
    """torch.optim.SGD's momentum and weight decay."""
    momentum: float = field(default=0.0, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})


@dataclass(kw_only=True)
class AdamOptions(LearningRateOptions):
    """torch.optim.Adam's moments, ε and weight decay."""
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata={"length": 2, "min": 0, "lt": 1})
    eps: float = field(default=1e-8, metadata={"gt": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})


@dataclass
class GradientMetrics(OptimizerMetrics):
    """The norm of the gradient the step used, over every stage."""

    grad_norm: float | None = metric("grad norm", format=".3e")


class TorchStageOptimizer(StepStageOptimizer):
    """One torch optimizer over this stage's parameters, stepped at `A`."""

    def __init__(self, owner: Optimizer, stage: Stage) -> None:
        super().__init__(owner, stage)
        assert isinstance(owner, TorchOptimizer)
        self.torch_optimizer = owner.build(stage)

    def step(self) -> None:
        self._report = StageReport(grad_sq_norm=self.stage.grad_sq_norm())
        self.optimizer_step()

    def optimizer_step(self) -> None:
        """The torch optimizer's step (a peer runs it on the stage's own random streams)."""
        self.torch_optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.torch_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.torch_optimizer.load_state_dict(state)


class TorchOptimizer(Optimizer):
    """An optimizer whose update is a torch optimizer's step on every stage."""

    Options: ClassVar[type[LearningRateOptions]] = LearningRateOptions
    Metrics = GradientMetrics
    stage_optimizer: ClassVar[type[TorchStageOptimizer]] = TorchStageOptimizer
    kinds = (APPLY,)
    sweep = "lr"

    def build(self, stage: Stage) -> torch.optim.Optimizer:
        """The torch optimizer of `stage`'s parameters."""
        raise NotImplementedError

    def update_actions(self, num_microbatches: int, last: bool) -> UpdateActions:
        return lambda stage: [Action(APPLY)]

    def record_fields(self, reports: list[StageReport]) -> dict[str, Any]:
        """The gradient norm the step used, over every stage."""
        squares = [r.grad_sq_norm for r in reports]
        if any(square is None for square in squares):
            return {}
        return {"grad_norm": math.sqrt(sum(squares))}  # type: ignore[arg-type]

    def monitor_notes(self) -> list[str]:
        """Its lr is constant: the job's value is the one every step used."""
        return [f"lr {self.config.lr:g}"]  # type: ignore[attr-defined]


class GD(TorchOptimizer):
    name = "gd"
    summary = "gradient descent with the constant step lr (the paper's simplest baseline)"

    def build(self, stage: Stage) -> torch.optim.Optimizer:
        return torch.optim.SGD(stage.params, lr=self.config.lr)  # type: ignore[attr-defined]


class SGD(TorchOptimizer):
    name = "sgd"
    summary = "torch.optim.SGD with lr, momentum and weight_decay"
    Options = SGDOptions

    def build(self, stage: Stage) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.SGD(stage.params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)


class Adam(TorchOptimizer):
    name = "adam"
    summary = "torch.optim.Adam with lr, betas, eps and weight_decay"
    Options = AdamOptions

    def build(self, stage: Stage) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.Adam(stage.params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                                eps=cfg.eps, weight_decay=cfg.weight_decay)
