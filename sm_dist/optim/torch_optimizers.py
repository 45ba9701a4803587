"""GD with a constant step, SGD and Adam: torch's optimizers on each stage's parameters (what
people run on GPipe today), each stage stepping after its own last backward."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from sm_dist.optim.base import Optimizer, StageReport, StepRule
from sm_dist.pipeline.actions import Action, ActionKind
from sm_dist.pipeline.schedule import UpdateActions
from sm_dist.pipeline.stage import Stage


class TorchOptimizerRule(StepRule):
    """One torch optimizer over this stage's parameters, stepped at `A`."""

    def __init__(self, optimizer: Optimizer, stage: Stage) -> None:
        super().__init__(optimizer, stage)
        assert isinstance(optimizer, TorchOptimizer)
        self.torch_optimizer = optimizer.build(stage.params)

    def step(self) -> None:
        self._report = StageReport(grad_sq_norm=self.stage.grad_sq_norm())
        self.torch_optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.torch_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.torch_optimizer.load_state_dict(state)


class TorchOptimizer(Optimizer):
    """An optimizer whose update is a torch optimizer's step on every stage."""

    rule: ClassVar[type[TorchOptimizerRule]] = TorchOptimizerRule
    update_kinds = (ActionKind.APPLY,)
    sweep = "lr"

    def build(self, params: list[Tensor]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def update_actions(self, num_microbatches: int, last: bool) -> UpdateActions:
        return lambda stage: [Action(ActionKind.APPLY)]

    def record_fields(self, reports: list[StageReport]) -> dict[str, Any]:
        """The gradient norm the step used, over every stage."""
        squares = [r.grad_sq_norm for r in reports]
        if any(square is None for square in squares):
            return {}
        return {"grad_norm": math.sqrt(sum(squares))}  # type: ignore[arg-type]


class GD(TorchOptimizer):
    name = "gd"
    summary = "gradient descent with the constant step lr (the paper's simplest baseline)"

    def build(self, params: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.config.lr)


class SGD(TorchOptimizer):
    name = "sgd"
    summary = "torch.optim.SGD with lr, momentum and weight_decay"

    def build(self, params: list[Tensor]) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)


class Adam(TorchOptimizer):
    name = "adam"
    summary = "torch.optim.Adam with lr, betas, eps and weight_decay"

    def build(self, params: list[Tensor]) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                                eps=cfg.eps, weight_decay=cfg.weight_decay)
