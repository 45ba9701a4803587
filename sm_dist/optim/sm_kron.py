"""SM with a Kronecker-factored majorizer of each layer's local loss (`sm_kron`): every Linear or
Conv2d layer, also inside a stage of several, is an SM layer of its own; its curvature 𝓗 is
bounded above by B = A⊗I + I⊗U built from what the backward already has (the layer's inputs,
its pre-activation cotangents, the per-sample curvature from above), and one closed-form
step minimises the bound instead of N Hessian-vector products (docs/algorithm.md).

Everything else is sm_adaptive's: one scale α of the step for the whole pipeline, judged by
the next forward pass (full batch) or by trials of the same minibatch, the curvature c sent
down sample by sample. A stage holding a layer without a Kronecker bound (attention,
normalisation, embeddings) takes sm_adaptive's step instead: CG on its exact local loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sm_dist.math.kronecker_conv import pool_indices
from sm_dist.math.kronecker_solve import Eigenbasis, rounding_floor
from sm_dist.math.local_loss import flatten
from sm_dist.math.solvers import SolverReport
from sm_dist.optim.base import MicrobatchStash, Optimizer
from sm_dist.optim.kron_layers import Damping, KronLayer, stage_layers
from sm_dist.optim.options import InnerStepsConfig, OptimizerOptions
from sm_dist.optim.sm_adaptive import (
    AdaptiveMetrics,
    AdaptiveStageOptimizer,
    SMAdaptive,
    SMAdaptiveOptions,
)
from sm_dist.optim.step_scale import SCALE_RULES
from sm_dist.pipeline.actions import UPDATE_COLOUR, Action, ActionKind, Direction, register_kind
from sm_dist.pipeline.executor import Handler, PlanRun
from sm_dist.pipeline.schedule import UpdateActions
from sm_dist.pipeline.stage import Stage

# What sm_kron's null options become (SMKronOptions.settle), full batch and minibatches: on
# the CNN's minibatches the undamped bound with the secant scale judged on each minibatch
# overfitted it (held-out loss 2.6 to 25 within 60 iterations); over five seeds a damping of
# 0.5 with the secant rule ended lowest and steadiest of six rules and dampings (final
# held-out 0.62 on average against 0.70 for 0.2 and ratio; docs/results/peers.md has the runs).
FULL_BATCH = {"damping": 0.0, "scale_rule": "secant"}
MINIBATCHES = {"damping": 0.5, "scale_rule": "secant"}

# gram_block's null. A Linear input layer sums its Z̃ᵀZ̃ 128 samples at a time: a microbatch's
# whole 785² product beside the sum and its rows made stage 0 of the 4-layer MLP 2.18 times
# Adam's live tensors, blocks 1.48 (docs/performance.md). A convolution's Z̃ᵀZ̃ is (C·k² + 1)²,
# 10² on the CNN, whose stage 0 is within 1.11 times Adam's either way: whole microbatches,
# the rounding its results in docs/ were made with.
LINEAR_GRAM_BLOCK = 128

# Stage 0 factors its batch's Z̃ᵀZ̃ between its last forward and its first backward, where
# GPipe leaves it idle while the microbatches go up and come back (input_bound: gram).
INPUT_GRAM = register_kind(ActionKind("K", "input-layer Gram factor", Direction.LOCAL,
                                      "update", UPDATE_COLOUR, "update"))


@dataclass(kw_only=True)
class SMKronOptions(SMAdaptiveOptions):
    """The bound's η and damping, the power rounds of each layer's λ, how often the factors'
    eigenbases are recomputed; and sm_adaptive's scale and acceptance, with defaults for a
    bound instead of the exact model: the loss's own curvature at the top and an α that may
    grow as far as the measurements take it. input_bound: the first layer's A as the samples
    weight it (exact: formed in every backward) or as max m·Z̃ᵀZ̃ (gram: factored once per batch
    in stage 0's idle time between its forwards and backwards, a looser bound). conv_factor:
    a convolution's A over its whole patches, or bounded per kernel offset (offsets)."""
    eta: float = field(default=1.0, metadata={"gt": 0})
    # null: FULL_BATCH's or MINIBATCHES' (settle), which config.yaml then records.
    damping: float | None = field(default=None, metadata={"min": 0})
    scale_rule: str | None = field(default=None, metadata={"choices": SCALE_RULES})
    lambda_rounds: int = field(default=1, metadata={"min": 0})
    input_bound: str = field(default="gram", metadata={"choices": ("gram", "exact")})
    # Samples per product added into stage 0's Z̃ᵀZ̃ (input_bound: gram). 0: a microbatch's
    # whole product at a time; N: stage 0 holds no microbatch's d × d product nor its rows
    # (summed_input_gram). null: LINEAR_GRAM_BLOCK's rule below.
    gram_block: int | None = field(default=None, metadata={"min": 0})
    refresh_every: int = field(default=1, metadata={"min": 1})
    # A convolution's A: over its whole patches, or K·blockdiag over its kernel offsets and
    # bias (looser, k² times fewer multiply-adds in the backward; docs/results/peers.md).
    conv_factor: str = field(default="patches", metadata={"choices": ("patches", "offsets")})
    # The top curvature γ: 0.1 against 1 ended the 8-layer MLP of docs/results at 0.021
    # against 0.087, and the CNN's minibatches at held-out 0.61 against 1.44.
    loss_curvature_scale: float = field(default=0.1, metadata={"gt": 0})
    scale_max: float = field(default=1e8, metadata={"gt": 0})
    # The bound's α grows by orders of magnitude over a full-batch run (step_scale in the
    # runs of docs/results/peers.md); sm_adaptive's growth of 2 per step held it back.
    scale_growth: float = field(default=10.0, metadata={"gt": 1})
    inner_steps: int | InnerStepsConfig = field(default=10, metadata={"min": 1})
    # Only the stages without a Kronecker bound rebuild their graphs (keeps_forward_graph): on
    # the transformer, kept graphs made sm_kron's live tensors 2.3-2.5 times Adam's, rebuilt
    # 1.0-1.1 times, for a slower update (docs/performance.md).
    recompute: bool = True

    def settle(self, minibatches: bool) -> None:
        for key, value in (MINIBATCHES if minibatches else FULL_BATCH).items():
            if getattr(self, key) is None:
                setattr(self, key, value)


Capture = dict[int, list[Tensor | None]]  # per layer: [input, pre-activation*, output]
# * after ReLU, its output (capture_hooks)


def capture_hooks(layers: list[KronLayer], store: Callable[[], Capture | None]) -> list:
    """Forward hooks that keep each layer's input, pre-activation and output of a recording
    forward in the dict `store()` gives (None: not recording: forward-only passes)."""
    handles = []
    for k, layer in enumerate(layers):
        last: nn.Module = layer.pool or layer.activation or layer.affine

        def keep(slot: int, k: int = k, use_input: bool = False) -> Callable:
            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                kept = store()
                if kept is not None and torch.is_grad_enabled():
                    kept.setdefault(k, [None, None, None])[slot] = args[0] if use_input else out
            return hook

        first = layer.first or layer.affine
        handles.append(first.register_forward_hook(keep(0, use_input=True)))
        # After ReLU its output stands for the pre-activation: the same σ' and max m, and
        # autograd keeps it anyway, where the pre-activation would be one more tensor per
        # microbatch held to the backward (6.3 MB each on the CNN's stage 1).
        relu = type(layer.activation) is nn.ReLU
        pre_source = layer.activation if relu and layer.activation is not None else layer.affine
        handles.append(pre_source.register_forward_hook(keep(1)))
        handles.append(last.register_forward_hook(keep(2)))
    return handles


class KronSolution:
    """A stage's closed-form step, reported as an inner solver reports its iterate: the
    Kronecker layers take no inner steps."""

    def __init__(self, d: Tensor, value: float) -> None:
        # 𝓗d is never read here (the value is the bound's): a zero that allocates nothing
        self.d, self.hd = d, d.new_zeros(()).expand_as(d)
        self.value = value
        self.steps, self.stopped = 0, None

    def run(self, n: int) -> int:
        return 0

    def report(self) -> SolverReport:
        value = self.value if bool(self.d.any()) else 0.0  # 0 once the step was withdrawn
        return SolverReport(self.steps, value, self.stopped)


class KronStageOptimizer(AdaptiveStageOptimizer):
    """sm_adaptive's stage part whose local model is the Kronecker bound of each layer."""

    def __init__(self, owner: Optimizer, stage: Stage) -> None:
        super().__init__(owner, stage)
        self.kron: SMKronOptions = owner.config  # type: ignore[assignment]
        self.layers: list[KronLayer] | None = stage_layers(
            stage.module, stage.is_first, self.kron.input_bound == "gram",
            self.kron.conv_factor == "offsets")
        self.dtype = stage.params[0].dtype  # the factors are summed in the model's dtype
        self.captured: dict[int, Capture] = {}
        self._recording: int | None = None
        self.updates = 0  # steps taken (every refresh_every-th recomputes the eigenbases)
        if self.layers is not None:
            self._hooks = capture_hooks(self.layers, lambda: self._capture())

    @property
    def damping(self) -> Damping:
        cfg = self.kron
        return Damping(cfg.delta_rel, cfg.delta_abs, cfg.delta_floor, cfg.damping or 0.0, cfg.eta,
                       rounding_floor(self.dtype))

    def _capture(self) -> Capture | None:
        return None if self._recording is None else self.captured.setdefault(self._recording, {})

    def keeps_forward_graph(self) -> bool:
        # recompute is for the stages that take sm_adaptive's update (no Kronecker bound); a
        # Kronecker stage's backward reads what its forward recorded, so it always records.
        return self.layers is not None or super().keeps_forward_graph()

    def take_forward_note(self, j: int, note: Any) -> None:
        super().take_forward_note(j, note)
        self._recording = j  # the forward that follows records microbatch j's layers

    def backward(self, j: int, entry: MicrobatchStash, g_out: Tensor, c_out: Tensor | None,
                 same_batch: bool) -> tuple[Tensor | None, Tensor | None]:
        self._recording = None
        if self.layers is None:
            return super().backward(j, entry, g_out, c_out, same_batch)
        captured = self.captured.pop(j, None)
        if self.rejected:  # nothing of this iteration is needed
            return None, None
        assert c_out is not None and captured is not None, "the forward recorded no layers"
        g, c = g_out, c_out
        for k in reversed(range(len(self.layers))):
            g, c = self._layer_backward(j, self.layers[k], captured[k], g, c)
        if self.stage.is_first:
            return None, None
        top = float(c.max()) if c.numel() else 0.0
        self.max_curvature_sent = max(top, self.max_curvature_sent or 0.0)
        return g.detach(), c.to(g.dtype)

    def _layer_backward(self, j: int, layer: KronLayer, kept: list[Tensor | None], g: Tensor,
                        c: Tensor) -> tuple[Tensor, Tensor]:
        """One layer of microbatch j: its gradient, its share of A and U, and (below it) the
        cotangent and curvature its input gets."""
        inputs, pre, out = kept
        assert inputs is not None and pre is not None and out is not None
        below = not layer.data_input
        wrt = layer.params + ([inputs] if below else [])
        # The pooling's indices, before the graph is freed; not for a Gram-bounded first layer,
        # which reads only max m (holding them would keep a microbatch's indices alive).
        indices = pool_indices(out) if layer.pool is not None and not layer.gram else None
        grads = torch.autograd.grad(out, wrt, g)
        for p, grad in zip(layer.params, grads):  # autograd.grad's own tensors: no copy
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        below_c = layer.backward(j, inputs.detach(), pre.detach(), out.detach(), g.detach(), c,
                                 self.kron.lambda_rounds, self.damping, self.dtype,
                                 self.stage.generator, indices)
        if below_c is not None:
            c = below_c
        return (grads[-1] if below else g), c

    def handlers(self) -> dict[ActionKind, Handler]:
        return {**super().handlers(), INPUT_GRAM: self._input_gram}

    def _input_gram(self, run: PlanRun, action: Action) -> str:
        """K: the batch's Z̃ᵀZ̃ factored, from the inputs the forwards kept (a full batch's once)."""
        first = self.layers[0] if self.layers else None
        if first is None or not first.gram or (run.plan.same_batch and
                                                first.gram_inverse is not None):
            return "skipped"
        inputs = [self.captured[j][0][0] for j in sorted(self.captured)]
        block = self.kron.gram_block
        if block is None:
            block = LINEAR_GRAM_BLOCK if isinstance(first.affine, nn.Linear) else 0
        first.prepare_gram([x.detach() for x in inputs if x is not None], self.damping, block)
        return ""

    def begin(self) -> None:
        if self.layers is None:
            super().begin()
            return
        refresh = self.updates % self.kron.refresh_every == 0
        steps: dict[int, Tensor] = {}
        value = 0.0
        for layer in self.layers:
            layer_steps, layer_value = layer.step(self.damping, refresh, self.dtype)
            steps.update(layer_steps)
            value += layer_value
        self.updates += 1
        d = flatten([steps[id(p)] for p in self.stage.params])
        self.solver = KronSolution(d, value if math.isfinite(value) else math.inf)

    def end_iteration(self) -> None:
        super().end_iteration()
        self.captured, self._recording = {}, None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.layers is not None:
            state["kron"] = {"updates": self.updates,
                             "layers": [_layer_state(layer) for layer in self.layers]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.layers is not None and "kron" in state:
            self.updates = state["kron"]["updates"]
            device = self.stage.device
            for layer, saved in zip(self.layers, state["kron"]["layers"], strict=True):
                layer.a_basis = _basis_of(saved["a"], device)
                layer.u_basis = _basis_of(saved["u"], device)
                layer.lam_start = {j: v.to(device) for j, v in saved["lam_start"].items()}


def _layer_state(layer: KronLayer) -> dict[str, Any]:
    """What a layer carries from one iteration to the next: the eigenbases a stale-basis bound
    uses, the power iteration's warm starts."""
    def basis(b: Eigenbasis | None) -> list[Tensor] | None:
        return None if b is None else [b.vectors, b.values]
    return {"a": basis(layer.a_basis), "u": basis(layer.u_basis),
            "lam_start": dict(layer.lam_start)}


def _basis_of(saved: list[Tensor] | None, device: torch.device) -> Eigenbasis | None:
    return None if saved is None else Eigenbasis(saved[0].to(device), saved[1].to(device))


class SMKron(SMAdaptive):
    name = "sm_kron"
    summary = ("SM with a Kronecker-factored bound of each layer's local loss, minimised in "
               "closed form (sm_adaptive's scale and acceptance)")
    Options = SMKronOptions
    Metrics = AdaptiveMetrics
    stage_optimizer = KronStageOptimizer

    kinds = (*SMAdaptive.kinds, INPUT_GRAM)

    def schedule_note(self, minibatches: bool) -> str | None:
        note = ("sm_kron: L is each layer's closed-form step; I counts the CG steps of a stage "
                "without a Kronecker bound (attention, LayerNorm, embeddings), and a stage "
                "whose every layer has one takes none. K (input_bound: gram) factors stage "
                "0's Gram matrix while its microbatches go up and come back, once per batch.")
        rest = super().schedule_note(minibatches)
        return note if rest is None else f"{note}\n{rest}"

    def prepare_actions(self, num_microbatches: int) -> UpdateActions:
        cfg = self.config
        assert isinstance(cfg, SMKronOptions)
        gram = cfg.input_bound == "gram"
        return lambda stage: [Action(INPUT_GRAM)] if gram and stage == 0 else []

    @classmethod
    def check_config(cls, config: OptimizerOptions) -> list[str]:
        errors = super().check_config(config)
        assert isinstance(config, SMKronOptions)
        if config.curvature != "sample":
            errors.append("optimizer.curvature: sm_kron's bound is per sample; set "
                          "optimizer.curvature: sample")
        return errors
