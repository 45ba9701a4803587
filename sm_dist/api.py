"""The Python API: `sm_dist.train(job, model=..., data=..., out=...)`, which `sm-dist train`
runs too. A model or data given here reach the stage processes through a private payload
directory and two factories of this module (what the run's config.yaml names)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from sm_dist.config.build import (
    JobSetupError,
    build_stage,
    build_stage_modules,
    epochs_text,
    prepare_job,
    resolve_device,
    torch_dtype,
)
from sm_dist.config.job import (
    ConfigError,
    JobConfig,
    dump_job,
    job_from_dict,
    job_to_dict,
    read_job_file,
)
from sm_dist.data.custom import API_DATA_FACTORY as DATA_FACTORY
from sm_dist.data.custom import DataLike, check_fits, dataset_from
from sm_dist.data.datasets import DataError, Dataset
from sm_dist.exit_codes import EXIT_OK
from sm_dist.launch.rank import launch_local
from sm_dist.launch.training import train_to_the_end
from sm_dist.models.build import init_model
from sm_dist.models.config import BUILDERS as MODEL_BUILDERS
from sm_dist.pipeline.local import LocalPipeline
from sm_dist.run.checkpoints import check_resumable
from sm_dist.run.metrics import IterationRecord, read_metrics
from sm_dist.run.preflight import check_free_space, model_bytes
from sm_dist.run.run_dir import check_run_dir, default_run_dir
from sm_dist.run.session import make_console
from sm_dist.run.tensorboard import check_available

JobLike = str | os.PathLike[str] | Mapping[str, Any] | JobConfig
ModelLike = nn.Sequential | Callable[[], nn.Sequential]
MODEL_FACTORY = "sm_dist.api:provided_model"
PROVIDED_ENV = "SM_DIST_PROVIDED"  # the payload directory, for the stage processes
_provided: dict[str, Any] = {}  # what this process's train() call was given


class TrainingFailed(RuntimeError):
    """The stage processes ended with an error (said on stderr); `exit_code` is theirs."""

    def __init__(self, exit_code: int, path: Path) -> None:
        super().__init__(exit_code, path)
        self.exit_code, self.path = exit_code, path

    def __str__(self) -> str:
        return (f"the stage processes failed (exit code {self.exit_code}); their error is "
                f"above, and {self.path} keeps every finished iteration")


@dataclass
class TrainResult:
    """A finished run: its directory, summary.json, and every metrics.jsonl record."""

    path: Path
    summary: dict[str, Any]
    records: list[IterationRecord]
    given_model: ModelLike | None = field(default=None, repr=False)  # train(model=...)

    def load_model(self) -> nn.Sequential:
        """The trained model, all stages in one nn.Sequential, on the CPU."""
        from sm_dist.config.job import load_job

        with _providing(self.given_model, None):  # its architecture, for provided_model
            stages = build_stage_modules(load_job(self.path / "config.yaml"))
        trained = torch.load(self.path / "model.pt", weights_only=True)["stages"]
        for module, state in zip(stages, trained):
            module.load_state_dict(state)
        return nn.Sequential(*stages)


def train(job: JobLike, *, model: ModelLike | None = None, data: DataLike | None = None,
          out: str | os.PathLike[str] | None = None, single_process: bool = False,
          resume: bool = False, overrides: Sequence[str] = (), live: bool | None = None,
          console: Console | None = None) -> TrainResult:
    """Train `job` (a job file's path, its dict, or a JobConfig) and return the run.

    `model`: an nn.Sequential split into stages between its top-level children by
    model.balance (it is copied, not changed), or a function returning one; replaces
    model.mlp / model.factory. `data`: (train_x, train_y), (train_x, train_y, test_x,
    test_y), torch Datasets (train, test) or a train Dataset, or a function returning one of
    these; replaces data.dataset / data.factory. `out`: the run directory (default
    <run.runs_dir>/<name>-<time>); `resume`: continue `out` from its newest intact checkpoint.
    `single_process`: every stage in this process, else one process per stage. `live`: the
    live monitor (None: on a terminal). Before any process starts the output directory is
    checked: free of another run, writable, with room for the checkpoints (RunDirError) or,
    resuming, with an intact checkpoint (CheckpointError). Bad input raises ConfigError,
    DataError or JobSetupError, a diverged run NonFiniteLoss, failed stage processes
    TrainingFailed.
    """
    notes: list[str] = []
    config = _job_config(job, model, data, overrides, notes)
    for note in notes:  # what an override of optimizer.name left out of the job
        print(f"sm-dist: note: {note}", file=sys.stderr, flush=True)
    if config.run.tensorboard:
        check_available()
    resolve_device(config)  # no GPU for run.device: cuda fails here, before anything runs
    with _providing(model, data):
        config, dataset = prepare_job(config)
        path = Path(out) if out is not None else default_run_dir(config)
        if resume:
            check_resumable(path, config)
        else:
            check_run_dir(path)
        console = console or make_console(live)
        modules = build_stage_modules(config)
        check_fits(modules, dataset, config.loss)
        check_free_space(path, config, model_bytes(modules), resume)  # nothing written yet
        if single_process:
            _train_here(config, modules, dataset, path, resume, live, console)
        else:
            del modules, dataset
            _train_engine(job, config, overrides, path, resume, live, model, data, console)
    return TrainResult(path, json.loads((path / "summary.json").read_text()),
                       read_metrics(path / "metrics.jsonl"), model)


def _job_config(job: JobLike, model: ModelLike | None, data: DataLike | None,
                overrides: Sequence[str], notes: list[str] | None = None) -> JobConfig:
    """The validated job, with model= and data= standing in for its model and data."""
    if isinstance(job, JobConfig):
        raw, source = job_to_dict(job), "<JobConfig>"
    elif isinstance(job, Mapping):
        raw, source = copy.deepcopy(dict(job)), "<dict>"
    else:
        raw, source = read_job_file(job), f"file {os.fspath(job)}"
    if model is None and data is None:
        return job_from_dict(raw, overrides, source, notes)
    if not isinstance(raw, Mapping):
        return job_from_dict(raw, overrides, source)  # says what the top level must be
    raw = dict(raw)
    errors = []
    for given, section, keys, factory in ((model, "model", MODEL_BUILDERS, MODEL_FACTORY),
                                          (data, "data", ("dataset", "factory"), DATA_FACTORY)):
        if given is None:
            continue
        part = dict(raw.get(section) or {})
        set_keys = [f"{section}.{key}" for key in keys if part.get(key) is not None]
        if set_keys and part.get("factory") != factory:
            errors.append(f"{section}: given to train({section}=...) and as {set_keys[0]} in "
                          f"the job; give one (leave {set_keys[0]} out)")
        part.update({key: None for key in keys})
        part["factory"] = factory
        raw[section] = part
    if errors:
        raise ConfigError(errors, source)
    return job_from_dict(raw, overrides, source, notes)


@contextmanager
def _providing(model: ModelLike | None, data: DataLike | None) -> Iterator[None]:
    """The factories of this module hand out `model` and `data` while the run lasts."""
    saved = dict(_provided)
    if model is not None:
        _provided["model"] = model
    if data is not None:
        _provided["data"] = data
    try:
        yield
    finally:
        _provided.clear()
        _provided.update(saved)


def _train_here(job: JobConfig, modules: list[nn.Sequential], data: Dataset, out: Path,
                resume: bool, live: bool | None, console: Console) -> None:
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    device = resolve_device(job)
    pipeline = LocalPipeline([build_stage(job, s, m, device) for s, m in enumerate(modules)])
    header = (f"sm-dist: {job.name}: {len(job.model.balance)} stages in one process, "
              f"{job.optimizer.name}, {len(data.train_x)} training samples"
              f"{epochs_text(job)} -> {out}")
    moved = replace(data, train_x=data.train_x.to(device), train_y=data.train_y.to(device),
                    test_x=data.test_x.to(device), test_y=data.test_y.to(device))
    train_to_the_end(job, pipeline, moved, out, header=header, live=live, console=console,
                     resume=resume)


def _train_engine(job: JobLike, config: JobConfig, overrides: Sequence[str], out: Path,
                  resume: bool, live: bool | None, model: ModelLike | None,
                  data: DataLike | None, console: Console) -> None:
    """One process per stage on this machine, each reading the job file (or its copy)."""
    extra = {None: [], True: ["--live"], False: ["--no-live"]}[live]
    extra += ["--resume", str(out)] if resume else ["--out", str(out)]
    stages, replicas = len(config.model.balance), config.model.replicas
    what = (f"{stages} stage processes" if replicas == 1 else
            f"{stages} stages x {replicas} replicas = {stages * replicas} processes")
    console.print(f"sm-dist: {config.name}: starting {what} ...", highlight=False,
                  markup=False, soft_wrap=True)
    payload = Path(tempfile.mkdtemp(prefix="sm-dist-"))  # private: mode 0700
    try:
        if isinstance(job, (str, os.PathLike)) and model is None and data is None:
            path, sets = os.fspath(job), list(overrides)  # as given: the ranks read it too
        else:
            path, sets = str(payload / "job.yaml"), []
            dump_job(config, path)
            _write_payload(payload, config, model, data)
        previous = os.environ.get(PROVIDED_ENV)
        os.environ[PROVIDED_ENV] = str(payload)
        try:
            code = launch_local(config, path, sets, extra, out)
        finally:
            if previous is None:
                os.environ.pop(PROVIDED_ENV, None)
            else:
                os.environ[PROVIDED_ENV] = previous
    finally:
        shutil.rmtree(payload, ignore_errors=True)
    if code != EXIT_OK:
        raise TrainingFailed(code, out)


def _write_payload(payload: Path, job: JobConfig, model: ModelLike | None,
                   data: DataLike | None) -> None:
    """The model (built under run.seed as a factory's would be) and the data as tensors."""
    if model is not None:
        built = init_model(provided_model, job.run.seed, torch_dtype(job))
        for module in built.modules():
            if type(module).__module__ == "__main__":
                raise JobSetupError(
                    f"model: the stage processes cannot import {type(module).__name__}, "
                    "defined in the script being run (__main__); move it into a module "
                    "they can import, or pass single_process=True")
        torch.save(built, payload / "model.pt")
    if data is not None:
        given = dataset_from(provided_data(), "train(data=...)", torch_dtype(job))
        tensors = (given.train_x, given.train_y)
        if len(given.test_x):
            tensors += (given.test_x, given.test_y)
        torch.save(tensors, payload / "data.pt")


def _given(kind: str) -> Any:
    """What train() was given as `kind`, in its own process or from the payload directory."""
    if kind in _provided:
        return _provided[kind]
    payload = os.environ.get(PROVIDED_ENV)
    if payload and (Path(payload) / f"{kind}.pt").is_file():
        # Written by this job's own train() call, in a directory only its user can read.
        _provided[kind] = torch.load(Path(payload) / f"{kind}.pt", weights_only=False)
        return _provided[kind]
    raise DataError(f"this job's {kind} was given to sm_dist.train({kind}=...) in Python and "
                    "is not available here; run (or resume) it with sm_dist.train() and the "
                    f"same {kind}=")


def provided_model() -> nn.Sequential:
    """model.factory of an API run: a copy of the given model (or the factory's model)."""
    given = _given("model")
    model = given if isinstance(given, nn.Module) else given()
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"train(model=...) gave {type(model).__name__}; stages are cut between "
                        "the top-level children of an nn.Sequential, so give one")
    return copy.deepcopy(model)


def provided_data() -> DataLike:
    """data.factory of an API run: the given data (or what the given function returns)."""
    given = _given("data")
    if callable(given) and not isinstance(given, torch.utils.data.Dataset):
        return given()
    return given
