"""DDG (Huo et al. 2018): each stage steps with a gradient as old as its error signal would be
on a pipeline with delayed gradients (spec §6)."""

from __future__ import annotations

from collections import deque
from typing import Any

from torch import Tensor

from sm_dist.optim.base import Optimizer
from sm_dist.optim.torch_optimizers import SGD, TorchStageOptimizer
from sm_dist.pipeline.stage import Stage


class DelayedGradientStageOptimizer(TorchStageOptimizer):
    """Stage s of p (counting from 1) steps with the gradient it computed p − s iterations ago;
    it takes no step until it has a gradient that old. SGD with lr, momentum, weight_decay."""

    def __init__(self, owner: Optimizer, stage: Stage) -> None:
        super().__init__(owner, stage)
        self.delay = stage.num_stages - 1 - stage.index
        self.history: deque[list[Tensor]] = deque()

    def step(self) -> None:
        params = self.stage.params
        self.history.append([p.grad.detach().clone() for p in params])
        if len(self.history) <= self.delay:
            return
        for p, delayed in zip(params, self.history.popleft()):
            p.grad = delayed
        self.torch_optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.torch_optimizer.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.torch_optimizer.load_state_dict(state["optimizer"])
        device = self.stage.device
        self.history = deque([g.to(device) for g in grads] for grads in state["history"])


class DDG(SGD):
    name = "ddg"
    summary = "delayed gradients: stage s of p steps (SGD) with its gradient from p − s ago"
    stage_optimizer = DelayedGradientStageOptimizer
