"""The interface every optimizer implements: what the rest of sm-dist needs to know of it.

An optimizer is one subclass of `Optimizer` in its own module, listed in `registry.py`. It
says which job-file options it takes (`Options`, validated only when it is chosen), what its
backward keeps, which actions its update phase has (their kinds registered in its module) and
how each stage performs them (its `BaseStageOptimizer`), how the coordinator steers it
between passes (if it does), what it adds to the iteration record (its `Metrics` section),
and which parameter `compare` sweeps. Nothing outside its module names it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from sm_dist.math.losses import TopOfPipeline, evaluate_loss, top_of_pipeline
from sm_dist.math.reduction import ALONE, Reducer
from sm_dist.math.stage_function import StageFunction, affine_in_parameters
from sm_dist.optim.metrics import NoMetrics, OptimizerMetrics
from sm_dist.optim.options import OptimizerOptions
from sm_dist.pipeline.actions import APPLY, Action, ActionKind
from sm_dist.pipeline.executor import Handler, PlanRun
from sm_dist.pipeline.interface import Microbatches, Pipeline
from sm_dist.pipeline.schedule import UpdateActions
from sm_dist.pipeline.stage import MicrobatchStash, Stage


class BackwardKeeps(enum.Enum):
    """What a stage's backward must keep of each microbatch for the update."""

    GRADIENT = "gradient"  # the gradient alone: the autograd graph is freed at once
    GRAPH = "graph"  # Ψ's retained graph, for second-order products (CGBlock)
    CURVATURE = "curvature"  # the graph, and a curvature sent down with the gradient (SM)


@dataclass
class StageReport:
    """What one stage's update did this iteration: the costs every run counts; an optimizer's
    report adds its own fields (a subclass) for its metrics section."""

    # Second-order products this stage computed this iteration (e.g. SM's Ψ products, or the
    # tangents an update's passes carried through this stage, one per tangent and microbatch).
    hvp_products: int = 0
    tangents_started: int = 0  # passes of tangents that carried this stage's own tangent
    backward_passes: int = 1  # 0 when the stage skipped the iteration's backward
    grad_sq_norm: float | None = None  # ‖∂h/∂θ_s‖² of the step, where the optimizer reads it

    def merged(self, replicas: list[StageReport]) -> StageReport:
        """One report for the stage from its replicas' (this one is replica 0's): exact
        replicas compute the same, so by default this one."""
        return self


class BaseStageOptimizer:
    """One stage's side of an optimizer: hooks into the stage's forward and backward, and
    handlers for the optimizer's own update actions. The defaults are plain backprop."""

    keeps: ClassVar[BackwardKeeps] = BackwardKeeps.GRADIENT
    # The stage's replicas (model.replicas): the engine sets their group; alone, none.
    reducer: Reducer = ALONE
    # run.split_backward: time the backward as the two halves a zero-bubble schedule runs
    # apart (the input's gradient, then the weights'), for the simulator.
    split_backward: bool = False

    def __init__(self, owner: Optimizer, stage: Stage) -> None:
        self.owner = owner  # the optimizer this is one stage's part of
        self.config = owner.config
        self.stage = stage
        self.functions: dict[int, StageFunction] = {}  # backward keeps GRAPH: Ψ per microbatch
        self.affine_in_params = affine_in_parameters(stage.module)
        self._report = StageReport()

    # -------------------------------------------------------------- hooks of the stage
    def top_of_pipeline(self, j: int, out: Tensor, y: Tensor, n: int,
                        mode: str) -> TopOfPipeline:
        """Last stage: the loss's gradient and curvature for microbatch j (spec §2)."""
        self._check_mode(mode)
        assert self.stage.loss is not None
        return top_of_pipeline(self.stage.loss, out, y, n)

    def evaluate_top(self, j: int, z: Tensor, y: Tensor, mode: str) -> tuple[float, int]:
        """Last stage, forward-only passes: summed loss and correct predictions."""
        self._check_mode(mode)
        assert self.stage.loss is not None
        return evaluate_loss(self.stage.loss, z, y)

    def _check_mode(self, mode: str) -> None:
        if mode != "loss":
            raise ValueError(f"{self.owner.name} has no top-of-pipeline mode {mode!r}")

    def backward(self, j: int, entry: MicrobatchStash, g_out: Tensor, c_out: Tensor | None,
                 same_batch: bool) -> tuple[Tensor | None, Tensor | None]:
        """Backpropagate one microbatch; returns (∂h/∂z_in, curvature) for the stage below."""
        stage = self.stage
        if self.keeps is BackwardKeeps.GRADIENT and self.split_backward:
            return self._split_backward(entry, g_out), None
        if self.keeps is BackwardKeeps.GRADIENT:
            torch.autograd.backward(entry.out, g_out)  # frees the graph; the gradient is in .grad
            return (None if stage.is_first else entry.z_in.grad.detach()), None
        # Ψ with c = 0 holds exactly the ⟨g, f⟩ terms: its second derivatives are those the
        # network's Hessian gets from this stage (what CGBlock's tangent passes need).
        zero = torch.zeros(g_out.shape[0], dtype=g_out.dtype, device=g_out.device)
        fn = self.keep_function(j, entry, g_out, zero)
        return fn.gradients()[0], None

    def _split_backward(self, entry: MicrobatchStash, g_out: Tensor) -> Tensor | None:
        """The backward as two traversals, each timed: ∂h/∂z_in (what the stage below waits
        for), then ∂h/∂θ_s into .grad. On a stage of several layers the second recomputes the
        inner activations' gradients, which a zero-bubble runtime would keep from the first."""
        stage, params = self.stage, self.stage.params
        sync = stage.device.type == "cuda"
        start = time.perf_counter()
        g_in = None
        if not stage.is_first:
            (g_in,) = torch.autograd.grad(entry.out, entry.z_in, g_out, retain_graph=True)
            if sync:
                torch.cuda.synchronize(stage.device)
        middle = time.perf_counter()
        torch.autograd.backward(entry.out, g_out, inputs=params)
        if sync:
            torch.cuda.synchronize(stage.device)
        self.last_split = (middle - start, time.perf_counter() - middle)
        return None if g_in is None else g_in.detach()

    def backward_split(self) -> tuple[float, float] | None:
        """Seconds of the last backward's two halves (input, weights) when it was split."""
        return getattr(self, "last_split", None)

    def keep_function(self, j: int, entry: MicrobatchStash, g_out: Tensor,
                      c_out: Tensor) -> StageFunction:
        """Build microbatch j's Ψ (keeping its graph), add ∂h/∂θ_s to the stage's gradient."""
        fn = StageFunction(entry.z_in, entry.out, self.stage.params, g_out, c_out,
                           affine_in_params=self.affine_in_params)
        self.stage.accumulate_grad(fn.gradients()[1])
        self.functions[j] = fn
        return fn

    def sends_curvature(self) -> bool:
        return self.keeps is BackwardKeeps.CURVATURE

    def keeps_forward_graph(self) -> bool:
        """Whether the forward records its graph for the backward (False: it is rerun then)."""
        return True

    def forward_note(self, j: int) -> Any:
        """What to send up with microbatch j's activation (None: nothing)."""
        return None

    def take_forward_note(self, j: int, note: Any) -> None:
        """The note the stage below sent with microbatch j's activation."""

    def backward_note(self, j: int, same_batch: bool) -> Any:
        """Last stage: what to send down with microbatch j's gradient (None: nothing)."""
        return None

    def take_backward_note(self, j: int, note: Any) -> None:
        """The note that came down with microbatch j's gradient (the last stage: its own)."""

    def note_arrived(self, note: Any) -> None:
        """A note from above is in this stage's mailbox, before the backward that takes it
        runs (on the engine, on an RPC thread): only for releasing what the note makes
        unnecessary; the backward still takes it by take_backward_note."""

    def release_held(self) -> dict[int, Tensor]:
        """Curvatures held back by the backward, released after the last one (SM's `batch`)."""
        return {}

    def skips_backward(self) -> bool:
        """Whether this iteration's backward does nothing on this stage."""
        return False

    def handlers(self) -> dict[ActionKind, Handler]:
        """The functions that perform this optimizer's update actions on this stage."""
        return {}

    def after_backward(self) -> None:
        """After a pass's last backward, with replicas: ∂h/∂θ_s summed over them in place
        (DDP's semantics), so that every replica steps as one pipeline on the whole batch."""
        if self.reducer.size > 1:
            reduce_gradients(self.stage.params, self.reducer)

    def report(self) -> StageReport:
        return self._report

    def end_iteration(self) -> None:
        self.functions = {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StepStageOptimizer(BaseStageOptimizer):
    """A stage optimizer whose whole update is one step at `A` (torch optimizers, DDG)."""

    def step(self) -> None:
        raise NotImplementedError

    def handlers(self) -> dict[ActionKind, Handler]:
        return {APPLY: apply_update}


@dataclass
class SteeredStep:
    """What the coordinator's steps after an iteration's backward did, and the passes they cost."""

    record: dict[str, Any]  # fields for the iteration's record
    forward_passes: int  # forward-only trials and forward halves of extra passes
    backward_passes: int


class Steering(Protocol):
    """An optimizer the coordinator drives pass by pass after each iteration's backward."""

    def step(self, pipeline: Pipeline, iteration: int, microbatches: Microbatches, n: int,
             loss: float) -> SteeredStep: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Optimizer:
    """An optimizer as the training loop, the schedule, compare and the docs see it."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for the docs and `sm-dist schedule`
    Options: ClassVar[type[OptimizerOptions]] = OptimizerOptions  # its job-file options
    Metrics: ClassVar[type[OptimizerMetrics]] = NoMetrics  # its section of the iteration record
    stage_optimizer: ClassVar[type[BaseStageOptimizer]] = BaseStageOptimizer
    kinds: ClassVar[tuple[ActionKind, ...]] = ()  # the action kinds of its update phase
    sweep: ClassVar[str | None] = None  # what `compare` sweeps: "inner_steps", "lr" or None
    # optimizer.replica_mode: average_steps is open to it (its replicas can step on their own)
    can_average_steps: ClassVar[bool] = False

    def __init__(self, config: OptimizerOptions, num_stages: int) -> None:
        self.config = config
        self.num_stages = num_stages

    @classmethod
    def keeps(cls) -> BackwardKeeps:
        return cls.stage_optimizer.keeps

    @classmethod
    def schedules(cls) -> tuple[str, ...]:
        """The pipeline schedules it may run on (`sm-dist simulate --schedule`). An update
        from the gradient alone takes any; one from a local model built in the backward needs
        each stage's whole backward, unsplit, on one device before it: GPipe or 1F1B."""
        if cls.keeps() is BackwardKeeps.GRADIENT:
            return ("gpipe", "1f1b", "interleaved", "zb", "zbv")
        return ("gpipe", "1f1b")

    @classmethod
    def check_config(cls, config: OptimizerOptions) -> list[str]:
        """Problems of the job's optimizer section for this optimizer, one message each."""
        return []

    def update_actions(self, num_microbatches: int, last: bool) -> UpdateActions:
        """Each stage's actions after its last backward (`last`: no iteration follows)."""
        return lambda stage: []

    def prepare_actions(self, num_microbatches: int) -> UpdateActions:
        """Each stage's actions between its last forward and its first backward: work that
        needs the batch but not the gradient, in the stage's idle time there."""
        return lambda stage: []

    def for_stage(self, stage: Stage) -> BaseStageOptimizer:
        """Its part on `stage`."""
        return self.stage_optimizer(self, stage)

    def steering(self, minibatches: bool) -> Steering | None:
        """The coordinator's loop for an optimizer that needs one after each iteration's
        backward (`minibatches`: the batch changes every iteration); None for those that
        update inside the pipeline (their next iteration is submitted before this one ends)."""
        return None

    def record_fields(self, reports: list[StageReport]) -> dict[str, Any]:
        """What the stages' reports add to the iteration's record: fields of its `Metrics`
        section, and of the record's own that a model-based optimizer sets (its
        `predicted_decrease`; a rejected step's `train_loss`)."""
        return {}

    def monitor_notes(self) -> list[str]:
        """What the live view shows of the optimizer beside its metrics (e.g. a constant lr)."""
        return []

    def schedule_note(self, minibatches: bool) -> str | None:
        """What `sm-dist schedule` should add below the grid, if anything."""
        return None


def apply_update(run: PlanRun, action: Action) -> str:
    """`A` for stage optimizers whose update is one step (`step()`)."""
    part = run.stage.optimizer
    assert isinstance(part, StepStageOptimizer)
    part.step()
    run.stage.end_iteration()
    return ""


def reduce_gradients(params: list[Tensor], reducer: Reducer) -> None:
    """Every p.grad summed over the replicas, with one all-reduce (a gradient no backward set
    counts as zeros there and stays unset: the replicas all skipped the same backward)."""
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        return
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads)])
    total, offset = reducer.all_reduce_sum(flat), 0
    for p, g in zip(params, grads):
        if g is not None:
            g.copy_(total[offset:offset + p.numel()].view_as(g))
        offset += p.numel()
