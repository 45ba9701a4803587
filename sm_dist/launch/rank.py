"""A rank's part of the job, under torchrun or `sm-dist train`'s own launch: hold its stage,
and on rank 0 also coordinate the training; the job's processes started on this machine."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from sm_dist.config.build import (
    build_stage,
    build_stage_modules,
    epochs_text,
    prepare_job,
    resolve_device,
)
from sm_dist.config.job import JobConfig
from sm_dist.data.datasets import Dataset
from sm_dist.engine.collectives import StageGroup
from sm_dist.engine.coordinator import RpcPipeline
from sm_dist.engine.failures import StageError
from sm_dist.engine.layout import Layout
from sm_dist.engine.replicas import ReplicaSplitError
from sm_dist.engine.transport import RankInfo, Transport
from sm_dist.engine.worker import StageWorker
from sm_dist.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME
from sm_dist.launch import processes
from sm_dist.launch.training import train_to_the_end
from sm_dist.run.run_dir import STOPPED_FILE
from sm_dist.run.session import make_console, write_failure_message
from sm_dist.run.trainer import NonFiniteLoss


def launch_local(job: JobConfig, job_path: str, overrides: Sequence[str],
                 extra_args: Sequence[str] = (), run_dir: Path | None = None) -> int:
    """Start stages x replicas processes on this machine, each running `sm-dist train` as its
    rank (launch/processes.py), their stderr kept in `run_dir`/stderr.log; returns the job's
    exit code."""
    args = ["-m", "sm_dist", "train", job_path, *extra_args]
    for override in overrides:
        args += ["--set", override]
    return processes.launch_local(job_layout(job), args, job.run.rpc_timeout, run_dir)


def job_layout(job: JobConfig) -> Layout:
    """The job's stages and replicas, rank = stage · replicas + replica."""
    return Layout(len(job.model.balance), job.model.replicas)


def world_size_error(layout: Layout, world_size: int) -> str | None:
    """What is wrong with starting `world_size` processes for the job, if anything."""
    if world_size == layout.world_size:
        return None
    if layout.replicas == 1:
        return (f"the job has {layout.stages} stages (model.balance) but {world_size} "
                f"processes were started; start exactly one per stage (e.g. torchrun "
                f"--nproc-per-node {layout.stages})")
    return (f"the job has {layout.stages} stages (model.balance) x {layout.replicas} replicas "
            f"(model.replicas) = {layout.world_size} processes but {world_size} were started; "
            f"start exactly {layout.world_size} (e.g. torchrun --nproc-per-node "
            f"{layout.world_size}, or --nnodes {layout.replicas} --nproc-per-node "
            f"{layout.stages}), or set model.replicas to match")


def run_rank(job: JobConfig, out: Path, live: bool | None, resume: bool) -> int:
    """This process's part of the job, under torchrun or launch_local: hold stage RANK; rank 0
    also coordinates. Returns the exit code."""
    # RPC's internal gloo group trips a deprecation warning in torch itself; not ours to fix.
    warnings.filterwarnings("ignore", message="You are using a Backend")
    info = RankInfo.from_env()
    # Ctrl-C under torchrun reaches every rank at once: rank 0 saves what is finished and
    # leaves (as on SIGTERM), the others just leave (a Python handler would wait for the RPC
    # call they block in). The launcher says so, once.
    signal.signal(signal.SIGINT, _terminate if info.rank == 0 else signal.SIG_DFL)
    layout = job_layout(job)
    problem = world_size_error(layout, info.world_size)
    if problem is not None:
        if info.rank == 0:
            print(f"sm-dist: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    stage_index = layout.stage_of(info.rank)
    # Several stage processes share the machine's cores: split them unless told otherwise.
    threads = job.run.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)
    device = resolve_device(job, info.local_rank)
    stage = build_stage(job, stage_index, build_stage_modules(job)[stage_index], device)
    # Bad data is bad input: found before RPC starts, so that the rank can simply exit 2.
    prepared = prepare_job(job) if info.rank == 0 else None
    transport = Transport(info, timeout=job.run.rpc_timeout,
                          worker_threads=job.run.worker_threads, device=device,
                          transport=job.run.rpc_transport, bind=job.run.bind, layout=layout)
    worker = StageWorker(stage, transport, info.rank, layout=layout)
    transport.start(worker)
    group = None
    if layout.replicas > 1:  # the stage's replicas sum over their shares of every batch
        group = StageGroup(layout, info.rank, transport.store(), device, job.run.rpc_timeout)
        worker.attach_group(group)
    if info.rank != 0:
        transport.shutdown(graceful=True)  # serve the other stages until the coordinator ends
        code = EXIT_OK
    else:
        assert prepared is not None
        code = coordinate(*prepared, transport, out, live, resume, layout)
    if group is not None:
        group.close()
    return code


def _leave(message: str) -> None:
    """Fail the job from rank 0 at once: a peer may be dead, and a graceful RPC shutdown would
    wait for it."""
    print(f"sm-dist: error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_RUNTIME)


def _terminate(signum: int, frame: object) -> None:
    if not _terminating:  # once: a second signal (torchrun forwards Ctrl-C) must not cut
        _terminating.append(signum)  # short the unwinding of the first
        raise SystemExit(128 + signum)  # unwinds through `finally`, which saves what is done


_terminating: list[int] = []


def coordinate(job: JobConfig, data: Dataset, transport: Transport, out: Path,
               live: bool | None, resume: bool, layout: Layout | None = None) -> int:
    """Rank 0: drive the training over RPC and write the run directory (`job` with
    run.iterations set from data.epochs, see prepare_job)."""
    signal.signal(signal.SIGTERM, _terminate)
    num_stages = len(job.model.balance)
    layout = layout or Layout(num_stages)
    try:
        pipeline = RpcPipeline(transport, num_stages, layout)
        hosts = {s: info["host"] for s, info in pipeline.stages.items()}
        every_host = {info["host"] for info in pipeline.ranks.values()}
        processes_text = (f"{num_stages} stage processes" if layout.replicas == 1 else
                          f"{num_stages} stages x {layout.replicas} replicas = "
                          f"{layout.world_size} processes")
        header = (f"sm-dist: {job.name}: {processes_text} on "
                  f"{', '.join(sorted(every_host))}, {job.optimizer.name}, "
                  f"{len(data.train_x)} training samples{epochs_text(job)} -> {out}")
        console = make_console(live)
        try:
            train_to_the_end(job, pipeline, data, out, header=header, live=live,
                             console=console, resume=resume, hosts=hosts)
        except NonFiniteLoss as err:
            _leave(f"{err}; see {out / STOPPED_FILE}")
    except (StageError, ReplicaSplitError) as err:
        _leave(str(err))
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        os._exit(EXIT_RUNTIME)
    except OSError as err:  # the disk filled up, or the directory went away
        _leave(write_failure_message(out, err))
    try:  # every stage finishes its last plans; one that hangs is named, not waited for
        transport.shutdown(graceful=True, timeout=job.run.rpc_timeout)
    except RuntimeError as err:
        print(f"sm-dist: error: the stages did not finish within run.rpc_timeout ({err}); "
              "the run directory is complete", file=sys.stderr, flush=True)
        os._exit(EXIT_RUNTIME)
    return EXIT_OK
