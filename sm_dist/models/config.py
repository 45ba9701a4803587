"""The job file's `model` section: the built-in networks' keys, their checks, their builders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from sm_dist.models.build import ACTIVATIONS, build_mlp, build_model_from_factory
from sm_dist.models.cnn import POOLINGS, build_cnn, cnn_shapes
from sm_dist.models.transformer import build_transformer

# The same form as data.factory's (sm_dist.data.config), written here too: models and data are
# sibling packages and do not import each other.
FACTORY_PATTERN = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"
BUILDERS = ("mlp", "cnn", "transformer", "factory")
# What the layers of each built-in network come from, for the balance's message.
LAYER_SOURCES = {"mlp": "model.mlp.widths",
                 "cnn": "model.cnn.channels (one layer per block, then the head)",
                 "transformer": "model.transformer.blocks (the embedding, the blocks, the head)"}


@dataclass(kw_only=True)
class MlpConfig:
    """A plain MLP: each layer is Linear + activation, except the last which is Linear alone."""
    widths: list[int] = field(metadata={"min_len": 2, "min": 1, "example": "[784, 128, 10]"})
    activation: str = field(default="relu", metadata={"choices": tuple(ACTIVATIONS)})
    bias: bool = True


@dataclass(kw_only=True)
class CnnConfig:
    """Conv blocks (Conv2d, activation, pooling), one layer each, then a Linear head layer."""
    # One sample's image: channels, height, width (Fashion-MNIST and MNIST: [1, 28, 28]).
    input: list[int] = field(default_factory=lambda: [1, 28, 28],
                             metadata={"length": 3, "min": 1, "example": "[1, 28, 28]"})
    channels: list[int] = field(metadata={"min_len": 1, "min": 1, "example": "[8, 16, 16]"})
    kernel: int = field(default=3, metadata={"min": 1})
    padding: int = field(default=1, metadata={"min": 0})
    pool: int = field(default=2, metadata={"min": 1})  # window and stride; 1: no pooling
    pooling: str = field(default="max", metadata={"choices": tuple(POOLINGS)})
    activation: str = field(default="relu", metadata={"choices": tuple(ACTIVATIONS)})
    classes: int = field(default=10, metadata={"min": 1})
    bias: bool = True


@dataclass(kw_only=True)
class TransformerConfig:
    """A decoder-only transformer on token sequences (next-token prediction)."""
    vocab: int = field(default=256, metadata={"min": 2})  # 256: bytes
    context: int = field(default=64, metadata={"min": 1})  # learned positions
    width: int = field(default=128, metadata={"min": 1})
    blocks: int = field(default=4, metadata={"min": 1})
    heads: int = field(default=4, metadata={"min": 1})
    mlp_ratio: int = field(default=4, metadata={"min": 1})
    activation: str = field(default="gelu", metadata={"choices": tuple(ACTIVATIONS)})


@dataclass(kw_only=True)
class ModelConfig:
    """The network (a built-in one or a user factory) and how its layers split into stages."""
    mlp: MlpConfig | None = None
    cnn: CnnConfig | None = None
    transformer: TransformerConfig | None = None
    factory: str | None = field(default=None, metadata={
        "pattern": FACTORY_PATTERN, "pattern_hint": "must look like 'package.module:function'"})
    # Layers per stage; its length is the number of pipeline stages.
    balance: list[int] = field(metadata={"min_len": 1, "min": 1, "example": "[1, 1]"})
    # Data-parallel copies of the whole pipeline: the job runs stages x replicas processes,
    # each replica on an even share of every batch.
    replicas: int = field(default=1, metadata={"min": 1})


def builders_given(model: ModelConfig) -> list[str]:
    """Which of model.mlp, model.cnn, model.transformer and model.factory are set."""
    return [name for name in BUILDERS if getattr(model, name) is not None]


def num_layers(model: ModelConfig) -> int | None:
    """Top-level layers of a built-in network (MLP: Linears; CNN: blocks + head; transformer:
    embedding + blocks + head); None for a factory."""
    if model.mlp is not None:
        return len(model.mlp.widths) - 1
    if model.cnn is not None:
        return len(model.cnn.channels) + 1
    if model.transformer is not None:
        return model.transformer.blocks + 2
    return None


def model_errors(model: ModelConfig) -> list[str]:
    """The model section's own cross-field problems, one message each (dotted key first)."""
    errors: list[str] = []
    given = builders_given(model)
    if len(given) != 1:
        options = "model.mlp, model.cnn, model.transformer and model.factory"
        which = ("none of " + options if not given else
                 f"both of model.{given[0]} and model.{given[1]}" if len(given) == 2 else
                 ", ".join(f"model.{g}" for g in given[:-1]) + f" and model.{given[-1]}")
        errors.append(f"model: {which} given; give exactly one of {options} (e.g. mlp: "
                      "{widths: [...]}, cnn: {channels: [...]}, transformer: {blocks: 4} or "
                      "factory: 'package.module:function')")
        return errors
    layers, balance = num_layers(model), model.balance
    if layers is not None and sum(balance) != layers:
        errors.append(f"model.balance: balance {balance} covers {_layers(sum(balance))} but "
                      f"{LAYER_SOURCES[given[0]]} defines {layers}; make the entries sum to "
                      f"{layers}")
    if layers is not None and len(balance) > layers:
        errors.append(f"model.balance: {len(balance)} stages but the model has only "
                      f"{_layers(layers)}; use at most {layers} stages")
    if model.cnn is not None:
        cnn = model.cnn
        try:
            cnn_shapes(cnn.input, cnn.channels, cnn.kernel, cnn.padding, cnn.pool)
        except ValueError as err:
            errors.append(f"model.cnn.channels: the {cnn.input[1]}x{cnn.input[2]} input cannot "
                          f"pass every block: {err}; use fewer blocks, more padding, a smaller "
                          "kernel or pool: 1")
    if model.transformer is not None and model.transformer.width % model.transformer.heads:
        t = model.transformer
        errors.append(f"model.transformer.heads: the width {t.width} is not a multiple of "
                      f"{t.heads} heads; choose heads that divide model.transformer.width")
    return errors


def _layers(count: int) -> str:
    return f"{count} layer" if count == 1 else f"{count} layers"


def model_builder(model: ModelConfig) -> Callable[[], nn.Sequential]:
    """A function that builds the section's network (called under the run's seed)."""
    if model.mlp is not None:
        mlp = model.mlp
        return lambda: build_mlp(mlp.widths, mlp.activation, mlp.bias)
    if model.cnn is not None:
        cnn = model.cnn
        return lambda: build_cnn(cnn.input, cnn.channels, classes=cnn.classes,
                                 kernel=cnn.kernel, padding=cnn.padding, pool=cnn.pool,
                                 pooling=cnn.pooling, activation=cnn.activation, bias=cnn.bias)
    if model.transformer is not None:
        t = model.transformer
        return lambda: build_transformer(vocab=t.vocab, context=t.context, width=t.width,
                                         blocks=t.blocks, heads=t.heads,
                                         mlp_ratio=t.mlp_ratio, activation=t.activation)
    assert model.factory is not None, "the job's checks ask for exactly one builder"
    spec = model.factory
    return lambda: build_model_from_factory(spec)
