"""Stage: one pipeline stage's layers, its microbatch forward and backward, and its hooks.

The stage is generic: what its backward keeps, what the top of the pipeline computes and what
its update actions do belong to the optimizer's part on this stage (a `StageOptimizer`), attached
as `stage.optimizer` by `sm_dist.config.build`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from sm_dist.math.losses import LossSpec, TopOfPipeline
from sm_dist.math.stage_function import trainable_parameters
from sm_dist.pipeline.actions import ActionKind
from sm_dist.pipeline.memory import MemoryProbe


def to_cpu(value: Any) -> Any:
    """A copy of nested containers with every tensor on the CPU (for checkpoints)."""
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


@dataclass
class MicrobatchStash:
    """What a stage keeps of one microbatch between its forward and its backward."""

    z_in: Tensor  # requires grad on every stage but the first
    out: Tensor  # the output, with its autograd graph when `recorded`
    y: Tensor | None = None  # labels, on the last stage only
    recorded: bool = True  # False: the forward ran without a graph; the backward reruns it


class StageOptimizer(Protocol):
    """An optimizer's part on one stage: what it adds to the stage's forward and backward, and
    what it does in its own actions (implemented by `sm_dist.optim.base.BaseStageOptimizer`)."""

    def top_of_pipeline(self, j: int, out: Tensor, y: Tensor, n: int,
                        mode: str) -> TopOfPipeline: ...
    def evaluate_top(self, j: int, z: Tensor, y: Tensor, mode: str) -> tuple[float, int]: ...
    def backward(self, j: int, entry: MicrobatchStash, g_out: Tensor, c_out: Tensor | None,
                 same_batch: bool) -> tuple[Tensor | None, Tensor | None]: ...
    def sends_curvature(self) -> bool: ...
    def keeps_forward_graph(self) -> bool: ...
    # Notes: small values an optimizer sends along with the pipeline's own messages (up with
    # each forward, down with each backward, the top of the pipeline starting the latter).
    def forward_note(self, j: int) -> Any: ...
    def take_forward_note(self, j: int, note: Any) -> None: ...
    def backward_note(self, j: int, same_batch: bool) -> Any: ...
    def take_backward_note(self, j: int, note: Any) -> None: ...
    def note_arrived(self, note: Any) -> None: ...
    def release_held(self) -> dict[int, Tensor]: ...
    def skips_backward(self) -> bool:
        """Whether this iteration's backward does nothing (the timeline says 'skipped')."""
    def backward_split(self) -> tuple[float, float] | None:
        """Seconds of the last backward's input and weight halves, when it was split."""
    def after_backward(self) -> None:
        """After a pass's last backward (with replicas: sum the gradients over them)."""
    def handlers(self) -> dict[ActionKind, Callable[..., str]]: ...
    def report(self) -> Any: ...
    def end_iteration(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stage:
    """One stage of the pipeline: its layers, its per-microbatch stash, its optimizer's part.

    The caller (the executor of a schedule) decides the order of the calls; the stage only
    knows how to run one microbatch forward or backward.
    """

    def __init__(self, index: int, num_stages: int, module: nn.Module, loss: LossSpec | None,
                 *, seed: int = 0) -> None:
        self.index = index
        self.num_stages = num_stages
        self.module = module
        self.loss = loss
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        if self.is_last and loss is None:
            raise ValueError("the last stage needs the loss")
        self.params = trainable_parameters(module)
        self.device = next(module.parameters()).device
        self.stash: dict[int, MicrobatchStash] = {}
        self.generator = torch.Generator().manual_seed(seed * 1000 + index)
        self._optimizer: StageOptimizer | None = None  # attached by sm_dist.config.build
        self.memory = MemoryProbe(self.device)

    @property
    def optimizer(self) -> StageOptimizer:
        """The optimizer's part on this stage."""
        assert self._optimizer is not None, "no optimizer attached to this stage"
        return self._optimizer

    @optimizer.setter
    def optimizer(self, part: StageOptimizer) -> None:
        self._optimizer = part

    # ----------------------------------------------------------------------------- forward
    def forward_microbatch(self, j: int, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Run f_s on microbatch j, keep what the backward needs, return the output (detached)."""
        z_in = x.to(self.device).detach().requires_grad_(not self.is_first)
        y = None if y is None else y.to(self.device)
        # An optimizer that rebuilds its graphs (SM's recompute) keeps only the input until the
        # backward: then one microbatch's graph is alive at a time instead of all of them.
        recorded = self.optimizer.keeps_forward_graph()
        with torch.set_grad_enabled(recorded):
            out = self.module(z_in)
        self.stash[j] = MicrobatchStash(z_in, out, y, recorded)
        return out.detach()

    def forward_only(self, x: Tensor) -> Tensor:
        """f_s without keeping anything (evaluation and line-search trial passes)."""
        with torch.no_grad():
            return self.module(x.to(self.device))

    def top_of_pipeline(self, j: int, n: int, mode: str) -> TopOfPipeline:
        """Last stage: the loss of microbatch j in a batch of n and the (g, c) its backward
        starts from (or what the optimizer's `mode` puts there instead, e.g. SSO's surrogate)."""
        entry = self.stash[j]
        assert self.loss is not None and entry.y is not None
        return self.optimizer.top_of_pipeline(j, entry.out.detach(), entry.y, n, mode)

    # ---------------------------------------------------------------------------- backward
    def backward_microbatch(self, j: int, g_out: Tensor, c_out: Tensor | None,
                            same_batch: bool = False) -> tuple[Tensor | None, Tensor | None]:
        """Backpropagate microbatch j: accumulate ∂h/∂θ_s, return (g_in, c_in) for the stage
        below (c_in None on the first stage, for optimizers that send no curvature, and while
        the optimizer holds it back until `release_held`)."""
        entry = self.stash.pop(j)
        if not entry.recorded:  # the same forward again, now recording (deterministic)
            with torch.enable_grad():
                entry = MicrobatchStash(entry.z_in, self.module(entry.z_in), entry.y)
        return self.optimizer.backward(j, entry, g_out, c_out, same_batch)

    def accumulate_grad(self, grads: list[Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    # ------------------------------------------------------------------ state and commands
    def end_iteration(self) -> None:
        """Drop the iteration's stash, the optimizer's per-iteration state and the gradients."""
        self.stash.clear()
        self.optimizer.end_iteration()
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Tensor]:
        """This stage's parameters and buffers, on the CPU."""
        return to_cpu(self.module.state_dict())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: parameters, optimizer state, random state."""
        return {"module": self.state_dict(), "optimizer": to_cpu(self.optimizer.state_dict()),
                "generator": self.generator.get_state()}

    def restore_checkpoint(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def start_memory_measurement(self) -> None:
        """Training starts: peaks from here on are its own (see pipeline/memory.py)."""
        self.memory.start()

    def grad_sq_norm(self) -> float:
        return sum(float((p.grad * p.grad).sum()) for p in self.params if p.grad is not None)
