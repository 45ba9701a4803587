"""The run directory: resolved config, metrics.jsonl written as iterations finish, model.pt."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from sm_dist.config.job import JobConfig, dump_job
from sm_dist.run.metrics import IterationRecord, MetricsWriter, read_metrics, record_line
from sm_dist.whole_files import remove_quietly, replace_whole, write_json_whole, write_text_whole

STOPPED_FILE = "stopped.txt"  # why a run stopped before its last iteration, when it did
STOPPED_JSON = "stopped.json"  # the same, for tools
# What a run ended early by: a diverging loss (run.on_nonfinite: stop), a failure (a full disk,
# a stage that died), or a signal (Ctrl-C, SIGTERM).
STOP_KINDS = ("diverged", "failed", "interrupted")


@dataclass
class StopNote:
    """Why a run stopped early, and the checkpoint to go back to."""

    iteration: int  # the last iteration written to metrics.jsonl (-1: not known)
    reason: str  # e.g. "the training loss is not finite"
    message: str  # the whole sentence the run printed
    loss: float | None = None  # the training loss of the iteration it stopped after
    checkpoint: str | None = None  # the checkpoint to resume from, if any was kept
    kind: str = "diverged"  # one of STOP_KINDS (notes of earlier versions: diverged)
    checkpoint_iteration: int | None = None  # the iteration that checkpoint was written after
    # Diverged: the training loss measured at that checkpoint's weights (the next iteration's).
    checkpoint_loss: float | None = None

    def text(self) -> str:
        if self.kind != "diverged":
            kept = (f"the newest complete checkpoint is {self.checkpoint} (after iteration "
                    f"{self.checkpoint_iteration}), which --resume continues"
                    if self.checkpoint else "no checkpoint was written")
            return f"{self.message}; {kept}\n"
        if self.checkpoint is None:
            return (f"{self.message}; no checkpoint within the stopping rule's bound is kept "
                    "(every one kept holds weights whose loss left it)\n")
        return (f"{self.message}; the last checkpoint within the stopping rule's bound is "
                f"{self.checkpoint} (after iteration {self.checkpoint_iteration}, training "
                f"loss {_loss_text(self.checkpoint_loss)} at its weights), which --resume "
                "continues\n")


def _loss_text(loss: float | None) -> str:
    return "unknown" if loss is None else f"{loss:.6g}"


def write_stop_note(out: Path, note: StopNote) -> None:
    """stopped.txt (for people) and stopped.json (for report and compare), each whole or
    absent."""
    def finite(value: float | None) -> float | None:
        return value if value is None or math.isfinite(value) else None  # JSON has no NaN

    write_text_whole(out / STOPPED_FILE, note.text())
    write_json_whole(out / STOPPED_JSON, {**asdict(note), "loss": finite(note.loss),
                                          "checkpoint_loss": finite(note.checkpoint_loss)})


def read_stop_note(out: Path) -> StopNote | None:
    """The run's stop note, if it stopped early (a run of an earlier version: its text)."""
    if (out / STOPPED_JSON).is_file():
        try:
            data = json.loads((out / STOPPED_JSON).read_text(encoding="utf-8"))
            known = {f.name for f in fields(StopNote)}
            return StopNote(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError, OSError):
            pass  # damaged: the text below still says it stopped
    if (out / STOPPED_FILE).is_file():
        text = (out / STOPPED_FILE).read_text(encoding="utf-8", errors="replace").strip()
        return StopNote(-1, text, text)
    return None


class RunDirError(Exception):
    """The output directory cannot be used (it holds a run already, or is not writable)."""


def unique_dir(parent: Path, stem: str) -> Path:
    """parent/<stem>-<timestamp>, with -2, -3, ... when taken (two within the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, copy = Path(parent) / f"{stem}-{stamp}", 1
    while path.exists():
        copy += 1
        path = Path(parent) / f"{stem}-{stamp}-{copy}"
    return path


def default_run_dir(job: JobConfig) -> Path:
    return unique_dir(Path(job.run.runs_dir), job.name)


def holds_a_run(path: Path) -> bool:
    """Whether a directory holds something of a run worth keeping: a finished iteration or a
    checkpoint. An attempt that stopped before either (killed at its start) holds nothing."""
    metrics = path / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return True
    if metrics.exists() and not metrics.is_file():
        return True  # not ours to judge: keep it
    return any(path.glob("checkpoints/step-*/manifest.json")) or any(
        path.glob("checkpoints/step-*/coordinator.pt"))


def check_run_dir(path: Path) -> None:
    """Refuse a directory that already holds a run, so that nothing saved is overwritten (an
    attempt that finished no iteration and kept no checkpoint does not count)."""
    if path.is_dir() and holds_a_run(path):
        raise RunDirError(f"{path} already holds a run (metrics.jsonl or checkpoints); "
                          "choose another --out, or move that directory away")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory; choose another --out")
    check_writable(path, "--out")


def set_aside_run(path: Path) -> None:
    """Rename what an earlier attempt wrote (config.yaml, metrics.jsonl, its stop note) to
    `<name>.before-restart-<time>`, so that a run can start afresh there losing nothing."""
    stamp = int(time.time())
    for name in ("config.yaml", "metrics.jsonl", STOPPED_FILE, STOPPED_JSON):
        if (path / name).exists():
            (path / name).rename(path / f"{name}.before-restart-{stamp}")


def check_writable(path: Path, what: str) -> None:
    """That `path` (or the nearest directory above it that exists) can be written into: a
    file is made there and removed, so that nothing is left and any reason (permissions, a
    read-only or full file system) shows before a process starts."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RunDirError(f"{path}: cannot write into {existing} ({err.strerror or err}); "
                          f"choose another {what}") from None


# What a run writes beside metrics.jsonl and config.yaml, removed with them when an attempt
# that finished no iteration and wrote no checkpoint ends (so that the same --out works again).
STDERR_LOG = "stderr.log"  # what the stage processes wrote on stderr (sm-dist train's launch)
ATTEMPT_FILES = ("trace.json", "actions.json", "plans.jsonl", STOPPED_FILE, STOPPED_JSON,
                 STDERR_LOG)
ATTEMPT_DIRS = ("checkpoints", "tensorboard")


class RunDirectory:
    """Creates the directory, writes config.yaml, appends one JSON line per iteration.

    Resuming after iteration k keeps the records up to k (the file as it was is kept beside it
    as metrics.jsonl.before-resume-<time>, the stop note of the run before likewise) and
    appends from there. Every file is whole or absent (sm_dist/whole_files.py).
    """

    def __init__(self, path: Path, job: JobConfig,
                 resume_after: IterationRecord | None = None) -> None:
        self.path = path
        self.resumed = resume_after is not None
        self.created = not path.exists()  # removed again when the attempt leaves nothing
        self.last_iteration = resume_after.iteration if resume_after is not None else 0
        self._metrics: MetricsWriter | None = None
        if resume_after is None:
            check_run_dir(path)  # before anything is written or removed
        try:
            if resume_after is None:
                path.mkdir(parents=True, exist_ok=True)
                if (path / "config.yaml").exists():  # an attempt that left nothing else
                    self._remove_attempt_files()
            else:
                self._keep_records_until(resume_after)
            dump_job(job, path / "config.yaml")
            self._metrics = MetricsWriter(path / "metrics.jsonl")
        except BaseException:
            if not self.resumed:
                self.discard()
            raise

    def _keep_records_until(self, last: IterationRecord) -> None:
        metrics = self.path / "metrics.jsonl"
        old = read_metrics(metrics) if metrics.exists() else []
        kept = [r for r in old if r.iteration <= last.iteration]
        if not kept or kept[-1].iteration != last.iteration:
            kept.append(last)  # the checkpoint was written before its record
        stamp = int(time.time())
        # The new file whole beside the old one first: a full disk changes nothing.
        fresh = self.path / "metrics.jsonl.resumed"
        write_text_whole(fresh, "".join(record_line(r) for r in kept))
        for name in ("metrics.jsonl", STOPPED_FILE, STOPPED_JSON):  # the run goes on
            if (self.path / name).exists():
                (self.path / name).rename(self.path / f"{name}.before-resume-{stamp}")
        fresh.replace(metrics)

    def write_record(self, record: IterationRecord) -> None:
        assert self._metrics is not None
        self._metrics.write(record)
        self.last_iteration = record.iteration

    @property
    def wrote_iterations(self) -> bool:
        """Whether this attempt wrote a record (a resumed run: always, the ones it keeps)."""
        return self.resumed or (self._metrics is not None and self._metrics.written > 0)

    def save_model(self, state_dicts: list[dict[str, Any]]) -> None:
        """The trained parameters, one state dict per stage, as `model.pt` (whole or absent)."""
        replace_whole(self.path / "model.pt",
                      lambda handle: torch.save({"stages": state_dicts}, handle))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()

    def discard(self) -> None:
        """Remove what this new run's attempt wrote (it finished no iteration and kept no
        checkpoint): nothing is left that would stop the same --out from being used again.
        Call after `close` and after closing the trace and plan log."""
        self._remove_attempt_files()
        if self.created:
            try:
                self.path.rmdir()  # only when empty: nothing of anyone else's goes
            except OSError:
                pass

    def _remove_attempt_files(self) -> None:
        for name in ("config.yaml", "metrics.jsonl", *ATTEMPT_FILES):
            remove_quietly(self.path / name)
        for name in ATTEMPT_DIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)
