"""Building networks: the MLP, user factories, cutting a network into stages, BatchNorm check."""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def build_mlp(widths: Sequence[int], activation: str = "relu", bias: bool = True) -> nn.Sequential:
    """An MLP as a Sequential of layers: (Linear, activation) blocks, then a lone logits Linear."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}"
        )
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"an MLP needs at least an input and an output width, got widths={widths}")
    bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or w < 1]
    if bad:
        raise ValueError(f"MLP widths must be positive integers, got {widths}")
    layers: list[nn.Module] = []
    last = len(widths) - 2
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        linear = nn.Linear(fan_in, fan_out, bias=bias)
        # Each layer is its own top-level child so that stages can be cut between any two.
        if i < last:
            layers.append(nn.Sequential(linear, ACTIVATIONS[activation]()))
        else:
            layers.append(nn.Sequential(linear))
    return nn.Sequential(*layers)


def build_model_from_factory(spec: str) -> nn.Sequential:
    """Import "package.module:function", call it with no arguments, and return its Sequential."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"model factory {spec!r} must have the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code, not just ImportError
        raise ValueError(
            f"cannot import model factory {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, function_name, None)
    if factory is None:
        raise ValueError(
            f"cannot import model factory {spec!r}: module {module_name!r} "
            f"has no attribute {function_name!r}"
        )
    if not callable(factory):
        raise TypeError(f"model factory {spec!r} is not callable")
    try:
        model = factory()
    except Exception as exc:  # the user's code failed: say so, without a traceback of ours
        raise ValueError(f"model factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"model factory {spec!r} returned {type(model).__name__}, but pipeline stages are "
            "cut between top-level children, so it must return an nn.Sequential"
        )
    return model


def split_stages(model: nn.Sequential, balance: Sequence[int]) -> list[nn.Sequential]:
    """Cut a Sequential into consecutive stages holding `balance[s]` top-level children each."""
    balance = list(balance)
    children = list(model.children())
    if not balance:
        raise ValueError("balance must list at least one stage")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in balance):
        raise ValueError(f"every stage needs at least 1 layer, got balance={balance}")
    if sum(balance) != len(children):
        raise ValueError(
            f"balance {balance} sums to {sum(balance)} layers but the model has "
            f"{len(children)} top-level layers: they must be equal"
        )
    stages: list[nn.Sequential] = []
    start = 0
    for count in balance:
        # The same module objects, so stage parameters are the model's parameters.
        stages.append(nn.Sequential(*children[start : start + count]))
        start += count
    return stages


def check_samplewise(stage: nn.Module) -> None:
    """Reject layers that mix samples of a batch (BatchNorm), which microbatching would change."""
    for name, module in stage.named_modules():
        if isinstance(module, _BatchNorm):
            # A ValueError, not a TypeError: the model's configuration is what is wrong.
            raise ValueError(
                f"layer {name or '<stage>'} is {type(module).__name__}: its output depends on "
                "the other samples of the batch, so a microbatched pipeline would compute a "
                "different function from the full batch; samples must be processed "
                "independently. Use nn.GroupNorm or nn.LayerNorm instead."
            )


def init_model(
    builder: Callable[[], nn.Sequential], seed: int, dtype: torch.dtype
) -> nn.Sequential:
    """Build a model under `torch.manual_seed(seed)` and cast it: equal seeds, equal parameters."""
    torch.manual_seed(seed)
    model = builder()
    return model.to(dtype)


def num_params(module: nn.Module) -> int:
    """Total number of scalar parameters."""
    return sum(p.numel() for p in module.parameters())
