"""Reading nested dataclasses from plain mappings, every error reported with its dotted key.

A field whose section's class depends on the value (the optimizer section: each optimizer's
own Options) names two functions in its metadata: `resolve(value, key, errors)` gives the
class to read the value as (or INVALID, its error recorded) and `variants()` every class it
may be (for the 'right key, wrong section' hint). `register_key_hint` lets such a section
say more about a key it does not have (e.g. which other optimizer takes it).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

INVALID: Any = object()  # marks a value that failed conversion (its error is recorded)
# Per section base class: what to say of a key a section of it does not have (None: default).
_KEY_HINTS: dict[type, Callable[[type, str], str | None]] = {}
_UNION_ORIGINS = (Union, types.UnionType)
# Per scalar type: how to name it, its plural, and an example value for "how to fix" hints.
_TYPE_WORDS = {bool: ("true or false", "booleans", "true"), int: ("an integer", "integers", "10"),
               float: ("a number", "numbers", "0.1"), str: ("a string", "strings", "'text'")}
# PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string; accept that spelling for float fields.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_PLAIN_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)")


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def convert(tp: Any, value: Any, key: str, errors: list[str], built: dict[str, Any],
            root: type) -> Any:
    """Convert one raw value to type `tp`, recording errors; returns INVALID on failure.

    `built` collects every section built without errors, by dotted path; `root` is the
    outermost dataclass, searched for a key given in the wrong section.
    """
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty YAML section (`optimizer:`) means "all defaults"
            value = {}
        if isinstance(value, Mapping):
            return convert_section(tp, value, key, errors, built, root)
    elif origin in _UNION_ORIGINS:
        members = [arg for arg in args if arg is not type(None)]
        if value is None and len(members) < len(args):
            return None
        if len(members) == 1:
            return convert(members[0], value, key, errors, built, root)
        sections = [m for m in members if dataclasses.is_dataclass(m)]
        if sections and isinstance(value, Mapping):  # a mapping can only mean the section
            return convert(sections[0], value, key, errors, built, root)
        for member in members:  # first member that accepts the value wins
            converted = convert(member, value, key, [], built, root)
            if converted is not INVALID:
                return converted
    elif origin is Literal:
        if isinstance(value, str) and value in args:
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            items = [convert(args[0], item, f"{key}[{index}]", errors, built, root)
                     for index, item in enumerate(value)]
            return INVALID if any(item is INVALID for item in items) else items
    elif tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            errors.append(f"{key}: expected a finite number, got {value}; write e.g. 0.1")
            return INVALID
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value  # bool is an int subclass in Python, but never a valid count
    return _type_error(tp, value, key, errors)


def convert_section(
    cls: type, raw: Mapping[Any, Any], prefix: str, errors: list[str], built: dict[str, Any],
    root: type
) -> Any:
    specs, hints = {spec.name: spec for spec in dataclasses.fields(cls)}, get_type_hints(cls)
    errors.extend(_unknown_key_error(cls, prefix, str(k), root)
                  for k in raw if str(k) not in specs)
    values: dict[str, Any] = {}
    complete = True
    for name, spec in specs.items():
        key = join_key(prefix, name)
        if name not in raw:
            if spec.default is MISSING and spec.default_factory is MISSING:
                errors.append(_missing_error(hints[name], spec.metadata, key))
                complete = False
            continue  # the dataclass default applies
        tp = hints[name]
        if "resolve" in spec.metadata:  # a section whose class depends on its value
            tp = spec.metadata["resolve"](raw[name], key, errors)
            if tp is INVALID:
                complete = False
                continue
        value = convert(tp, raw[name], key, errors, built, root)
        if value is INVALID or not _check_rules(value, spec.metadata, key, errors):
            complete = False
        else:
            values[name] = value
    if not complete:
        return INVALID
    section = cls(**values)
    built[prefix] = section
    for name in specs:  # sections left at their defaults still take part in cross-field checks
        if dataclasses.is_dataclass(nested := getattr(section, name)):
            built.setdefault(join_key(prefix, name), nested)
    return section


def _check_rules(value: Any, rules: Mapping[str, Any], key: str, errors: list[str]) -> bool:
    """Check a converted value against its field's metadata rules; True when it passes."""
    count_before = len(errors)
    if isinstance(value, list):
        if len(value) < rules.get("min_len", 0):
            errors.append(f"{key}: needs at least {plural(rules['min_len'], 'entry')}, "
                          f"got {len(value)}; add entries")
        if len(value) != rules.get("length", len(value)):
            errors.append(f"{key}: needs exactly {plural(rules['length'], 'entry')}, "
                          f"got {len(value)}; give {rules['length']} values")
        for index, item in enumerate(value):  # the other rules apply to every item
            _check_rules(item, rules, f"{key}[{index}]", errors)
    elif isinstance(value, str):
        choices = rules.get("choices")
        if choices is not None and value not in choices:
            errors.append(choice_error(key, value, choices))
        if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
            errors.append(f"{key}: {value!r} {rules.get('pattern_hint', 'has the wrong form')}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        for rule, symbol, holds in (("min", ">=", float.__ge__), ("gt", ">", float.__gt__),
                                    ("max", "<=", float.__le__), ("lt", "<", float.__lt__)):
            if rule in rules and not holds(float(value), float(rules[rule])):
                errors.append(f"{key}: must be {symbol} {rules[rule]}, got {value}; "
                              f"use a value {symbol} {rules[rule]}")
    return len(errors) == count_before


def choice_error(key: str, value: str, choices: Sequence[str]) -> str:
    """`key: unknown value ...; choose one of ...`, with the likeliest fix."""
    same_case = [choice for choice in choices if choice.lower() == str(value).lower()]
    close = same_case or difflib.get_close_matches(str(value).lower(), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown value {value!r}; choose one of {', '.join(choices)}{hint}"


def plural(count: int, word: str) -> str:
    if count == 1:
        return f"1 {word}"
    return f"{count} {word[:-1]}ies" if word.endswith("y") else f"{count} {word}s"


def describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the {'integer' if isinstance(value, int) else 'number'} {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return f"a list of {plural(len(value), 'entry')}"
    return "a mapping" if isinstance(value, Mapping) else f"a {type(value).__name__}"


def _describe_type(tp: Any) -> tuple[str, str]:
    """How to name type `tp` in a message, and an example value of it."""
    origin, args = get_origin(tp), [arg for arg in get_args(tp) if arg is not type(None)]
    if origin in _UNION_ORIGINS:
        described = [_describe_type(arg) for arg in args]
        return " or ".join(words for words, _ in described), described[0][1]
    if origin is Literal:
        return " or ".join(map(repr, args)), repr(args[0])
    if origin is list:
        _, plural, example = _TYPE_WORDS[args[0]]
        return f"a list of {plural}", f"[{example}, {example}]"
    if dataclasses.is_dataclass(tp):
        return "a section (a mapping of keys)", "{}"
    return _TYPE_WORDS[tp][0], _TYPE_WORDS[tp][2]


def _type_error(tp: Any, value: Any, key: str, errors: list[str]) -> object:
    wanted, example = _describe_type(tp)
    if isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value.strip()) and tp is not str:
        fix = "remove the quotes around the number"
    elif dataclasses.is_dataclass(tp):
        fix = "write it as indented `key: value` lines"
    else:
        fix = f"write {wanted}, e.g. {example}"
    errors.append(f"{key}: expected {wanted}, got {describe_value(value)}; {fix}")
    return INVALID


def _missing_error(tp: Any, rules: Mapping[str, Any], key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if dataclasses.is_dataclass(tp):
        return f"{key}: missing required section; add a `{leaf}:` block"
    example = rules.get("example") or (rules["choices"][0] if "choices" in rules else "...")
    return f"{key}: missing required key; add it, e.g. {leaf}: {example}"


def register_key_hint(base: type, hint: Callable[[type, str], str | None]) -> None:
    """What to say of an unknown key of a section whose class derives from `base`."""
    _KEY_HINTS[base] = hint


def _schema_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of the schema below `cls`, sections included (every variant of a
    section whose class depends on its value)."""
    keys: list[str] = []
    specs = {spec.name: spec for spec in dataclasses.fields(cls)}
    for name, tp in get_type_hints(cls).items():
        keys.append(key := join_key(prefix, name))
        variants = specs[name].metadata.get("variants") if name in specs else None
        sections = list(variants()) if variants is not None else [
            arg for arg in (tp, *get_args(tp)) if dataclasses.is_dataclass(arg)][:1]
        for section in sections:
            keys.extend(k for k in _schema_keys(section, key) if k not in keys)
    return tuple(keys)


def _unknown_key_error(cls: type, prefix: str, name: str, root: type) -> str:
    key, valid = join_key(prefix, name), [spec.name for spec in dataclasses.fields(cls)]
    for base, hint in _KEY_HINTS.items():
        said = hint(cls, name) if issubclass(cls, base) else None
        if said is not None:
            return f"{key}: {said}"
    close = difflib.get_close_matches(name, valid, n=1)
    # A right key name in the wrong section (e.g. `lr` at the top level) is a likely slip too.
    elsewhere = [other for other in _schema_keys(root) if other.rsplit(".", 1)[-1] == name]
    if close or elsewhere:
        suggestion = join_key(prefix, close[0]) if close else elsewhere[0]
        hint = f"did you mean {suggestion!r}?"
    else:
        hint = f"valid keys {f'in {prefix}' if prefix else 'at the top level'}: {', '.join(valid)}"
    return f"{key}: unknown key {key!r}; {hint}"
