"""The strongest layer-local optimizers of today on each stage's own parameters, from the
pytorch-optimizer library (its code runs; nothing here re-implements them): Shampoo, SOAP,
Muon (with AdamW for what is not a hidden matrix) and PSGD's Kron.

Why pytorch-optimizer (docs/comparing.md): all four in eager PyTorch, Apache-2.0, deterministic
run to run on the CPU in float32 and float64, and their state dicts reload bit for bit. Kron
draws from torch's and numpy's global random generators; each stage runs its step on streams
of its own, seeded from run.seed and saved in its checkpoints, so that the engine and one
process draw the same numbers and a resumed run continues exactly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from sm_dist.optim.base import Optimizer
from sm_dist.optim.options import LearningRateOptions
from sm_dist.optim.torch_optimizers import TorchOptimizer, TorchStageOptimizer
from sm_dist.pipeline.stage import Stage

LIBRARY = "pytorch_optimizer"
INSTALL = "pip install 'sm-dist[peers]' (launch/setup.sh installs it)"


def library() -> Any:
    """pytorch_optimizer, imported when a peer is built (it is an optional dependency)."""
    return importlib.import_module(LIBRARY)


def missing_library() -> str | None:
    """Why the peers cannot run here, or None."""
    try:
        library()
    except ImportError as err:
        return f"needs the pytorch-optimizer package ({err}); {INSTALL}"
    return None


class StageRandomStreams:
    """A stage's own torch and numpy random streams, for optimizers that draw from the global
    ones: each step runs on them, which leaves the global streams as they were. On a CUDA
    stage its device's generator too (tensors drawn like a CUDA tensor come from there)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None
        self.torch_state = torch.Generator().manual_seed(seed).get_state()
        self.numpy_state = np.random.RandomState(seed).get_state()
        self.cuda_state: Tensor | None = None
        if self.device is not None:
            self.cuda_state = torch.Generator(self.device).manual_seed(seed).get_state()

    def run(self, step: Any) -> Any:
        outer = np.random.get_state()
        devices = [] if self.device is None else [self.device]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.torch_state)
            if self.device is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            np.random.set_state(self.numpy_state)
            try:
                return step()
            finally:
                self.torch_state = torch.get_rng_state()
                if self.device is not None:
                    self.cuda_state = torch.cuda.get_rng_state(self.device)
                self.numpy_state = np.random.get_state()
                np.random.set_state(outer)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers only: checkpoints load as plain data (weights_only)."""
        name, keys, position, has_gauss, cached = self.numpy_state
        return {"torch": self.torch_state.clone(),
                "cuda": None if self.cuda_state is None else self.cuda_state.clone(),
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position),
                          int(has_gauss), float(cached)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.torch_state = state["torch"].clone()
        if self.device is not None and state.get("cuda") is not None:
            self.cuda_state = state["cuda"].clone()
        name, keys, position, has_gauss, cached = state["numpy"]
        self.numpy_state = (name, keys.numpy().astype(np.uint32), position, has_gauss, cached)


class PeerStageOptimizer(TorchStageOptimizer):
    """A peer's step on this stage, on the stage's own random streams."""

    def __init__(self, owner: Optimizer, stage: Stage) -> None:
        super().__init__(owner, stage)
        # Seeded as the stage's own generator is (run.seed and the stage's index).
        self.streams = StageRandomStreams(stage.generator.initial_seed(), stage.device)

    def optimizer_step(self) -> None:
        self.streams.run(self.torch_optimizer.step)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.torch_optimizer.state_dict(),
                "streams": self.streams.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.torch_optimizer.load_state_dict(state["optimizer"])
        self.streams.load_state_dict(state["streams"])


@dataclass(kw_only=True)
class PeerOptions(LearningRateOptions):
    """What every peer takes: lr and weight decay."""
    weight_decay: float = field(default=0.0, metadata={"min": 0})


class Peer(TorchOptimizer):
    """A peer from the library over each stage's parameters."""

    stage_optimizer: ClassVar[type[TorchStageOptimizer]] = PeerStageOptimizer

    @classmethod
    def check_config(cls, config: Any) -> list[str]:
        problem = missing_library()
        return [f"optimizer.name: {cls.name} {problem}"] if problem else []


@dataclass(kw_only=True)
class ShampooOptions(PeerOptions):
    """Shampoo's momentum, the steps between preconditioner recomputations and its ε."""
    lr: float = field(default=0.1, metadata={"gt": 0})
    momentum: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    # The library starts the inverse roots at zero and computes them every this many steps,
    # so the steps before the first computation do not move: 1 (its default) moves from the
    # first step, at an SVD per factor per step.
    precondition_every: int = field(default=1, metadata={"min": 1})
    matrix_eps: float = field(default=1e-6, metadata={"gt": 0})


class Shampoo(Peer):
    name = "shampoo"
    summary = "Shampoo (pytorch-optimizer): a Kronecker-factored preconditioner per parameter"
    Options = ShampooOptions

    def build(self, stage: Stage) -> torch.optim.Optimizer:
        cfg = self.config
        assert isinstance(cfg, ShampooOptions)
        return library().Shampoo(stage.params, lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay,
                                  preconditioning_compute_steps=cfg.precondition_every,
                                  matrix_eps=cfg.matrix_eps)


@dataclass(kw_only=True)
class SOAPOptions(PeerOptions):
    """SOAP: Adam in Shampoo's eigenbasis, refreshed every precondition_every steps."""
    lr: float = field(default=3e-3, metadata={"gt": 0})
    betas: list[float] = field(default_factory=lambda: [0.95, 0.95],
                               metadata={"length": 2, "min": 0, "lt": 1})
    weight_decay: float = field(default=0.01, metadata={"min": 0})
    precondition_every: int = field(default=10, metadata={"min": 1})
    max_precondition_dim: int = field(default=10000, metadata={"min": 1})
    eps: float = field(default=1e-8, metadata={"gt": 0})


class SOAP(Peer):
    name = "soap"
    summary = "SOAP (pytorch-optimizer): Adam in Shampoo's eigenbasis"
    Options = SOAPOptions

    def build(self, stage: Stage) -> torch.optim.Optimizer:
        cfg = self.config
        assert isinstance(cfg, SOAPOptions)
        return library().SOAP(stage.params, lr=cfg.lr, betas=tuple(cfg.betas),
                              weight_decay=cfg.weight_decay,
                              precondition_frequency=cfg.precondition_every,
                              max_precondition_dim=cfg.max_precondition_dim, eps=cfg.eps)


@dataclass(kw_only=True)
class MuonOptions(PeerOptions):
    """Muon on the hidden weight matrices; AdamW on the rest (biases, norms, embeddings, and
    the network's first and last layer, as Muon is commonly run)."""
    lr: float = field(default=0.02, metadata={"gt": 0})
    momentum: float = field(default=0.95, metadata={"min": 0, "lt": 1})
    nesterov: bool = True
    ns_steps: int = field(default=5, metadata={"min": 1})
    adamw_lr: float = field(default=3e-3, metadata={"gt": 0})
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95],
                                     metadata={"length": 2, "min": 0, "lt": 1})
    adamw_weight_decay: float = field(default=0.0, metadata={"min": 0})


def muon_groups(stage: Stage) -> tuple[list[Tensor], list[Tensor]]:
    """(Muon's, AdamW's) parameters of a stage: the weights of its Linear and convolution
    layers are Muon's, except the network's first and last layer when they are such a layer
    (not, say, an embedding): the same groups however the network is split into stages."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    owners = [m for m in stage.module.modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))]
    edges = set()
    if stage.is_first and owners and isinstance(owners[0], kinds):
        edges.add(id(owners[0]))
    if stage.is_last and owners and isinstance(owners[-1], kinds):
        edges.add(id(owners[-1]))
    muon = [m.weight for m in owners if isinstance(m, kinds) and id(m) not in edges
            and m.weight.requires_grad]
    chosen = {id(p) for p in muon}
    return muon, [p for p in stage.params if id(p) not in chosen]


class Muon(Peer):
    name = "muon"
    summary = ("Muon (pytorch-optimizer): orthogonalised momentum on hidden matrices, AdamW "
               "on the rest")
    Options = MuonOptions

    def build(self, stage: Stage) -> torch.optim.Optimizer:
        cfg = self.config
        assert isinstance(cfg, MuonOptions)
        muon, adamw = muon_groups(stage)
        return library().Muon(
            [{"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False}],
            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, adamw_lr=cfg.adamw_lr,
            adamw_betas=tuple(cfg.adamw_betas), adamw_wd=cfg.adamw_weight_decay)


@dataclass(kw_only=True)
class PSGDOptions(PeerOptions):
    """PSGD's Kron: its momentum, the largest dimension that gets a triangular factor (larger
    ones a diagonal), and how often the preconditioner is updated (null: every step for 500
    steps, then rarer, the library's schedule)."""
    lr: float = field(default=3e-3, metadata={"gt": 0})
    momentum: float = field(default=0.9, metadata={"min": 0, "lt": 1})
    max_size_triangular: int = field(default=8192, metadata={"min": 1})
    update_probability: float | None = field(default=None, metadata={"gt": 0, "max": 1})
    memory_save_mode: str | None = field(
        default=None, metadata={"choices": ("one_diag", "smart_one_diag", "all_diag")})


class PSGD(Peer):
    name = "psgd"
    summary = "PSGD Kron (pytorch-optimizer): a Kronecker preconditioner fit by random probes"
    Options = PSGDOptions

    @classmethod
    def check_config(cls, config: Any) -> list[str]:
        problems = super().check_config(config)
        if not problems and importlib.util.find_spec("opt_einsum") is None:
            # Without it torch.einsum builds Kron's d_out²·d_in² intermediate (40 GB for one
            # 128 × 784 layer); with it, the factors' own size.
            problems.append("optimizer.name: psgd needs the opt_einsum package (else one 128 x "
                            f"784 layer takes 40 GB); {INSTALL}")
        return problems

    def build(self, stage: Stage) -> torch.optim.Optimizer:
        cfg = self.config
        assert isinstance(cfg, PSGDOptions)
        dtype = stage.params[0].dtype if stage.params else torch.float32
        return library().Kron(
            stage.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            pre_conditioner_update_probability=cfg.update_probability,
            max_size_triangular=cfg.max_size_triangular,
            memory_save_mode=cfg.memory_save_mode,
            # float64 parameters keep float64 factors (the library's float32 would not reload)
            precondition_dtype=None if dtype == torch.float64 else torch.float32)
