"""The sm-dist command line: train and validate job files."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from sm_dist.config import ConfigError, JobConfig, load_job
from sm_dist.data import DataError, Dataset
from sm_dist.engine import launch_local, run_rank
from sm_dist.job import (
    JobSetupError,
    build_stage,
    build_stage_modules,
    load_job_data,
    resolve_device,
)
from sm_dist.local_pipeline import LocalPipeline
from sm_dist.run_dir import RunDirectory, RunDirError, check_run_dir, default_run_dir
from sm_dist.trainer import Record, train
from sm_dist.transport import TransportError, under_launcher

EXIT_OK, EXIT_RUNTIME, EXIT_BAD_INPUT = 0, 1, 2


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file (YAML), e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a job-file key, e.g. --set optimizer.inner_steps=10 "
                             "(repeatable; the value is read as YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sm-dist",
        description="Pipeline-parallel training with Surrogate Minimization (SM) and baselines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_cmd = commands.add_parser(
        "train", help="train the model a job file describes",
        description="Train the model a job file describes, one process per stage (started "
                    "here, or joined as a rank under torchrun), and write a run directory "
                    "(config.yaml, metrics.jsonl, trace.json). Exit codes: 0 done, 2 bad "
                    "input, 1 failure.")
    _job_args(train_cmd)
    train_cmd.add_argument("--single-process", action="store_true",
                           help="run every stage in this one process, in pipeline order "
                                "(the reference the multi-process engine is tested against)")
    train_cmd.add_argument("--no-live", action="store_true",
                           help="plain progress lines instead of the live monitor")
    train_cmd.add_argument("--out", type=Path, default=None,
                           help="run directory (default: <run.runs_dir>/<name>-<timestamp>/)")

    validate_cmd = commands.add_parser(
        "validate", help="check a job file without running it",
        description="Check a job file (every error at once) without running anything.")
    _job_args(validate_cmd)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"sm-dist: error: {message}", file=sys.stderr)
    return code


def _to_device(data: Dataset, device: torch.device) -> Dataset:
    return replace(data, train_x=data.train_x.to(device), train_y=data.train_y.to(device),
                   test_x=data.test_x.to(device), test_y=data.test_y.to(device))


def format_record(record: Record, iterations: int) -> str:
    """One plain progress line per iteration."""
    parts = [f"iter {record['iteration']:>{len(str(iterations))}}/{iterations}",
             f"loss {record['train_loss']:.4f}", f"acc {record['train_acc']:.3f}"]
    if "predicted_decrease" in record:
        parts.append(f"pred {record['predicted_decrease']:+.3e}")
        parts.append("inner " + ",".join(str(s) for s in record["inner_steps"]))
    if "step_size" in record:
        parts.append(f"step {record['step_size']:.3g} ({record['line_search_trials']} trials)")
    if "test_acc" in record:
        parts.append(f"test_loss {record['test_loss']:.4f} test_acc {record['test_acc']:.3f}")
    parts.append(f"{record['wall_time']:.1f}s")
    return "  ".join(parts)


def run_train(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.overrides)

    def print_record(record: Record) -> None:
        print(format_record(record, job.run.iterations), flush=True)

    if under_launcher():  # a rank of a job started by torchrun or by launch_local below
        rank = int(os.environ["RANK"])
        out = args.out if args.out is not None else default_run_dir(job)
        if rank == 0:
            check_run_dir(out)
        code = run_rank(job, out, print_record if rank == 0 else (lambda r: None),
                        lambda line: print(line, flush=True))
        if rank == 0 and code == 0:
            print(f"sm-dist: done; results in {out}")
        return code
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    out = args.out if args.out is not None else default_run_dir(job)
    check_run_dir(out)
    device = resolve_device(job)
    # Check everything a rank would trip over before any process starts or anything is written.
    data = load_job_data(job)
    modules = build_stage_modules(job)
    if not args.single_process:
        del data, modules
        extra = ["--no-live"] if args.no_live else []
        return launch_local(job, args.job, args.overrides, out, extra)
    data = _to_device(data, device)
    pipeline = LocalPipeline([build_stage(job, s, m, device) for s, m in enumerate(modules)])
    run_dir = RunDirectory(out, job)  # created only once the input is known to be good
    print(f"sm-dist: {job.name}: {len(job.model.balance)} stages in one process, "
          f"{job.optimizer.name}, {len(data.train_x)} training samples -> {out}")
    try:
        def on_record(record: Record) -> None:
            run_dir.write_record(record)
            print_record(record)
        records = train(job, pipeline, data, on_record)
        run_dir.save_model(pipeline.state_dicts())
    finally:
        run_dir.close()
    last = records[-1]
    print(f"sm-dist: done: train_loss {last['train_loss']:.4f}, "
          f"test_acc {last.get('test_acc', float('nan')):.3f}; results in {out}")
    return EXIT_OK


def run_validate(args: argparse.Namespace) -> int:
    job: JobConfig = load_job(args.job, args.overrides)
    print(f"{args.job}: valid ({job.name}: {len(job.model.balance)} stages, "
          f"optimizer {job.optimizer.name}, dataset {job.data.dataset})")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
        return run_validate(args)
    except ConfigError as err:
        return _fail(str(err), EXIT_BAD_INPUT)
    except (DataError, JobSetupError, RunDirError, TransportError) as err:
        return _fail(str(err), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return _fail("interrupted; the run directory keeps every finished iteration",
                     EXIT_RUNTIME)
