"""One training run from the coordinator's side: run directory, monitor, checkpoints, trace."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from sm_dist.config.build import build_optimizer
from sm_dist.config.job import JobConfig
from sm_dist.data.datasets import Dataset
from sm_dist.pipeline.interface import Pipeline
from sm_dist.pipeline.plan_log import PLAN_LOG, PlanLogWriter
from sm_dist.pipeline.timeline import TraceWriter
from sm_dist.run.checkpoints import (
    ResumePoint,
    check_resumable,
    complete_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sm_dist.run.metrics import IterationRecord
from sm_dist.run.monitor import LiveMonitor, PlainMonitor, run_header, stage_infos
from sm_dist.run.run_dir import RunDirectory, StopNote, write_stop_note
from sm_dist.run.tensorboard import TensorBoardSink
from sm_dist.run.trainer import NonFiniteLoss, train


def use_live_monitor(live: bool | None) -> bool:
    """The live view on a terminal unless --no-live; --live forces it (e.g. under `script`)."""
    return sys.stdout.isatty() if live is None else live


def make_console(live: bool | None) -> Console:
    return Console(force_terminal=True) if live else Console()  # --live: even into a file


def run_training(job: JobConfig, pipeline: Pipeline, data: Dataset, out: Path, *,
                 header: str, live: bool | None, console: Console, resume: bool = False,
                 hosts: dict[int, str] | None = None) -> None:
    """Train and write the run directory (config, metrics, checkpoints, model, trace, the
    dispatched plans); the pipeline is ready to use. The summary and plots are the caller's
    (sm_dist.report)."""
    point: ResumePoint | None = None
    if resume:
        checkpoint, passed = check_resumable(out, job)
        point, states = load_checkpoint(checkpoint)
        pipeline.restore_checkpoint(states)
        header += f" (resumed after iteration {point.iteration} from {checkpoint}"
        header += f"; passed over {'; '.join(passed)})" if passed else ")"
    run_dir = RunDirectory(out, job, resume_after=point.last_record if point else None)
    console.print(run_header(header, stage_infos(pipeline)))
    monitor = (LiveMonitor.for_job(job, pipeline, console) if use_live_monitor(live)
               else PlainMonitor(job.run.iterations, metrics=build_optimizer(job).Metrics))
    if point is not None:
        monitor.progress(point.last_record)

    board = (TensorBoardSink(out, point.iteration if point else None)
             if job.run.tensorboard else None)

    def on_record(record: IterationRecord) -> None:
        run_dir.write_record(record)
        if board is not None:
            board.write(record)
        monitor.record(record)

    def on_checkpoint(at: ResumePoint, states: list[dict]) -> None:
        save_checkpoint(out, at, states, job.run.keep_last)

    if pipeline.measures_timeline:  # the stages' timeline, streamed
        trace = TraceWriter(out / "trace.json", pipeline.num_stages, hosts)
        pipeline.events.sink = trace.write
    else:  # one action at a time: its costs, for simulate
        trace = TraceWriter(out / "actions.json", pipeline.num_stages)
        pipeline.action_sink = trace.write
    plans = PlanLogWriter(out / PLAN_LOG, "w")  # as the trace: this attempt's passes
    pipeline.dispatch_sink = plans.write
    try:
        with monitor:
            try:
                train(job, pipeline, data, on_record, monitor.progress, on_checkpoint, point,
                      keep_records=False)  # they are in metrics.jsonl
            except NonFiniteLoss as err:  # said in the run directory, then to the caller
                kept = complete_checkpoints(out)
                write_stop_note(out, StopNote(err.iteration, err.what, str(err), err.loss,
                                              str(kept[-1]) if kept else None))
                raise
        run_dir.save_model(pipeline.state_dicts())
    finally:
        pipeline.dispatch_sink = None
        run_dir.close()
        trace.close()
        plans.close()
        if board is not None:
            board.close()
