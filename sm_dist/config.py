"""The typed job schema: dataclasses read from YAML plus command-line overrides, validated."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

# A run name becomes a directory name, so no separators and not "." or "..".
NAME_PATTERN = r"(?!\.+$)[A-Za-z0-9._-]+"
FACTORY_PATTERN = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"


# Validation rules live in field metadata, where the validator and docs tests read them:
#   choices (allowed strings); pattern + pattern_hint (full-match regex, advice when it fails);
#   min / gt / max / lt (numeric >=, >, <=, <; applied to every item of a list);
#   min_len / length (list sizes); example (shown when a required key is missing).


@dataclass(kw_only=True)
class MlpConfig:
    """A plain MLP: each layer is Linear + activation, except the last which is Linear alone."""
    widths: list[int] = field(metadata={"min_len": 2, "min": 1, "example": "[784, 128, 10]"})
    activation: str = field(default="relu", metadata={"choices": ("relu", "tanh", "gelu")})
    bias: bool = True


@dataclass(kw_only=True)
class ModelConfig:
    """The network (a built-in MLP or a user factory) and how its layers split into stages."""
    mlp: MlpConfig | None = None
    factory: str | None = field(default=None, metadata={
        "pattern": FACTORY_PATTERN, "pattern_hint": "must look like 'package.module:function'"})
    # Layers per stage; its length is the number of pipeline stages.
    balance: list[int] = field(metadata={"min_len": 1, "min": 1, "example": "[1, 1]"})


@dataclass(kw_only=True)
class SyntheticConfig:
    """Shape and seed of the generated classification data used by `dataset: synthetic`."""
    features: int = field(default=20, metadata={"min": 1})
    classes: int = field(default=10, metadata={"min": 2})
    train_size: int = field(default=512, metadata={"min": 1})
    test_size: int = field(default=256, metadata={"min": 1})
    seed: int = 0


@dataclass(kw_only=True)
class DataConfig:
    """Which data set to load, how to preprocess it and how to cut it into (micro)batches."""
    dataset: str = field(metadata={"choices": ("mnist", "fashion_mnist", "synthetic")})
    root: str = "data/"
    train_subset: int | None = field(default=None, metadata={"min": 1})
    test_subset: int | None = field(default=None, metadata={"min": 1})
    normalize: str = field(default="standard", metadata={"choices": ("standard", "none")})
    flatten: bool = True
    batch: Literal["full"] | int = field(default="full", metadata={"min": 1})
    microbatches: int = field(default=1, metadata={"min": 1})
    shuffle: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(kw_only=True)
class InnerStepsConfig:
    """SM's inner steps when stages fill the pipeline's bubbles (spec §5): at least `min` each,
    then more while the stage would otherwise wait for its next input, at most `max`."""
    min: int = field(metadata={"min": 1, "example": "10"})
    max: int = field(metadata={"min": 1, "example": "100"})
    fill_bubbles: bool = True


@dataclass(kw_only=True)
class OptimizerConfig:
    """The outer optimizer and, for Surrogate Minimization, its inner solver and trust region."""
    name: str = field(default="sm", metadata={
        "choices": ("sm", "gd", "gd_armijo", "sgd", "adam", "ddg")})
    inner_solver: str = field(default="cg", metadata={"choices": ("cg", "gd_armijo")})
    # A fixed count (bit-reproducible), or {min, max, fill_bubbles} to fill the idle time.
    inner_steps: int | InnerStepsConfig = field(default=20, metadata={"min": 1})
    # A fixed step for the gd_armijo inner solver; None = Armijo line search.
    inner_lr: float | None = field(default=None, metadata={"gt": 0})
    curvature: str = field(
        default="sample", metadata={"choices": ("sample", "microbatch", "batch")})
    delta_rel: float = field(default=0.3, metadata={"min": 0})
    delta_abs: float = field(default=0.0, metadata={"min": 0})
    delta_floor: float = field(default=1e-12, metadata={"gt": 0})
    rho: float = field(default=0.0, metadata={"min": 0})
    power_iterations: int = field(default=10, metadata={"min": 1})
    power_warm_start: bool = True
    cg_tol: float = field(default=1e-10, metadata={"min": 0})
    armijo_c: float = field(default=0.1, metadata={"gt": 0, "lt": 1})
    armijo_beta: float = field(default=0.9, metadata={"gt": 0, "lt": 1})
    armijo_init: float = field(default=1.0, metadata={"gt": 0})
    lr: float = field(default=0.01, metadata={"gt": 0})
    momentum: float = field(default=0.0, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata={"length": 2, "min": 0, "lt": 1})
    eps: float = field(default=1e-8, metadata={"gt": 0})


@dataclass(kw_only=True)
class RunConfig:
    """Length, seeding, numerics and bookkeeping of one training run."""
    iterations: int = field(default=30, metadata={"min": 1})
    seed: int = 0
    dtype: str = field(default="float64", metadata={"choices": ("float32", "float64")})
    device: str = field(default="cpu", metadata={"choices": ("cpu", "cuda")})
    eval_every: int = field(default=10, metadata={"min": 0})  # 0 = evaluate only at the end
    runs_dir: str = "runs"
    # Checkpoints every this many iterations (0: only at the end); keep the newest keep_last.
    checkpoint_every: int = field(default=0, metadata={"min": 0})
    keep_last: int = field(default=2, metadata={"min": 0})  # 0 keeps every checkpoint
    threads: int = field(default=0, metadata={"min": 0})  # torch threads/process; 0 = default
    # Seconds an RPC, or a stage waiting for its input, may take before the job is failed.
    rpc_timeout: float = field(default=300.0, metadata={"gt": 0})
    worker_threads: int = field(default=16, metadata={"min": 4})  # RPC threads per stage process
    # TensorPipe's transport between processes: uv (TCP), or shm on one machine, whose reactor
    # thread spins a CPU core per process (a loss when processes outnumber the cores).
    rpc_transport: str = field(default="uv", metadata={"choices": ("uv", "shm")})


@dataclass(kw_only=True)
class JobConfig:
    """One complete training job, as read from a job file."""
    name: str = field(metadata={
        "pattern": NAME_PATTERN, "example": "my-run",
        "pattern_hint": "is not a valid run name; use only letters, digits, '-', '_' and '.'"
                        " (it names the run directory)"})
    model: ModelConfig
    data: DataConfig
    loss: str = field(default="cross_entropy", metadata={"choices": ("cross_entropy", "mse")})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(Exception):
    """A job description that cannot be used; `errors` lists every problem found."""

    def __init__(self, errors: list[str], source: str = "<dict>") -> None:
        super().__init__(errors, source)  # both args, so the exception survives pickling
        self.errors: list[str] = list(errors)
        self.source = source

    def __str__(self) -> str:
        lines = [f"job {self.source} has {_plural(len(self.errors), 'error')}:"]
        return "\n".join(lines + [f"  - {error}" for error in self.errors])


def num_layers(model: ModelConfig) -> int | None:
    """Layers of an MLP (Linear+activation each, the last Linear alone); None for a factory."""
    return len(model.mlp.widths) - 1 if model.mlp is not None else None


def load_job(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML job file, apply `key.sub=value` overrides and return the validated job."""
    source = f"file {os.fspath(path)}"
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        error = f"{path}: cannot read the job file ({reason}); check the path"
        raise ConfigError([error], source) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        error = f"{path}: YAML syntax error{where} ({problem}); fix the YAML there"
        raise ConfigError([error], source) from exc
    return job_from_dict(raw, overrides, source=source)


def job_from_dict(
    raw: dict[str, Any] | None, overrides: Sequence[str] = (), source: str = "<dict>"
) -> JobConfig:
    """Build and validate a job from a plain dict (as YAML gives), after applying overrides."""
    if raw is None:  # an empty YAML file; the missing-key errors below say what to add
        raw = {}
    if not isinstance(raw, Mapping):
        error = (f"(top level): expected a mapping of sections, got {_describe_value(raw)}; "
                 "start the file with keys such as name:, model:, data:")
        raise ConfigError([error], source)
    errors: list[str] = []
    raw = _apply_overrides(raw, overrides, errors)
    built: dict[str, Any] = {}  # dotted section path -> section built without field errors
    job = _convert(JobConfig, raw, "", errors, built)
    _cross_checks(built, errors)
    if errors:
        raise ConfigError(errors, source)
    assert isinstance(job, JobConfig)
    return job


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key.sub=value` override set (value parsed as YAML)."""
    errors: list[str] = []
    result = _apply_overrides(raw, overrides, errors)
    if errors:
        raise ConfigError(errors, "overrides")
    return result


def job_to_dict(job: JobConfig) -> dict[str, Any]:
    """The job as plain dicts/lists/scalars; `job_from_dict` rebuilds an equal job from it."""
    return dataclasses.asdict(job)


def dump_job(job: JobConfig, path: str | os.PathLike[str]) -> None:
    """Write the job as YAML (fields in schema order) so that `load_job` reads it back."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(job_to_dict(job), sort_keys=False), encoding="utf-8")


def _apply_overrides(
    raw: Mapping[str, Any], overrides: Sequence[str], errors: list[str]
) -> dict[str, Any]:
    result = copy.deepcopy(dict(raw))  # never mutate the caller's dict
    for override in overrides:
        key_text, sep, value_text = str(override).partition("=")
        parts = [part.strip() for part in key_text.split(".")]
        if not sep or not all(parts):
            errors.append(f"override {override!r}: malformed; write key.sub=value, e.g. run.seed=1")
            continue
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError:
            errors.append(f"override {override!r}: the value is not valid YAML; quote or fix it")
            continue
        node = result
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent or null: create the section
                node[part] = {}
            if not isinstance(node[part], dict):
                section = ".".join(parts[: depth + 1])
                errors.append(f"override {override!r}: {section} is "
                              f"{_describe_value(node[part])}, not a section; set {section} itself")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    return result


_INVALID = object()  # marks a value that failed conversion (its error is already recorded)
_UNION_ORIGINS = (Union, types.UnionType)
# Per scalar type: how to name it, its plural, and an example value for "how to fix" hints.
_TYPE_WORDS = {bool: ("true or false", "booleans", "true"), int: ("an integer", "integers", "10"),
               float: ("a number", "numbers", "0.1"), str: ("a string", "strings", "'text'")}
# PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string; accept that spelling for float fields.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_PLAIN_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(tp: Any, value: Any, key: str, errors: list[str], built: dict[str, Any]) -> Any:
    """Convert one raw value to type `tp`, recording errors; returns _INVALID on failure."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty YAML section (`optimizer:`) means "all defaults"
            value = {}
        if isinstance(value, Mapping):
            return _convert_section(tp, value, key, errors, built)
    elif origin in _UNION_ORIGINS:
        members = [arg for arg in args if arg is not type(None)]
        if value is None and len(members) < len(args):
            return None
        if len(members) == 1:
            return _convert(members[0], value, key, errors, built)
        sections = [m for m in members if dataclasses.is_dataclass(m)]
        if sections and isinstance(value, Mapping):  # a mapping can only mean the section
            return _convert(sections[0], value, key, errors, built)
        for member in members:  # first member that accepts the value wins
            converted = _convert(member, value, key, [], built)
            if converted is not _INVALID:
                return converted
    elif origin is Literal:
        if isinstance(value, str) and value in args:
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            items = [_convert(args[0], item, f"{key}[{index}]", errors, built)
                     for index, item in enumerate(value)]
            return _INVALID if any(item is _INVALID for item in items) else items
    elif tp is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            errors.append(f"{key}: expected a finite number, got {value}; write e.g. 0.1")
            return _INVALID
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value  # bool is an int subclass in Python, but never a valid count
    return _type_error(tp, value, key, errors)


def _convert_section(
    cls: type, raw: Mapping[Any, Any], prefix: str, errors: list[str], built: dict[str, Any]
) -> Any:
    specs, hints = {spec.name: spec for spec in dataclasses.fields(cls)}, get_type_hints(cls)
    errors.extend(_unknown_key_error(cls, prefix, str(k)) for k in raw if str(k) not in specs)
    values: dict[str, Any] = {}
    complete = True
    for name, spec in specs.items():
        key = _join(prefix, name)
        if name not in raw:
            if spec.default is MISSING and spec.default_factory is MISSING:
                errors.append(_missing_error(hints[name], spec.metadata, key))
                complete = False
            continue  # the dataclass default applies
        value = _convert(hints[name], raw[name], key, errors, built)
        if value is _INVALID or not _check_rules(value, spec.metadata, key, errors):
            complete = False
        else:
            values[name] = value
    if not complete:
        return _INVALID
    section = cls(**values)
    built[prefix] = section
    for name in specs:  # sections left at their defaults still take part in cross-field checks
        if dataclasses.is_dataclass(nested := getattr(section, name)):
            built.setdefault(_join(prefix, name), nested)
    return section


def _check_rules(value: Any, rules: Mapping[str, Any], key: str, errors: list[str]) -> bool:
    """Check a converted value against its field's metadata rules; True when it passes."""
    count_before = len(errors)
    if isinstance(value, list):
        if len(value) < rules.get("min_len", 0):
            errors.append(f"{key}: needs at least {_plural(rules['min_len'], 'entry')}, "
                          f"got {len(value)}; add entries")
        if len(value) != rules.get("length", len(value)):
            errors.append(f"{key}: needs exactly {_plural(rules['length'], 'entry')}, "
                          f"got {len(value)}; give {rules['length']} values")
        for index, item in enumerate(value):  # the other rules apply to every item
            _check_rules(item, rules, f"{key}[{index}]", errors)
    elif isinstance(value, str):
        choices = rules.get("choices")
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{key}: unknown value {value!r}; "
                          f"choose one of {', '.join(choices)}{hint}")
        if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
            errors.append(f"{key}: {value!r} {rules.get('pattern_hint', 'has the wrong form')}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        for rule, symbol, holds in (("min", ">=", float.__ge__), ("gt", ">", float.__gt__),
                                    ("max", "<=", float.__le__), ("lt", "<", float.__lt__)):
            if rule in rules and not holds(float(value), float(rules[rule])):
                errors.append(f"{key}: must be {symbol} {rules[rule]}, got {value}; "
                              f"use a value {symbol} {rules[rule]}")
    return len(errors) == count_before


def _plural(count: int, word: str) -> str:
    if count == 1:
        return f"1 {word}"
    return f"{count} {word[:-1]}ies" if word.endswith("y") else f"{count} {word}s"


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the {'integer' if isinstance(value, int) else 'number'} {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return f"a list of {_plural(len(value), 'entry')}"
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
    errors.append(f"{key}: expected {wanted}, got {_describe_value(value)}; {fix}")
    return _INVALID


def _missing_error(tp: Any, rules: Mapping[str, Any], key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if dataclasses.is_dataclass(tp):
        return f"{key}: missing required section; add a `{leaf}:` block"
    example = rules.get("example") or (rules["choices"][0] if "choices" in rules else "...")
    return f"{key}: missing required key; add it, e.g. {leaf}: {example}"


@cache
def _schema_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of the schema below `cls`, sections included."""
    keys: list[str] = []
    for name, tp in get_type_hints(cls).items():
        keys.append(key := _join(prefix, name))
        section = next((arg for arg in (tp, *get_args(tp)) if dataclasses.is_dataclass(arg)), None)
        keys.extend(_schema_keys(section, key) if section is not None else ())
    return tuple(keys)


def _unknown_key_error(cls: type, prefix: str, name: str) -> str:
    key, valid = _join(prefix, name), [spec.name for spec in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1)
    # A right key name in the wrong section (e.g. `lr` at the top level) is a likely slip too.
    elsewhere = [other for other in _schema_keys(JobConfig) if other.rsplit(".", 1)[-1] == name]
    if close or elsewhere:
        suggestion = _join(prefix, close[0]) if close else elsewhere[0]
        hint = f"did you mean {suggestion!r}?"
    else:
        hint = f"valid keys {f'in {prefix}' if prefix else 'at the top level'}: {', '.join(valid)}"
    return f"{key}: unknown key {key!r}; {hint}"


def _cross_checks(built: dict[str, Any], errors: list[str]) -> None:
    """Checks that span fields; each runs only if the sections it reads were built cleanly."""
    model, data, optimizer = built.get("model"), built.get("data"), built.get("optimizer")
    if isinstance(model, ModelConfig):
        if (model.mlp is None) == (model.factory is None):
            given = "both" if model.mlp is not None else "neither"
            errors.append(f"model: {given} of model.mlp and model.factory given; give exactly "
                          "one (mlp: {widths: [...]} or factory: 'package.module:function')")
        layers, balance = num_layers(model), model.balance
        if layers is not None and sum(balance) != layers:
            errors.append(f"model.balance: balance {balance} covers "
                          f"{_plural(sum(balance), 'layer')} but model.mlp.widths defines "
                          f"{layers}; make the entries sum to {layers}")
        if layers is not None and len(balance) > layers:
            errors.append(f"model.balance: {_plural(len(balance), 'stage')} but the model has "
                          f"only {_plural(layers, 'layer')}; use at most {layers} stages")
    if isinstance(data, DataConfig):
        if isinstance(data.batch, int):
            sizes = {"data.batch": data.batch}
        else:  # a full batch is the whole training set: check it where its size is known here
            sizes = {"data.train_subset": data.train_subset}
            if data.dataset == "synthetic":
                sizes["data.synthetic.train_size"] = data.synthetic.train_size
        known = {source: size for source, size in sizes.items() if size is not None}
        source = min(known, key=lambda name: known[name], default=None)
        if source is not None and data.microbatches > known[source]:
            errors.append(f"data.microbatches: {data.microbatches} microbatches exceed the batch "
                          f"of {known[source]} samples ({source}); use at most {known[source]}")
    if isinstance(optimizer, OptimizerConfig):
        if optimizer.delta_rel == 0 and optimizer.delta_abs == 0:
            errors.append("optimizer.delta_rel: delta_rel and delta_abs are both 0, so the trust "
                          "region radius δ would be 0; set delta_rel > 0 (e.g. 0.3) or "
                          "delta_abs > 0")
        steps = optimizer.inner_steps
        if isinstance(steps, InnerStepsConfig) and steps.max < steps.min:
            errors.append(f"optimizer.inner_steps.max: max {steps.max} is below min {steps.min}; "
                          f"set max >= min")
        sm = optimizer.name == "sm"
        if sm and optimizer.rho > 0 and optimizer.inner_solver != "gd_armijo":
            errors.append(f"optimizer.rho: rho = {optimizer.rho} needs inner_solver: gd_armijo "
                          "(CG minimises only a quadratic); set optimizer.inner_solver: "
                          "gd_armijo or optimizer.rho: 0")
    if isinstance(model, ModelConfig) and isinstance(data, DataConfig) and model.mlp is not None:
        _check_mlp_fits_data(model.mlp, data, errors)


def _check_mlp_fits_data(mlp: MlpConfig, data: DataConfig, errors: list[str]) -> None:
    if data.dataset == "synthetic":  # synthetic samples are vectors already; flatten is moot
        inputs, input_source = data.synthetic.features, "data.synthetic.features"
        outputs, output_source = data.synthetic.classes, "data.synthetic.classes"
    elif not data.flatten:
        errors.append(f"data.flatten: false, but model.mlp needs vectors, not {data.dataset} "
                      "images; set data.flatten: true (or use model.factory)")
        return
    else:
        inputs, input_source = 784, f"the flattened 28x28 {data.dataset} images"
        outputs, output_source = 10, f"the {data.dataset} classes"
    if mlp.widths[0] != inputs:
        errors.append(f"model.mlp.widths: first width {mlp.widths[0]} does not match "
                      f"{input_source} ({inputs}); set model.mlp.widths[0] to {inputs}")
    if mlp.widths[-1] != outputs:
        errors.append(f"model.mlp.widths: last width {mlp.widths[-1]} does not match "
                      f"{output_source} ({outputs}); set model.mlp.widths[-1] to {outputs}")
