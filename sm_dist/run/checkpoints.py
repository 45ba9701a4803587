"""Checkpoints in a run directory: one file per stage, the coordinator's file, and a manifest
of their sizes and SHA-256 written last; resuming verifies it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sm_dist.config.job import JobConfig, job_differences, job_to_dict, load_job
from sm_dist.run.metrics import Costs, IterationRecord
from sm_dist.run.run_dir import STOPPED_FILE, read_stop_note
from sm_dist.whole_files import Written, replace_whole, sha256_of, write_json_whole

COORDINATOR_FILE = "coordinator.pt"  # where to continue: the iteration, the batch stream, ...
MANIFEST_FILE = "manifest.json"  # each file's size and SHA-256; written last: marks it complete


DIVERGED = "it holds the weights of a diverging run"  # why --resume passes over a checkpoint


class CheckpointError(Exception):
    """A run cannot be resumed: no complete checkpoint, or a job that does not match it."""


class NoCheckpoint(CheckpointError):
    """A run directory without a checkpoint to continue from: none was written (`passed`
    empty), or every one is damaged or diverged (`passed` says how, newest first)."""

    def __init__(self, run_dir: Path, job: JobConfig, passed: list[str]) -> None:
        super().__init__(run_dir, job, passed)
        self.run_dir, self.passed = run_dir, passed
        self.every = job.run.checkpoint_every
        root = run_dir / "checkpoints"
        self.cut_short = sorted(p.name for p in root.glob("step-*") if not is_complete(p)) \
            if root.is_dir() else []

    def __str__(self) -> str:
        if self.passed:
            what = ("no checkpoint to continue from" if any(DIVERGED in p for p in self.passed)
                    else "no intact checkpoint: every one is damaged")
            return (f"{self.run_dir} has {what} ({'; '.join(self.passed)}); start a new run "
                    "(the checkpoints are left as they are)")
        when = (f"every {self.every} iterations" if self.every else
                "only after the last iteration (run.checkpoint_every is 0)")
        cut = (f" ({', '.join(self.cut_short)} cut short while being written: no "
               f"{MANIFEST_FILE})" if self.cut_short else "")
        return (f"{self.run_dir} has no checkpoint{cut}: the run stopped before its first was "
                f"complete (they are written {when}); set run.checkpoint_every to write them, "
                "or start a new run")


@dataclass
class ResumePoint:
    """Where a resumed run continues: the coordinator's state after `iteration`."""

    iteration: int
    stream: dict[str, Any]  # the batch stream after that iteration's batch
    steering: dict[str, Any] | None  # the coordinator's optimizer state (GD+Armijo, SSO)
    costs: Costs
    wall_time: float
    last_record: IterationRecord  # that iteration's record (for the actual decrease after it)
    first_loss: float | None = None  # the run's first training loss (what "exploding" means)

    def to_plain(self) -> dict[str, Any]:
        """Plain types and tensors only, so that loading it runs no code (weights_only)."""
        return {"iteration": self.iteration, "stream": self.stream, "steering": self.steering,
                "costs": dataclasses.asdict(self.costs), "wall_time": self.wall_time,
                "last_record": self.last_record.to_json(), "first_loss": self.first_loss}

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> ResumePoint:
        return cls(data["iteration"], data["stream"], data["steering"], Costs(**data["costs"]),
                   data["wall_time"], IterationRecord.from_json(data["last_record"]),
                   data.get("first_loss"))


def step_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / "checkpoints" / f"step-{iteration}"


# Keys a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = frozenset({
    "run.iterations", "run.rpc_timeout", "run.threads", "run.eval_every",
    "run.checkpoint_every", "run.keep_last", "run.worker_threads", "run.rpc_transport",
    "run.bind", "run.runs_dir", "run.on_nonfinite", "run.eval_train_every", "run.tensorboard",
    "run.log_every", "data.epochs"})


def job_fingerprint(job: JobConfig) -> str:
    """The SHA-256 of what a checkpoint's numbers depend on: the resolved job less the keys a
    resumed run may change (numbers written in one form, 2.0 as 2)."""
    def canonical(value: Any, prefix: str) -> Any:
        if isinstance(value, dict):
            return {k: canonical(v, f"{prefix}.{k}" if prefix else k) for k, v in value.items()
                    if (f"{prefix}.{k}" if prefix else k) not in RESUMABLE_CHANGES}
        if isinstance(value, (list, tuple)):
            return [canonical(v, prefix) for v in value]
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    text = json.dumps(canonical(job_to_dict(job), ""), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_whole(obj: Any, path: Path) -> Written:
    """torch.save to a temporary name, flushed to disk, then renamed: the file is whole or
    absent, whatever stops the process meanwhile; its size and SHA-256."""
    return replace_whole(path, lambda handle: torch.save(obj, handle))


def save_checkpoint(run_dir: Path, point: ResumePoint, stage_states: list[dict[str, Any]],
                    keep_last: int, job: JobConfig) -> Path:
    """Write checkpoints/step-<k>/: stage-<s>.pt for every stage, coordinator.pt, then
    manifest.json (each file's size and SHA-256, the iteration, the job's fingerprint), each
    through a temporary name; the manifest, written last, marks the checkpoint complete. A
    failure removes the whole step (a full disk keeps no partial checkpoint). Then keep the
    newest `keep_last` complete checkpoints (0 keeps all)."""
    target = step_dir(run_dir, point.iteration)
    if target.exists():  # one a run before a resume left: replaced, never mixed with it
        shutil.rmtree(target)
    target.mkdir(parents=True)
    try:
        files = {f"stage-{s}.pt": save_whole(state, target / f"stage-{s}.pt")
                 for s, state in enumerate(stage_states)}
        files[COORDINATOR_FILE] = save_whole({"point": point.to_plain(),
                                              "num_stages": len(stage_states),
                                              "saved_at": time.time()},
                                             target / COORDINATOR_FILE)
        write_json_whole(target / MANIFEST_FILE, {
            "iteration": point.iteration, "job_sha256": job_fingerprint(job),
            "files": {name: {"size": w.size, "sha256": w.sha256} for name, w in files.items()}},
            indent=1)
        _sync_dir(target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    if keep_last:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    return target


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_iteration(path: Path) -> int:
    """The iteration a checkpoint directory (step-<k>) was written after."""
    return int(path.name.removeprefix("step-"))


def is_complete(path: Path) -> bool:
    """Whether a step directory was written to its end: its manifest is there (or, from
    sm-dist before manifests, its coordinator file)."""
    return (path / MANIFEST_FILE).is_file() or (path / COORDINATOR_FILE).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (one cut short while being written has no manifest)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*")
             if p.name.removeprefix("step-").isdigit() and is_complete(p)]
    return sorted(found, key=checkpoint_iteration)


def _load(path: Path) -> Any:
    # Plain types and tensors only: loading a checkpoint cannot run code.
    return torch.load(path, weights_only=True, map_location="cpu")


def load_checkpoint(path: Path) -> tuple[ResumePoint, list[dict[str, Any]]]:
    meta = _load(path / COORDINATOR_FILE)
    states = [_load(path / f"stage-{s}.pt") for s in range(meta["num_stages"])]
    return ResumePoint.from_plain(meta["point"]), states


def _manifest_problem(path: Path, num_stages: int, fingerprint: str) -> str | None:
    """What in a checkpoint differs from its manifest (a file missing, of another size or
    content), or None; a checkpoint from before manifests is checked by loading alone."""
    if not (path / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        files, iteration = manifest["files"], manifest["iteration"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is not readable ({type(err).__name__})"
    if iteration != checkpoint_iteration(path):
        return f"{MANIFEST_FILE} is for iteration {iteration}, not {checkpoint_iteration(path)}"
    if manifest.get("job_sha256") != fingerprint:
        return "it was written by another job (its job fingerprint differs from this job's)"
    for name in [f"stage-{s}.pt" for s in range(num_stages)] + [COORDINATOR_FILE]:
        if name not in files:
            return f"{MANIFEST_FILE} lists no {name}"
        if not (path / name).is_file():
            return f"{name} is missing"
        found = sha256_of(path / name)
        if found.size != files[name]["size"]:
            return (f"{name} is {found.size:,} bytes, its manifest says "
                    f"{files[name]['size']:,} (cut short or damaged)")
        if found.sha256 != files[name]["sha256"]:
            return f"{name} is damaged (its SHA-256 differs from the one in {MANIFEST_FILE})"
    return None


def _problem(path: Path, num_stages: int, fingerprint: str) -> str | None:
    """Why a checkpoint cannot be used (a file missing, damaged or not loadable), or None."""
    problem = _manifest_problem(path, num_stages, fingerprint)
    if problem is not None:
        return problem
    try:
        meta = _load(path / COORDINATOR_FILE)
        ResumePoint.from_plain(meta["point"])
        if meta["num_stages"] != num_stages:
            return f"it has {meta['num_stages']} stages, the job {num_stages}"
    except Exception as err:  # a torn or foreign file: unpickling refused or failed
        return f"{COORDINATOR_FILE} is not loadable ({type(err).__name__})"
    for s in range(num_stages):
        stage = path / f"stage-{s}.pt"
        if not stage.is_file():
            return f"{stage.name} is missing"
        try:
            _load(stage)
        except Exception as err:
            return f"{stage.name} is not loadable ({type(err).__name__})"
    return None


def _diverged_after(run_dir: Path) -> int | None:
    """After a diverging run stopped: the newest iteration whose checkpoint is within the
    stopping rule's bound (stopped.json; -1: none is), so that --resume passes over the
    checkpoints with the diverged weights. None when the run did not stop so."""
    note = read_stop_note(run_dir)
    if note is None or note.kind != "diverged" or note.iteration < 0:
        return None
    return note.checkpoint_iteration if note.checkpoint_iteration is not None else -1


def usable_checkpoint(run_dir: Path, job: JobConfig) -> tuple[Path, list[str]]:
    """The newest checkpoint whose every file is there, matches its manifest and loads, and a
    note on each newer one it passed over; NoCheckpoint when none is usable."""
    passed: list[str] = []
    bound = _diverged_after(run_dir)
    fingerprint = job_fingerprint(job)
    for path in reversed(complete_checkpoints(run_dir)):
        if bound is not None and checkpoint_iteration(path) > bound:
            passed.append(f"{path.name}: {DIVERGED} ({STOPPED_FILE} names the last checkpoint "
                          "within the stopping rule's bound)")
            continue
        problem = _problem(path, len(job.model.balance), fingerprint)
        if problem is None:
            return path, passed
        passed.append(f"{path.name}: {problem}")
    raise NoCheckpoint(run_dir, job, passed)


def check_resumable(run_dir: Path, job: JobConfig) -> tuple[Path, list[str]]:
    """The checkpoint of run_dir to continue from, if `job` may continue it (it may change
    only RESUMABLE_CHANGES), and the newer checkpoints passed over because they are damaged."""
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml); "
                              "give --resume the directory a run wrote")
    differ = [key for key in job_differences(load_job(run_dir / "config.yaml"), job)
              if key not in RESUMABLE_CHANGES]
    if differ:
        allowed = ", ".join(sorted(RESUMABLE_CHANGES))
        raise CheckpointError(f"the job differs from the one {run_dir} was started with in "
                              f"{', '.join(differ)}; a resumed run may change only {allowed}")
    path, passed = usable_checkpoint(run_dir, job)
    done = _load(path / COORDINATOR_FILE)["point"]["iteration"]
    if done >= job.run.iterations:
        raise CheckpointError(f"{run_dir} has already run {done} iterations (run.iterations is "
                              f"{job.run.iterations}); to train on, raise it, e.g. "
                              f"--set run.iterations={done + job.run.iterations}"
                              + (" (with data.epochs: raise data.epochs)"
                                 if job.data.epochs else ""))
    return path, passed
