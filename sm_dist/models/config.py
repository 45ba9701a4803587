"""The job file's `model` section."""

from __future__ import annotations

from dataclasses import dataclass, field

from sm_dist.models.build import ACTIVATIONS

FACTORY_PATTERN = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"


@dataclass(kw_only=True)
class MlpConfig:
    """A plain MLP: each layer is Linear + activation, except the last which is Linear alone."""
    widths: list[int] = field(metadata={"min_len": 2, "min": 1, "example": "[784, 128, 10]"})
    activation: str = field(default="relu", metadata={"choices": tuple(ACTIVATIONS)})
    bias: bool = True


@dataclass(kw_only=True)
class ModelConfig:
    """The network (a built-in MLP or a user factory) and how its layers split into stages."""
    mlp: MlpConfig | None = None
    factory: str | None = field(default=None, metadata={
        "pattern": FACTORY_PATTERN, "pattern_hint": "must look like 'package.module:function'"})
    # Layers per stage; its length is the number of pipeline stages.
    balance: list[int] = field(metadata={"min_len": 1, "min": 1, "example": "[1, 1]"})


def num_layers(model: ModelConfig) -> int | None:
    """Layers of an MLP (Linear+activation each, the last Linear alone); None for a factory."""
    return len(model.mlp.widths) - 1 if model.mlp is not None else None
