"""The sm-dist command line: train, validate, schedule, report and compare."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sm_dist import __version__
from sm_dist.config.build import JobSetupError, build_optimizer, has_minibatches, prepare_job
from sm_dist.config.job import ConfigError, JobConfig, load_job
from sm_dist.data.datasets import DataError
from sm_dist.engine.transport import TransportError, under_launcher
from sm_dist.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME
from sm_dist.optim import registry
from sm_dist.report.run_data import ReportError
from sm_dist.run.checkpoints import CheckpointError, NoCheckpoint, check_resumable
from sm_dist.run.run_dir import (
    STOPPED_FILE,
    RunDirError,
    check_run_dir,
    default_run_dir,
    set_aside_run,
)
from sm_dist.run.tensorboard import TensorBoardMissing

EPILOG = "Exit codes: 0 success, 2 bad input (job file, data, directories), 1 runtime failure."


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file (YAML), e.g. configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a job-file key, e.g. --set optimizer.inner_steps=10 "
                             "(repeatable; the value is read as YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sm-dist", epilog=EPILOG,
        description="Pipeline-parallel training with Surrogate Minimization (SM) and baselines, "
                    "one process per pipeline stage. Start with: sm-dist train "
                    "configs/quickstart.yaml")
    parser.add_argument("--version", action="version", version=f"sm-dist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _train_args(commands)

    validate_cmd = commands.add_parser(
        "validate", help="check a job file without running it", epilog=EPILOG,
        description="Check a job file and report every error at once, without running.")
    _job_args(validate_cmd)

    schedule_cmd = commands.add_parser(
        "schedule", help="print the schedule a job will run, as a stage-by-time grid",
        epilog=EPILOG,
        description="Print each stage's actions for one iteration as a grid of clock slots "
                    "(F forward, B backward, L build local loss, I inner steps, W fill inner "
                    "steps while waiting, A apply update, E evaluate; '.' idle), with unit "
                    "costs, over two iterations so that the bubbles between them show.")
    _job_args(schedule_cmd)
    schedule_cmd.add_argument("--iterations", type=int, default=2,
                              help="iterations to draw back to back (default 2)")

    report_cmd = commands.add_parser(
        "report", help="plots and a summary table from run directories", epilog=EPILOG,
        description="Draw the loss, accuracy and pipeline-timeline plots and write "
                    "summary.json for one or more run directories (several runs share "
                    "each figure), and print a summary table.")
    report_cmd.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report_cmd.add_argument("--out", default=None,
                            help="where to write (default: the run directory for one run, "
                                 "a new report-<timestamp>/ beside the runs for several)")
    _compare_args(commands)
    _simulate_args(commands)
    return parser


def _train_args(commands: Any) -> None:
    """`sm-dist train`'s arguments."""
    train_cmd = commands.add_parser(
        "train", help="train the model a job file describes", epilog=EPILOG,
        description="Train the model a job file describes, one process per stage (started "
                    "here, or joined as a rank under torchrun), and write a run directory: "
                    "config.yaml, metrics.jsonl, trace.json, summary.json, model.pt, "
                    "checkpoints/ and plots.")
    _job_args(train_cmd)
    train_cmd.add_argument("--out", type=Path, default=None,
                           help="run directory (default: <run.runs_dir>/<name>-<timestamp>/)")
    train_cmd.add_argument("--single-process", action="store_true",
                           help="run every stage in this one process, in pipeline order "
                                "(the reference the multi-process engine is tested against)")
    live = train_cmd.add_mutually_exclusive_group()
    live.add_argument("--no-live", dest="live", action="store_false", default=None,
                      help="plain progress lines instead of the live monitor")
    live.add_argument("--live", dest="live", action="store_true",
                      help="the live monitor even when the output is not a terminal")
    train_cmd.add_argument("--resume", default=None, metavar="RUN_DIR|auto",
                           help="continue RUN_DIR from its newest usable checkpoint (the same "
                                "job; keys that do not change the numbers, and run.iterations, "
                                "may change); auto: continue --out DIR if it has a checkpoint, "
                                "else start it (the default under torchrun --max-restarts)")


def _simulate_args(commands: Any) -> None:
    """`sm-dist simulate`'s arguments."""
    simulate_cmd = commands.add_parser(
        "simulate", help="a run's schedule on one device per stage, from its measured costs",
        epilog=EPILOG,
        description="Replay a run's own schedule on one device per stage: every action takes "
                    "the time the run measured (actions.json of --single-process, or an "
                    "engine run's trace.json), every transfer a link's latency plus its bytes "
                    "over its bandwidth. Prints the iteration time, the bubble fraction and "
                    "each stage's busy and idle shares, and draws the simulated timeline. See "
                    "docs/performance.md.")
    simulate_cmd.add_argument("run", metavar="RUN_DIR")
    simulate_cmd.add_argument("--link", default="none", metavar="PRESET|BANDWIDTH,LATENCY",
                              help="nvlink, pcie4, pcie5, 100gbe, 10gbe, none (free; the "
                                   "default), or bytes/s,seconds e.g. 12.5e9,1e-5")
    simulate_cmd.add_argument("--microbatches", type=int, default=None, metavar="M",
                              help="split each batch into M microbatches instead (costs per "
                                   "microbatch scale with its size)")
    simulate_cmd.add_argument("--schedule", default="gpipe",
                              choices=("gpipe", "1f1b", "interleaved", "zb", "zbv"),
                              help="the pipeline schedule to replay the run's passes on, in the "
                                   "order torch.distributed.pipelining's class of it gives "
                                   "(default gpipe, the engine's own; zb and zbv need "
                                   "run.split_backward)")
    simulate_cmd.add_argument("--iterations", default=None, metavar="FIRST:LAST",
                              help="simulate these iterations only, e.g. 2:50")
    simulate_cmd.add_argument("--json", action="store_true",
                              help="print one JSON object: iteration_time (s), bubble_fraction, "
                                   "busy_fraction per stage, ...")
    simulate_cmd.add_argument("--out", default=None, metavar="PNG",
                              help="where the timeline goes (default: "
                                   "RUN_DIR/simulated-timeline.png)")


def _comma_list(convert: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse type: a comma-separated list of `what`, e.g. 1,10,20."""
    def parse(text: str) -> list[Any]:
        try:
            return [convert(item.strip()) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {what}") from None
    return parse


def _compare_args(commands: Any) -> None:
    compare_cmd = commands.add_parser(
        "compare", help="run a grid of optimizers, inner steps, depths and learning rates, "
                        "and compare them", epilog=EPILOG,
        description="Train one run per grid point with `sm-dist train`, one after another "
                    "(or collect finished runs from an earlier compare with the same --out), "
                    "then write compare.md (tables like the SM paper's Tables 1-4, cost, "
                    "learning-rate sweeps) and compare.png (loss against iteration, pipeline "
                    "passes and wall time). See docs/comparing.md.")
    _job_args(compare_cmd)
    compare_cmd.add_argument("--optimizers", required=True, metavar="NAME,...",
                             type=_comma_list(str, "optimizer names"),
                             help=f"optimizers to compare, from {', '.join(registry.NAMES)}")
    compare_cmd.add_argument("--inner-steps", type=_comma_list(int, "integers"), metavar="N,...",
                             help=f"N for {', '.join(registry.names_sweeping('inner_steps'))}, "
                                  "e.g. 1,10,20 (default: the job's optimizer.inner_steps)")
    compare_cmd.add_argument("--depths", type=_comma_list(int, "integers"), metavar="D,...",
                             help="MLP depths in Linear layers, e.g. 2,4,8, on min(D, the job's "
                                  "stages) stages (default: the job's own model)")
    compare_cmd.add_argument("--lrs", type=_comma_list(float, "numbers"), metavar="LR,...",
                             help=f"learning rates for {', '.join(registry.names_sweeping('lr'))}"
                                  ", each reported at its best (default: the job's optimizer.lr)")
    compare_cmd.add_argument("--at", type=_comma_list(int, "integers"), metavar="K,...",
                             help="iterations of the Table-1 columns (default: about 5 evenly "
                                  "spaced up to run.iterations)")
    compare_cmd.add_argument("--out", type=Path, default=None, metavar="DIR",
                             help="where the runs and compare.md go (default: "
                                  "<run.runs_dir>/compare-<name>-<timestamp>/); the same --out "
                                  "again collects the finished runs")
    compare_cmd.add_argument("--link", default="pcie4", metavar="PRESET|BANDWIDTH,LATENCY",
                             help="the link of the simulated pipeline time (default pcie4; see "
                                  "sm-dist simulate)")
    compare_cmd.add_argument("--reach", type=_comma_list(float, "numbers"), metavar="LOSS,...",
                             default=[0.5, 0.3, 0.1],
                             help="losses whose simulated time to reach compare.md gives "
                                  "(default 0.5,0.3,0.1)")
    compare_cmd.add_argument("--single-process", action="store_true",
                             help="train every run with --single-process")
    compare_cmd.add_argument("--rerun", action="store_true",
                             help="train again even where a finished run of the same job exists "
                                  "(the earlier run is moved to OUT/replaced/)")
    compare_cmd.add_argument("--collect-only", "--no-run", dest="collect_only",
                             action="store_true",
                             help="train nothing: only collect the finished runs in --out")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser by name."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _fail(message: str, code: int) -> int:
    print(f"sm-dist: error: {message}", file=sys.stderr)
    return code


def _check_out(out: Path, job: JobConfig, resume: bool) -> None:
    """A new run needs a fresh directory; a resumed one a checkpoint of the same job; either
    room for its checkpoints."""
    from sm_dist.config.build import build_stage_modules
    from sm_dist.run.preflight import check_free_space, model_bytes

    if resume:
        check_resumable(out, job)
    else:
        check_run_dir(out)
    check_free_space(out, job, model_bytes(build_stage_modules(job)), resume)


def _resolve_out(args: argparse.Namespace, job: JobConfig) -> tuple[Path, bool]:
    """The run directory and whether the run continues it. `--resume auto` (the default in a
    torchrun attempt that may be restarted) continues --out from its newest usable checkpoint,
    or starts it afresh when it has none, setting aside what an attempt left there."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) if under_launcher() else 0
    if args.resume == "auto" or (args.resume is None and restarts > 0):
        if args.out is not None:
            out = args.out
        elif "TORCHELASTIC_RUN_ID" in os.environ:  # the same directory for every attempt
            out = Path(job.run.runs_dir) / f"{job.name}-{os.environ['TORCHELASTIC_RUN_ID']}"
        else:
            raise RunDirError("--resume auto continues --out DIR: give --out")
        if int(os.environ.get("RANK", "0")) != 0 or not (out / "config.yaml").is_file():
            return out, False  # only rank 0, the coordinator, reads or writes the directory
        try:
            check_resumable(out, _with_epochs(job))
            return out, True
        except NoCheckpoint as err:
            if err.passed:  # damaged ones: not to be set aside silently
                raise
        set_aside_run(out)
        return out, False
    if args.resume is not None:
        if args.out is not None and args.out != Path(args.resume):
            raise RunDirError("--resume continues RUN_DIR in place; leave out --out")
        return Path(args.resume), True
    return (args.out if args.out is not None else default_run_dir(job)), False


def run_train(args: argparse.Namespace) -> int:
    from sm_dist.api import TrainingFailed, train
    from sm_dist.launch.processes import LAUNCHED
    from sm_dist.launch.rank import run_rank
    from sm_dist.run.session import write_failure_message
    from sm_dist.run.trainer import NonFiniteLoss

    job = load_job(args.job, args.overrides)
    out, resume = _resolve_out(args, job)
    if under_launcher():  # a rank of a job started by torchrun or by sm_dist.train
        # sm_dist.train checked the directory before it started us; torchrun did not.
        if int(os.environ["RANK"]) == 0 and not os.environ.get(LAUNCHED):
            _check_out(out, _with_epochs(job), resume)
        return run_rank(job, out, args.live, resume)
    try:
        train(args.job, overrides=args.overrides, out=out, resume=resume,
              single_process=args.single_process, live=args.live)
    except TrainingFailed as err:
        return err.exit_code  # the stages said why
    except NonFiniteLoss as err:
        return _fail(f"{err}; see {out / STOPPED_FILE}", EXIT_RUNTIME)
    except BrokenPipeError:  # the reader of stdout left (`| head`): not the run directory
        raise
    except OSError as err:  # the disk filled up, or the directory went away
        return _fail(write_failure_message(out, err), EXIT_RUNTIME)
    return EXIT_OK


def _with_epochs(job: JobConfig) -> JobConfig:
    """The job with run.iterations from data.epochs (which needs the data's size)."""
    return prepare_job(job)[0] if job.data.epochs is not None else job


def _load_noted(args: argparse.Namespace) -> JobConfig:
    """The job, with a note on stderr for what an override of optimizer.name left out."""
    notes: list[str] = []
    job = load_job(args.job, args.overrides, notes)
    for note in notes:
        print(f"sm-dist: note: {note}", file=sys.stderr)
    return job


def run_validate(args: argparse.Namespace) -> int:
    job = _load_noted(args)
    print(f"{args.job}: valid ({job.name}: {len(job.model.balance)} stages, "
          f"optimizer {job.optimizer.name}, dataset {job.data.dataset})")
    return EXIT_OK


def run_schedule(args: argparse.Namespace) -> int:
    from sm_dist.pipeline.schedule import gpipe_schedule, render_grid, validate_schedule

    job = _load_noted(args)
    stages, microbatches = len(job.model.balance), job.data.microbatches
    optimizer = build_optimizer(job)
    minibatches = has_minibatches(job)
    schedule = gpipe_schedule(stages, microbatches,
                              optimizer.update_actions(microbatches, last=False),
                              prepare=optimizer.prepare_actions(microbatches))
    validate_schedule(schedule, microbatches)
    print(f"{job.name}: {stages} stages, {microbatches} microbatches, {job.optimizer.name}; "
          f"one column per slot of unit cost, {args.iterations} iterations back to back")
    for s, actions in enumerate(schedule):
        print(f"stage {s}: " + " ".join(str(a) for a in actions))
    print()
    # An optimizer the coordinator steers waits for each iteration's loss: no overlap.
    steered = optimizer.steering(minibatches) is not None
    drawn = 1 if steered else max(1, args.iterations)
    # Cut to the terminal (80 columns when the output is not one).
    print(render_grid(schedule, iterations=drawn, width=shutil.get_terminal_size().columns))
    note = optimizer.schedule_note(minibatches)
    if note:
        print(f"\n{note}")
    return EXIT_OK


def run_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sm_dist.report.summary import report_main

    return report_main(args.runs, args.out, Console())


def run_compare(args: argparse.Namespace) -> int:
    from sm_dist.report.compare import compare_main
    from sm_dist.report.grid import CompareError

    try:
        return compare_main(args.job, args.overrides, args.optimizers,
                            inner_steps=args.inner_steps,
                            depths=args.depths, lrs=args.lrs, at=args.at, out=args.out,
                            single_process=args.single_process, rerun=args.rerun,
                            collect_only=args.collect_only, command_line=args.argv,
                            link=args.link, reach=args.reach)
    except CompareError as err:
        return _fail(str(err), EXIT_BAD_INPUT)


def run_simulate(args: argparse.Namespace) -> int:
    from sm_dist.report.simulate import simulate_main

    if args.microbatches is not None and args.microbatches < 1:
        return _fail("--microbatches must be at least 1", EXIT_BAD_INPUT)
    simulate_main(args.run, args.link, args.microbatches, args.iterations, args.json, args.out,
                  args.schedule)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said with the subcommand's usage, not the top level's
        command = _subparsers(parser)[args.command]
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv  # the command line as given, for the files that record it
    # As under `python -m`: a model.factory module in the working directory can be imported.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    commands = {"train": run_train, "validate": run_validate, "schedule": run_schedule,
                "report": run_report, "compare": run_compare, "simulate": run_simulate}
    try:
        return commands[args.command](args)
    except ConfigError as err:
        return _fail(str(err), EXIT_BAD_INPUT)
    except (DataError, JobSetupError, RunDirError, TransportError, CheckpointError,
            ReportError, TensorBoardMissing) as err:
        return _fail(str(err), EXIT_BAD_INPUT)
    except BrokenPipeError:  # e.g. `sm-dist schedule JOB | head`: the reader has left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return _fail("interrupted; the run directory keeps every finished iteration",
                     EXIT_RUNTIME)
