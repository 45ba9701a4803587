"""From a validated job to its parts: data, device, optimizer, stages, a one-process pipeline
(shared by every way of running a job)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

import torch
from torch import nn

from sm_dist.config.job import JobConfig, replica_batch_errors
from sm_dist.data.batches import BatchStream
from sm_dist.data.custom import call_factory, dataset_from, source_of, take_subsets
from sm_dist.data.datasets import Dataset, load_dataset
from sm_dist.math.losses import get_loss
from sm_dist.models.build import check_samplewise, init_model, split_stages
from sm_dist.models.config import model_builder
from sm_dist.optim import registry
from sm_dist.optim.base import Optimizer
from sm_dist.pipeline.local import LocalPipeline
from sm_dist.pipeline.stage import Stage

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class JobSetupError(Exception):
    """The job is valid as a file but cannot run here (device, model factory, data shapes)."""


def torch_dtype(job: JobConfig) -> torch.dtype:
    return DTYPES[job.run.dtype]


def resolve_device(job: JobConfig, local_rank: int = 0) -> torch.device:
    """The CPU, or GPU `local_rank` (round-robin when a node has more stage processes than
    GPUs, so that several stages can share one)."""
    if job.run.device == "cuda":
        if not torch.cuda.is_available():
            raise JobSetupError("run.device is cuda but no CUDA device is visible here; "
                                "set run.device=cpu or run on a machine with a GPU")
        return torch.device("cuda", gpu_of(local_rank))
    return torch.device("cpu")


def gpu_of(local_rank: int) -> int:
    """The GPU a node's `local_rank`-th stage process uses."""
    return local_rank % torch.cuda.device_count()


def load_job_data(job: JobConfig) -> Dataset:
    """The job's data set, or what its data.factory returns (checked), cut to the subsets."""
    d = job.data
    if d.factory is None:
        assert d.dataset is not None  # the job's cross-checks: exactly one of the two
        return load_dataset(d.dataset, d.root, train_subset=d.train_subset,
                            test_subset=d.test_subset, normalize=d.normalize, flatten=d.flatten,
                            dtype=torch_dtype(job), synthetic=asdict(d.synthetic),
                            path=d.path, context=d.context, text_bytes=d.text_bytes)
    data = dataset_from(call_factory(d.factory), source_of(d.factory), torch_dtype(job))
    return take_subsets(data, d.train_subset, d.test_subset)


def prepare_job(job: JobConfig) -> tuple[JobConfig, Dataset]:
    """The job's data, and the job with run.iterations set from data.epochs when given."""
    data = load_job_data(job)
    if job.model.replicas > 1:  # now that the training set's size is known
        problems = replica_batch_errors(job.model.replicas, job.data,
                                        {"the training set": len(data.train_x)})
        if problems:
            raise JobSetupError(problems[0])
    if job.data.epochs is None:
        return job, data
    per_epoch = BatchStream.batches_in_epoch(len(data.train_x), job.data.batch)
    run = dataclasses.replace(job.run, iterations=job.data.epochs * per_epoch)
    return dataclasses.replace(job, run=run), data


def epochs_text(job: JobConfig) -> str:
    """', 3 epochs = 120 iterations' for a run whose length data.epochs sets, else ''."""
    if job.data.epochs is None:
        return ""
    return f", {job.data.epochs} epochs = {job.run.iterations} iterations"


def build_stage_modules(job: JobConfig) -> list[nn.Sequential]:
    """The model, initialised from run.seed, split by model.balance."""
    model_cfg = job.model
    builder = model_builder(model_cfg)
    try:
        model = init_model(builder, job.run.seed, torch_dtype(job))
        stages = split_stages(model, model_cfg.balance)
        for stage in stages:
            check_samplewise(stage)
    except (ValueError, TypeError) as err:
        raise JobSetupError(f"model: {err}") from err
    return stages


def has_minibatches(job: JobConfig) -> bool:
    """Whether the batch changes every iteration, as far as the job file says."""
    return job.data.minibatches()


def build_optimizer(job: JobConfig) -> Optimizer:
    """The job's optimizer (`optimizer.name` in the registry)."""
    return registry.get(job.optimizer.name)(job.optimizer, len(job.model.balance))


def build_stage(job: JobConfig, index: int, module: nn.Module, device: torch.device) -> Stage:
    """Stage `index` on `device`, with its optimizer's part attached."""
    num_stages = len(job.model.balance)
    loss = get_loss(job.loss) if index == num_stages - 1 else None
    stage = Stage(index, num_stages, module.to(device), loss, seed=job.run.seed)
    part = build_optimizer(job).for_stage(stage)
    part.split_backward = job.run.split_backward
    stage.optimizer = part
    return stage


def build_local_pipeline(job: JobConfig, device: torch.device) -> LocalPipeline:
    modules = build_stage_modules(job)
    return LocalPipeline([build_stage(job, s, m, device) for s, m in enumerate(modules)])
