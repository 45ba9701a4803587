"""The optimizer section of a job: the chosen optimizer's own Options read as the section, what
a key of another optimizer is told, and switching optimizer.name by an override."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sm_dist.config.schema import INVALID, choice_error, describe_value, register_key_hint
from sm_dist.optim import registry
from sm_dist.optim.options import OptimizerOptions


def optimizer_options(value: Any, key: str, errors: list[str]) -> Any:
    """The Options class of the optimizer the section names (sm when it names none)."""
    if value is None:  # an empty section: every default, of the default optimizer
        value = {}
    if not isinstance(value, Mapping):
        return OptimizerOptions  # converting it reports what is wrong with the value
    name = value.get("name", "sm")
    if isinstance(name, str) and registry.known(name):
        return registry.get(name).Options
    if isinstance(name, str) and ":" in name:
        return INVALID  # a plugin that failed to import: _load_optimizer_plugin said why
    errors.append(choice_error(f"{key}.name", name, registry.NAMES) if isinstance(name, str)
                  else f"{key}.name: expected a string, got {describe_value(name)}; write "
                       "e.g. name: sm")
    return INVALID


def _option_of_another(options: type, key: str) -> str | None:
    """`optimizer.betas` under `name: sm`: say whose option it is and how to use it."""
    owners = registry.owners_of(key)
    if not owners:
        return None
    chosen = next((n for n in registry.NAMES if registry.get(n).Options is options), None)
    which = owners[0] if len(owners) == 1 else f"{', '.join(owners[:-1])} and {owners[-1]}"
    return (f"{key!r} is an option of {which}, not of {chosen or options.__name__}; remove it "
            f"(or set optimizer.name: {owners[0]})")


def every_optimizer_options() -> list[type]:
    """Every registered optimizer's Options (the section's possible classes)."""
    return [registry.get(name).Options for name in registry.NAMES]


register_key_hint(OptimizerOptions, _option_of_another)


def switch_optimizer(before: Mapping[str, Any], after: dict[str, Any],
                      notes: list[str] | None) -> None:
    """If the overrides changed optimizer.name, drop the old optimizer's own options."""
    old_section, new_section = before.get("optimizer"), after.get("optimizer")
    if not isinstance(old_section, Mapping) or not isinstance(new_section, dict):
        return
    old, new = old_section.get("name", "sm"), new_section.get("name", "sm")
    if old == new or not isinstance(new, str) or not registry.known(new):
        return
    switched, dropped = registry.switch_section({**new_section, "name": old}, new)
    after["optimizer"] = switched
    if dropped and notes is not None:
        notes.append(switch_note(old, new, dropped))


def switch_note(old: str, new: str, dropped: list[str]) -> str:
    """The one line said when switching optimizer.name drops the old optimizer's options."""
    return (f"optimizer.name {old} -> {new}: left out {old}'s own "
            f"option{'s' if len(dropped) > 1 else ''} {', '.join(dropped)}")
