"""The typed job schema: each component's section, read from YAML plus command-line
overrides, validated with every error at once."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sm_dist.config.optimizer_section import (
    every_optimizer_options,
    optimizer_options,
    switch_optimizer,
)
from sm_dist.config.schema import convert, describe_value, plural
from sm_dist.data.config import DataConfig
from sm_dist.data.datasets import DATASETS
from sm_dist.data.text import VOCAB
from sm_dist.models.config import (
    CnnConfig,
    MlpConfig,
    ModelConfig,
    TransformerConfig,
    builders_given,
    model_errors,
)
from sm_dist.optim import registry
from sm_dist.optim.options import OptimizerOptions
from sm_dist.whole_files import write_text_whole

# A run name becomes a directory name, so no separators and not "." or "..".
NAME_PATTERN = r"(?!\.+$)[A-Za-z0-9._-]+"


@dataclass(kw_only=True)
class RunConfig:
    """Length, seeding, numerics and bookkeeping of one training run."""
    iterations: int = field(default=30, metadata={"min": 1})
    seed: int = 0
    dtype: str = field(default="float64", metadata={"choices": ("float32", "float64")})
    device: str = field(default="cpu", metadata={"choices": ("cpu", "cuda")})
    eval_every: int = field(default=10, metadata={"min": 0})  # 0 = evaluate only at the end
    # Also evaluate the whole training set this often (0: never), so that minibatch runs have
    # a training curve that is not one minibatch's loss.
    eval_train_every: int = field(default=0, metadata={"min": 0})
    # TensorBoard event files in the run directory's tensorboard/ (the `tensorboard` extra);
    # metrics.jsonl stays the record.
    tensorboard: bool = False
    runs_dir: str = "runs"
    # --no-live (or output that is not a terminal): a progress line every this many iterations
    # and one for the last; 0 picks the interval that prints at most 200 lines.
    log_every: int = field(default=0, metadata={"min": 0})
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
    # A loss that is not finite: stop after that iteration, keeping the last finite
    # checkpoint (the run exits 1), or skip on (keep training).
    on_nonfinite: str = field(default="stop", metadata={"choices": ("stop", "skip")})
    # Time each backward as its input-gradient and weight-gradient halves, what zero-bubble
    # schedules run apart (`sm-dist simulate --schedule zb|zbv` needs them measured); for
    # optimizers whose update needs only the gradient.
    split_backward: bool = False
    # The network interface every socket of a stage listens on (e.g. eth0); null: loopback
    # when the job is on one machine (several need it set). The job's network must be trusted.
    bind: str | None = None


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
    # The chosen optimizer's own Options (optimizer.name picks the class).
    optimizer: OptimizerOptions = field(
        default_factory=lambda: registry.get("sm").Options(),
        metadata={"resolve": optimizer_options, "variants": every_optimizer_options})
    run: RunConfig = field(default_factory=RunConfig)




class ConfigError(Exception):
    """A job description that cannot be used; `errors` lists every problem found."""

    def __init__(self, errors: list[str], source: str = "<dict>") -> None:
        super().__init__(errors, source)  # both args, so the exception survives pickling
        self.errors: list[str] = list(errors)
        self.source = source

    def __str__(self) -> str:
        lines = [f"job {self.source} has {plural(len(self.errors), 'error')}:"]
        return "\n".join(lines + [f"  - {error}" for error in self.errors])


def load_job(path: str | os.PathLike[str], overrides: Sequence[str] = (),
             notes: list[str] | None = None) -> JobConfig:
    """Read a YAML job file, apply `key.sub=value` overrides and return the validated job
    (`notes`: gets a line for what an override of optimizer.name dropped)."""
    return job_from_dict(read_job_file(path), overrides, source=f"file {os.fspath(path)}",
                         notes=notes)


def read_job_file(path: str | os.PathLike[str]) -> Any:
    """A job file's YAML as plain data (validated by `job_from_dict`)."""
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
    return raw


def job_from_dict(
    raw: dict[str, Any] | None, overrides: Sequence[str] = (), source: str = "<dict>",
    notes: list[str] | None = None
) -> JobConfig:
    """Build and validate a job from a plain dict (as YAML gives), after applying overrides.
    An override that switches optimizer.name drops the old optimizer's own options (so that
    one job file serves every optimizer), with a line in `notes` saying which."""
    if raw is None:  # an empty YAML file; the missing-key errors below say what to add
        raw = {}
    if not isinstance(raw, Mapping):
        error = (f"(top level): expected a mapping of sections, got {describe_value(raw)}; "
                 "start the file with keys such as name:, model:, data:")
        raise ConfigError([error], source)
    errors: list[str] = []
    before = raw
    raw = _apply_overrides(raw, overrides, errors)
    _load_optimizer_plugin(raw, errors)
    switch_optimizer(before, raw, notes)
    built: dict[str, Any] = {}  # dotted section path -> section built without field errors
    job = convert(JobConfig, raw, "", errors, built, JobConfig)
    _cross_checks(built, errors)
    if errors:
        raise ConfigError(errors, source)
    assert isinstance(job, JobConfig)
    job.optimizer.settle(job.data.minibatches())
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


def job_differences(a: JobConfig, b: JobConfig) -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two jobs, sorted, each with (a's, b's)."""
    found: dict[str, tuple[Any, Any]] = {}

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                walk(x.get(key), y.get(key), f"{prefix}.{key}" if prefix else key)
        elif x != y:
            found[prefix] = (x, y)

    walk(job_to_dict(a), job_to_dict(b), "")
    return found


def dump_job(job: JobConfig, path: str | os.PathLike[str]) -> None:
    """Write the job as YAML (fields in schema order) so that `load_job` reads it back; the file
    is whole or absent (written to a temporary name and renamed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(Path(path), yaml.safe_dump(job_to_dict(job), sort_keys=False))


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
                              f"{describe_value(node[part])}, not a section; set {section} itself")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    return result


def _load_optimizer_plugin(raw: Mapping[str, Any], errors: list[str]) -> None:
    """Import an optimizer named 'package.module:Class', so that the schema knows the name."""
    section = raw.get("optimizer")
    name = section.get("name") if isinstance(section, Mapping) else None
    if isinstance(name, str) and ":" in name:
        try:
            registry.load(name)
        except registry.UnknownOptimizer as err:
            errors.append(f"optimizer.name: {err}; check that its module is on the Python path")


def _cross_checks(built: dict[str, Any], errors: list[str]) -> None:
    """Checks that span fields; each runs only if the sections it reads were built cleanly."""
    model, data, optimizer = built.get("model"), built.get("data"), built.get("optimizer")
    if isinstance(model, ModelConfig):
        errors.extend(model_errors(model))  # exactly one builder, balance, shapes, heads
    if isinstance(data, DataConfig):
        if (data.dataset is None) == (data.factory is None):
            given = "both" if data.dataset is not None else "neither"
            errors.append(f"data: {given} of data.dataset and data.factory given; give exactly "
                          f"one (dataset: {' | '.join(DATASETS)}, or factory: "
                          "'package.module:function' returning your tensors)")
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
    if isinstance(optimizer, OptimizerOptions):  # the name is valid: the section was built
        errors.extend(registry.get(optimizer.name).check_config(optimizer))
        run = built.get("run")
        if (isinstance(run, RunConfig) and run.split_backward
                and "zb" not in registry.get(optimizer.name).schedules()):
            errors.append(f"run.split_backward: {optimizer.name}'s backward builds its local "
                          "model and cannot be split (zero-bubble schedules are for optimizers "
                          "whose update needs only the gradient); set run.split_backward: "
                          "false")
    if isinstance(model, ModelConfig) and model.replicas > 1:
        if isinstance(data, DataConfig):
            errors.extend(replica_batch_errors(model.replicas, data, _known_sizes(data)))
        if (isinstance(optimizer, OptimizerOptions) and optimizer.replica_mode != "exact"
                and not registry.get(optimizer.name).can_average_steps):
            errors.append(f"optimizer.replica_mode: {optimizer.replica_mode} is for sm only; "
                          f"{optimizer.name}'s replicas sum their gradients (set "
                          "optimizer.replica_mode: exact)")
    if (isinstance(model, ModelConfig) and isinstance(data, DataConfig)
            and len(builders_given(model)) == 1 and data.dataset is not None):
        # A data.factory's data, and a model.factory's network, are checked when loaded.
        if model.mlp is not None:
            _check_mlp_fits_data(model.mlp, data, errors)
        elif model.cnn is not None:
            _check_cnn_fits_data(model.cnn, data, errors)
        elif model.transformer is not None:
            _check_transformer_fits_data(model.transformer, data, errors)


def _known_sizes(data: DataConfig) -> dict[str, int]:
    """The training-set sizes the job file gives (train_subset, a synthetic set's size)."""
    sizes = {"data.train_subset": data.train_subset}
    if data.dataset == "synthetic":
        sizes["data.synthetic.train_size"] = data.synthetic.train_size
    return {source: size for source, size in sizes.items() if size is not None}


def replica_batch_errors(replicas: int, data: DataConfig, train_sizes: dict[str, int]
                         ) -> list[str]:
    """Whether every batch splits evenly over the replicas, with a sample of every microbatch
    for each (the training set's size from `train_sizes`, its sources by key, where known)."""
    train = min(train_sizes.values(), default=None)
    source = min(train_sizes, key=lambda name: train_sizes[name], default="")
    batch = data.batch if isinstance(data.batch, int) else None
    if batch is not None and train is not None and batch >= train:
        batch = None  # a batch at least the training set is the full batch
    sizes: list[tuple[int, str]] = []
    if batch is not None:
        sizes.append((batch, f"data.batch {batch}"))
        if train is not None and train % batch:
            sizes.append((train % batch, f"the last batch of an epoch ({train} samples of "
                          f"{source}, in batches of {batch}, leave {train % batch})"))
    elif train is not None:
        sizes.append((train, f"the full batch of {train} samples ({source})"))
    errors = []
    for size, what in sizes:
        if size % replicas:
            errors.append(f"model.replicas: {what} does not split evenly over {replicas} "
                          f"replicas; make every batch a multiple of {replicas} (or change "
                          "model.replicas)")
        elif size // min(data.microbatches, size) < replicas:
            errors.append(f"data.microbatches: {data.microbatches} microbatches of {what} "
                          f"hold fewer than {replicas} samples each, one per replica; use at "
                          f"most {size // replicas} microbatches")
    return errors


def _check_mlp_fits_data(mlp: MlpConfig, data: DataConfig, errors: list[str]) -> None:
    """model.mlp's first and last widths against the data's samples and classes."""
    if data.dataset == "text":
        errors.append("model.mlp: data.dataset text gives token sequences, which an MLP "
                      "cannot take; use model.transformer")
        return
    if data.dataset == "synthetic":  # synthetic samples are vectors already; flatten is moot
        inputs, input_source = data.synthetic.features, "data.synthetic.features"
        outputs, output_source = data.synthetic.classes, "data.synthetic.classes"
    elif not data.flatten:
        errors.append(f"data.flatten: false, but model.mlp needs vectors, not {data.dataset} "
                      "images; set data.flatten: true (or use model.cnn)")
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


def _check_cnn_fits_data(cnn: CnnConfig, data: DataConfig, errors: list[str]) -> None:
    """model.cnn takes (1, 28, 28) images of 10 classes from mnist and fashion_mnist."""
    if data.dataset in ("synthetic", "text"):
        errors.append(f"model.cnn: data.dataset {data.dataset} gives "
                      f"{'vectors' if data.dataset == 'synthetic' else 'token sequences'}, not "
                      "images; use mnist or fashion_mnist (or a data.factory giving images)")
        return
    if data.flatten:
        errors.append(f"data.flatten: true, but model.cnn needs {data.dataset} images of shape "
                      "(1, 28, 28), not vectors of 784; set data.flatten: false")
    if cnn.input != [1, 28, 28]:
        errors.append(f"model.cnn.input: {cnn.input} does not match the {data.dataset} images "
                      "(1 channel of 28x28); set model.cnn.input to [1, 28, 28]")
    if cnn.classes != 10:
        errors.append(f"model.cnn.classes: {cnn.classes} does not match the 10 {data.dataset} "
                      "classes; set model.cnn.classes to 10")


def _check_transformer_fits_data(t: TransformerConfig, data: DataConfig,
                                 errors: list[str]) -> None:
    """model.transformer takes byte sequences of data.context tokens from data.dataset text."""
    if data.dataset != "text":
        errors.append(f"model.transformer: data.dataset {data.dataset} gives no token "
                      "sequences; use data.dataset: text (or a data.factory giving tokens)")
        return
    if t.vocab != VOCAB:
        errors.append(f"model.transformer.vocab: {t.vocab} does not match the {VOCAB} byte "
                      f"values of data.dataset text; set model.transformer.vocab to {VOCAB}")
    if t.context < data.context:
        errors.append(f"model.transformer.context: {t.context} positions are fewer than the "
                      f"{data.context} tokens of a sample (data.context); set "
                      f"model.transformer.context to at least {data.context}")
