"""The run directory: resolved config, metrics.jsonl written as iterations finish, model.pt."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sm_dist.config.job import JobConfig, dump_job
from sm_dist.run.metrics import IterationRecord, MetricsWriter, read_metrics, record_line

STOPPED_FILE = "stopped.txt"  # why a run stopped before its last iteration, when it did
STOPPED_JSON = "stopped.json"  # the same, for tools


@dataclass
class StopNote:
    """Why a run stopped early (a diverging loss), and the checkpoint to go back to."""

    iteration: int
    reason: str  # e.g. "the training loss is not finite"
    message: str  # the whole sentence the run printed
    loss: float | None = None  # the training loss of the iteration it stopped after
    checkpoint: str | None = None  # the checkpoint to resume from, if any was kept

    def text(self) -> str:
        kept = self.checkpoint or "none (none was written)"
        return f"{self.message}; the last finite checkpoint is {kept}\n"


def write_stop_note(out: Path, note: StopNote) -> None:
    """stopped.txt (for people) and stopped.json (for report and compare)."""
    (out / STOPPED_FILE).write_text(note.text(), encoding="utf-8")
    loss = note.loss if note.loss is None or note.loss == note.loss else None  # NaN: null
    (out / STOPPED_JSON).write_text(json.dumps({**asdict(note), "loss": loss}) + "\n",
                                    encoding="utf-8")


def read_stop_note(out: Path) -> StopNote | None:
    """The run's stop note, if it stopped early (a run of an earlier version: its text)."""
    if (out / STOPPED_JSON).is_file():
        try:
            return StopNote(**json.loads((out / STOPPED_JSON).read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            pass  # damaged: the text below still says it stopped
    if (out / STOPPED_FILE).is_file():
        text = (out / STOPPED_FILE).read_text(encoding="utf-8").strip()
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


def check_run_dir(path: Path) -> None:
    """Refuse a directory that already holds a run, so that nothing saved is overwritten."""
    if (path / "metrics.jsonl").exists() or (path / "config.yaml").exists():
        raise RunDirError(f"{path} already holds a run (config.yaml or metrics.jsonl); "
                          "choose another --out, or move that directory away")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory; choose another --out")
    check_writable(path, "--out")


def set_aside_run(path: Path) -> None:
    """Rename what an earlier attempt wrote (config.yaml, metrics.jsonl) to
    `<name>.before-restart-<time>`, so that a run can start afresh there losing nothing."""
    stamp = int(time.time())
    for name in ("config.yaml", "metrics.jsonl"):
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


class RunDirectory:
    """Creates the directory, writes config.yaml, appends one JSON line per iteration.

    Resuming after iteration k keeps the records up to k (the file as it was is kept beside it
    as metrics.jsonl.before-resume-<time>) and appends from there.
    """

    def __init__(self, path: Path, job: JobConfig,
                 resume_after: IterationRecord | None = None) -> None:
        self.path = path
        if resume_after is None:
            check_run_dir(path)
            path.mkdir(parents=True, exist_ok=True)
        else:
            self._keep_records_until(resume_after)
        dump_job(job, path / "config.yaml")
        self._metrics = MetricsWriter(path / "metrics.jsonl")

    def _keep_records_until(self, last: IterationRecord) -> None:
        metrics = self.path / "metrics.jsonl"
        old = read_metrics(metrics) if metrics.exists() else []
        kept = [r for r in old if r.iteration <= last.iteration]
        if not kept or kept[-1].iteration != last.iteration:
            kept.append(last)  # the checkpoint was written before its record
        if metrics.exists():
            metrics.rename(self.path / f"metrics.jsonl.before-resume-{int(time.time())}")
        metrics.write_text("".join(record_line(r) for r in kept), encoding="utf-8")

    def write_record(self, record: IterationRecord) -> None:
        self._metrics.write(record)

    def save_model(self, state_dicts: list[dict[str, Any]]) -> None:
        """The trained parameters, one state dict per stage, as `model.pt`."""
        tmp = self.path / "model.pt.tmp"
        torch.save({"stages": state_dicts}, tmp)
        tmp.replace(self.path / "model.pt")

    def close(self) -> None:
        self._metrics.close()
