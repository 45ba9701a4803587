"""One training run from the coordinator's side: run directory, monitor, checkpoints, trace, and
what a run that ends early leaves (a stop note, or nothing when it finished no iteration)."""

from __future__ import annotations

import signal
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
    checkpoint_iteration,
    complete_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sm_dist.run.metrics import IterationRecord, MetricsError, read_metrics
from sm_dist.run.monitor import LiveMonitor, PlainMonitor, run_header, stage_infos
from sm_dist.run.run_dir import RunDirectory, StopNote, read_stop_note, write_stop_note
from sm_dist.run.tensorboard import TensorBoardSink
from sm_dist.run.trainer import NonFiniteLoss, exploded, train


def use_live_monitor(live: bool | None) -> bool:
    """The live view on a terminal unless --no-live; --live forces it (e.g. under `script`)."""
    return sys.stdout.isatty() if live is None else live


def make_console(live: bool | None) -> Console:
    return Console(force_terminal=True) if live else Console()  # --live: even into a file


def warn(text: str) -> None:
    """A warning or note for the person running the job: on stderr, one line."""
    print(f"sm-dist: warning: {text}", file=sys.stderr, flush=True)


def _resume_point(job: JobConfig, pipeline: Pipeline, out: Path) -> tuple[ResumePoint, str]:
    """The checkpoint to continue from, restored into the pipeline, and the header's note;
    each damaged (or diverged) checkpoint passed over is said on stderr."""
    checkpoint, passed = check_resumable(out, job)
    for note in passed:
        name, _, why = note.partition(": ")
        warn(f"passed over checkpoints/{name}: {why}; resuming from {checkpoint.name}")
    point, states = load_checkpoint(checkpoint)
    pipeline.restore_checkpoint(states)
    return point, f" (resumed after iteration {point.iteration} from {checkpoint})"


def run_training(job: JobConfig, pipeline: Pipeline, data: Dataset, out: Path, *,
                 header: str, live: bool | None, console: Console, resume: bool = False,
                 hosts: dict[int, str] | None = None) -> None:
    """Train and write the run directory (config, metrics, checkpoints, model, trace, the
    dispatched plans); the pipeline is ready to use. The summary and plots are the caller's
    (sm_dist.report). A run that ends early leaves its stop note (stopped.txt), or, when it
    finished no iteration and kept no checkpoint, nothing."""
    point: ResumePoint | None = None
    if resume:
        point, resumed = _resume_point(job, pipeline, out)
        header += resumed
    run_dir = RunDirectory(out, job, resume_after=point.last_record if point else None)
    try:
        _train_into(run_dir, job, pipeline, data, header=header, live=live, console=console,
                    point=point, hosts=hosts)
    except NonFiniteLoss as err:  # said in the run directory, then to the caller
        write_stop_note(out, diverged_note(out, err))
        raise
    except BaseException as err:
        _ended_early(run_dir, err)
        raise


def _train_into(run_dir: RunDirectory, job: JobConfig, pipeline: Pipeline, data: Dataset, *,
                header: str, live: bool | None, console: Console, point: ResumePoint | None,
                hosts: dict[int, str] | None) -> None:
    """The training itself, every file it writes closed at the end, whatever happens."""
    out = run_dir.path
    console.print(run_header(header, stage_infos(pipeline)))
    monitor = (LiveMonitor.for_job(job, pipeline, console) if use_live_monitor(live)
               else PlainMonitor(job.run.iterations, metrics=build_optimizer(job).Metrics,
                                 every=job.run.log_every))
    if point is not None:
        monitor.progress(point.last_record)
    board: TensorBoardSink | None = None
    trace: TraceWriter | None = None
    plans: PlanLogWriter | None = None
    try:
        board = (TensorBoardSink(out, point.iteration if point else None)
                 if job.run.tensorboard else None)

        def on_record(record: IterationRecord) -> None:
            run_dir.write_record(record)
            if board is not None:
                board.write(record)
            monitor.record(record)

        def on_checkpoint(at: ResumePoint, states: list[dict]) -> None:
            save_checkpoint(out, at, states, job.run.keep_last, job)

        if pipeline.measures_timeline:  # the stages' timeline, streamed
            trace = TraceWriter(out / "trace.json", pipeline.num_stages, hosts)
            pipeline.events.sink = trace.write
        else:  # one action at a time: its costs, for simulate
            trace = TraceWriter(out / "actions.json", pipeline.num_stages)
            pipeline.action_sink = trace.write
        plans = PlanLogWriter(out / PLAN_LOG, "w")  # as the trace: this attempt's passes
        pipeline.dispatch_sink = plans.write
        with monitor:
            train(job, pipeline, data, on_record, monitor.progress, on_checkpoint, point,
                  keep_records=False)  # they are in metrics.jsonl
        run_dir.save_model(pipeline.state_dicts())
    finally:
        pipeline.dispatch_sink = pipeline.action_sink = pipeline.events.sink = None
        for writer in (trace, plans, board):
            if writer is not None:
                writer.close()
        run_dir.close()


def diverged_note(out: Path, err: NonFiniteLoss) -> StopNote:
    """The stop note of a diverging run: the newest checkpoint kept whose weights' training
    loss (the next iteration's, as metrics.jsonl has it) was within the stopping rule's
    bound. The newest checkpoint can hold weights that have diverged already: its own
    iteration's loss was measured before that iteration's update."""
    note = StopNote(err.iteration, err.what, str(err), err.loss)
    try:
        records = {r.iteration: r for r in read_metrics(out / "metrics.jsonl")}
    except (OSError, MetricsError):
        return note
    first = records[min(records)].train_loss if records else None
    for path in reversed(complete_checkpoints(out)):
        after = records.get(checkpoint_iteration(path) + 1)
        loss = None if after is None else after.train_loss
        if loss is not None and not exploded(loss, first):
            note.checkpoint, note.checkpoint_iteration = str(path), checkpoint_iteration(path)
            note.checkpoint_loss = loss
            break
    return note


def _ended_early(run_dir: RunDirectory, err: BaseException) -> None:
    """After a failure or a signal: remove the attempt if it finished no iteration and kept no
    checkpoint (so that the same --out works again), else leave a stop note, if the disk
    takes one."""
    out = run_dir.path
    kept = complete_checkpoints(out)
    if not run_dir.wrote_iterations and not kept:
        run_dir.discard()
        return
    kind, message = "failed", str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, OSError):
        message = f"cannot write the run directory {out}: {err.strerror or err}"
    elif isinstance(err, (KeyboardInterrupt, SystemExit)):
        kind, message = "interrupted", f"stopped by {_signal_name(err)}"
    note = StopNote(run_dir.last_iteration, message, message, kind=kind,
                    checkpoint=str(kept[-1]) if kept else None,
                    checkpoint_iteration=checkpoint_iteration(kept[-1]) if kept else None)
    try:
        write_stop_note(out, note)
    except OSError:
        pass  # a full disk: the error itself says what happened


def _signal_name(err: BaseException) -> str:
    """SIGINT for Ctrl-C, the signal of a `SystemExit(128 + signal)` (a handled SIGTERM)."""
    code = err.code if isinstance(err, SystemExit) else None
    if isinstance(code, int) and code > 128:
        try:
            return signal.Signals(code - 128).name
        except ValueError:
            pass
    return "SIGINT" if isinstance(err, KeyboardInterrupt) else "a signal"


def write_failure_message(out: Path, err: OSError) -> str:
    """What a run that could not write its directory (a full disk) says: why, and what it kept,
    each file whole."""
    head = f"cannot write the run directory {out}: {err.strerror or err}"
    if err.filename is not None:
        try:
            head += f" (writing {Path(err.filename).relative_to(out)})"
        except ValueError:
            head += f" (writing {err.filename})"
    if not (out / "config.yaml").is_file():
        return f"{head}; it finished no iteration and left nothing behind"
    try:
        records = read_metrics(out / "metrics.jsonl")
    except (OSError, MetricsError):
        records = []
    kept = complete_checkpoints(out)
    done = (f"iterations {records[0].iteration}-{records[-1].iteration} in metrics.jsonl"
            if records else "no iteration")
    if kept:
        return (f"{head}; it keeps {done} and the checkpoint after iteration "
                f"{checkpoint_iteration(kept[-1])} ({kept[-1]}), every file whole; free space, "
                f"then --resume {out}")
    return f"{head}; it keeps {done}, every file whole, but no checkpoint"


def record_cause(out: Path, message: str, kind: str = "failed") -> None:
    """The launcher's word on why a run ended (a stage killed or stopped, or the signal the
    launcher got), into its stop note when the run's own note lacks it: rank 0 was stopped by
    the launcher (its note says SIGTERM), or died itself."""
    note = read_stop_note(out)
    if note is not None and note.kind != "interrupted":
        return
    if note is None:
        try:
            records = read_metrics(out / "metrics.jsonl")
        except (OSError, MetricsError):
            records = []
        kept = complete_checkpoints(out)
        note = StopNote(records[-1].iteration if records else 0, message, message,
                        checkpoint=str(kept[-1]) if kept else None,
                        checkpoint_iteration=checkpoint_iteration(kept[-1]) if kept else None)
    note.kind, note.reason, note.message = kind, message, message
    try:
        write_stop_note(out, note)
    except OSError:
        pass  # a full disk: stderr said it
