"""The run directory: resolved config, metrics.jsonl written as iterations finish."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any

import torch

from sm_dist.config import JobConfig, dump_job


class RunDirError(Exception):
    """The output directory cannot be used (it holds a run already, or is not writable)."""


def default_run_dir(job: JobConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(job.run.runs_dir) / f"{job.name}-{stamp}"
    suffix = 1
    while path.exists():  # two runs started within the same second
        suffix += 1
        path = Path(job.run.runs_dir) / f"{job.name}-{stamp}-{suffix}"
    return path


def check_run_dir(path: Path) -> None:
    """Refuse a directory that already holds a run, so that nothing saved is overwritten."""
    if (path / "metrics.jsonl").exists() or (path / "config.yaml").exists():
        raise RunDirError(f"{path} already holds a run (config.yaml or metrics.jsonl); "
                          "choose another --out, or move that directory away")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory; choose another --out")


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunDirectory:
    """Creates the directory, writes config.yaml, appends one JSON line per iteration.

    Resuming after iteration k keeps the records up to k (the file as it was is kept beside it
    as metrics.jsonl.before-resume-<time>) and appends from there.
    """

    def __init__(self, path: Path, job: JobConfig, resume_after: dict[str, Any] | None = None
                 ) -> None:
        self.path = path
        if resume_after is None:
            check_run_dir(path)
            path.mkdir(parents=True, exist_ok=True)
        else:
            self._keep_records_until(resume_after)
        dump_job(job, path / "config.yaml")
        self._metrics: IO[str] = open(path / "metrics.jsonl", "a", encoding="utf-8")

    def _keep_records_until(self, last: dict[str, Any]) -> None:
        metrics = self.path / "metrics.jsonl"
        old = read_metrics(self.path) if metrics.exists() else []
        kept = [r for r in old if r["iteration"] <= last["iteration"]]
        if not kept or kept[-1]["iteration"] != last["iteration"]:
            kept.append(last)  # the checkpoint was written before its record
        if metrics.exists():
            metrics.rename(self.path / f"metrics.jsonl.before-resume-{int(time.time())}")
        with open(metrics, "w", encoding="utf-8") as handle:
            for record in kept:
                handle.write(json.dumps(_clean(record)) + "\n")

    def write_record(self, record: dict[str, Any]) -> None:
        # One flushed line per iteration: a crash keeps every finished iteration.
        self._metrics.write(json.dumps(_clean(record)) + "\n")
        self._metrics.flush()

    def save_model(self, state_dicts: list[dict[str, Any]]) -> None:
        """The trained parameters, one state dict per stage, as `model.pt`."""
        tmp = self.path / "model.pt.tmp"
        torch.save({"stages": state_dicts}, tmp)
        tmp.replace(self.path / "model.pt")

    def close(self) -> None:
        self._metrics.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run directory's metrics.jsonl."""
    with open(Path(path) / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
