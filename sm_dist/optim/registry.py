"""Every optimizer by its job-file name, and the optimizer section composed of their options.

Adding an optimizer: one module with an `Optimizer` subclass, and one line in BUILTIN. An
optimizer outside the package is named in the job file as 'package.module:Class' (imported
by `load`, like a model factory); it takes the shared options only.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field

from sm_dist.optim.base import Optimizer
from sm_dist.optim.cgblock import CGBlock
from sm_dist.optim.ddg import DDG
from sm_dist.optim.gd_armijo import GDArmijo
from sm_dist.optim.options import OptimizerOptions
from sm_dist.optim.sm import SM
from sm_dist.optim.sm_adaptive import SMAdaptive
from sm_dist.optim.sso import SSO
from sm_dist.optim.torch_optimizers import GD, SGD, Adam

BUILTIN: tuple[type[Optimizer], ...] = (SM, SMAdaptive, GD, GDArmijo, SGD, Adam, DDG, SSO,
                                        CGBlock)

_REGISTRY: dict[str, type[Optimizer]] = {opt.name: opt for opt in BUILTIN}
# The schema's choices for optimizer.name: a list, so that `register` can extend it.
NAMES: list[str] = list(_REGISTRY)


class UnknownOptimizer(LookupError):
    """An optimizer name that is neither built in nor an importable 'module:Class'."""


def register(optimizer: type[Optimizer], name: str | None = None) -> type[Optimizer]:
    """Make `optimizer` available as optimizer.name `name` (default: its own `name`)."""
    if not (isinstance(optimizer, type) and issubclass(optimizer, Optimizer)):
        raise TypeError(f"{optimizer!r} is not an sm_dist.optim.base.Optimizer subclass")
    key = name or optimizer.name
    if key not in _REGISTRY:
        NAMES.append(key)
    _REGISTRY[key] = optimizer
    return optimizer


def load(spec: str) -> type[Optimizer]:
    """Import 'package.module:Class' and register it under that spec."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code
        raise UnknownOptimizer(f"cannot import optimizer {spec!r}: "
                               f"{type(exc).__name__}: {exc}") from exc
    optimizer = getattr(module, class_name, None)
    if optimizer is None:
        raise UnknownOptimizer(f"cannot import optimizer {spec!r}: module {module_name!r} has "
                               f"no attribute {class_name!r}")
    try:
        return register(optimizer, spec)
    except TypeError as err:
        raise UnknownOptimizer(f"optimizer {spec!r}: {err}") from None


def get(name: str) -> type[Optimizer]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return load(name)
    raise UnknownOptimizer(f"unknown optimizer {name!r}; choose one of {', '.join(NAMES)}")


def names_sweeping(parameter: str) -> tuple[str, ...]:
    """The optimizers `compare` sweeps over `parameter` ("inner_steps" or "lr")."""
    return tuple(name for name, opt in _REGISTRY.items() if opt.sweep == parameter)


def _option_classes() -> tuple[type, ...]:
    """Each optimizer's Options in reverse BUILTIN order (so that the fields come in BUILTIN
    order after the shared ones; an Options extending another's must be listed after it)."""
    found = [opt.Options for opt in BUILTIN if opt.Options is not OptimizerOptions]
    return (*reversed(list(dict.fromkeys(found))), OptimizerOptions)


@dataclass(kw_only=True)
class OptimizerConfig(*_option_classes()):  # type: ignore[misc]
    """The optimizer: SM with its inner solver, or a baseline (spec §6); each optimizer's
    module defines the options only it reads."""
    name: str = field(default="sm", metadata={"choices": NAMES})


assert {f.name for f in dataclasses.fields(OptimizerOptions)} <= {
    f.name for f in dataclasses.fields(OptimizerConfig)}
