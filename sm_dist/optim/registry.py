"""Every optimizer by its job-file name, and what the optimizer section may hold for each.

Adding an optimizer: one module with an `Optimizer` subclass, and one line in BUILTIN. An
optimizer outside the package is named in the job file as 'package.module:Class' (imported
by `load`, like a model factory), with its own `Options` as any other.
"""

from __future__ import annotations

import dataclasses
import importlib

from sm_dist.optim.base import Optimizer
from sm_dist.optim.cgblock import CGBlock
from sm_dist.optim.ddg import DDG
from sm_dist.optim.gd_armijo import GDArmijo
from sm_dist.optim.options import OptimizerOptions
from sm_dist.optim.peers import PSGD, SOAP, Muon, Shampoo
from sm_dist.optim.sm import SM
from sm_dist.optim.sm_adaptive import SMAdaptive
from sm_dist.optim.sm_kron import SMKron
from sm_dist.optim.sso import SSO
from sm_dist.optim.torch_optimizers import GD, SGD, Adam

BUILTIN: tuple[type[Optimizer], ...] = (SM, SMAdaptive, SMKron, GD, GDArmijo, SGD, Adam, DDG,
                                        SSO, CGBlock, Shampoo, SOAP, Muon, PSGD)

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


def option_names(name: str) -> set[str]:
    """The keys of optimizer `name`'s section."""
    return {f.name for f in dataclasses.fields(get(name).Options)}


def owners_of(option: str) -> list[str]:
    """The optimizers whose section has the key `option`, in registry order."""
    return [name for name, opt in _REGISTRY.items()
            if option in {f.name for f in dataclasses.fields(opt.Options)}]


def switch_section(section: dict, name: str) -> tuple[dict, list[str]]:
    """An optimizer section turned to optimizer `name`: the keys the old optimizer had and
    `name` does not take are dropped (returned, sorted), so that one job file serves every
    optimizer. A key neither has stays, for validation to name."""
    old = section.get("name", OptimizerOptions.name)
    keep = option_names(name)
    theirs = option_names(old) if isinstance(old, str) and known(old) else set()
    dropped = sorted(key for key in section if key in theirs and key not in keep)
    switched = {key: value for key, value in section.items() if key not in dropped}
    switched["name"] = name
    return switched, dropped


def known(name: str) -> bool:
    """Whether `name` is a registered optimizer (a 'module:Class' is, once loaded)."""
    return name in _REGISTRY
