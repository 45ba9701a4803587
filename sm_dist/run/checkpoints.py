"""Checkpoints in a run directory: one file per stage, the coordinator's file written last."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sm_dist.config.job import JobConfig, job_differences, load_job
from sm_dist.run.metrics import Costs, IterationRecord

COORDINATOR_FILE = "coordinator.pt"  # its presence marks a checkpoint as complete


class CheckpointError(Exception):
    """A run cannot be resumed: no complete checkpoint, or a job that does not match it."""


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
    "data.epochs"})


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, flushed to disk, then renamed: a file is whole or
    absent, whatever stops the process meanwhile."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


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


def save_checkpoint(run_dir: Path, point: ResumePoint, stage_states: list[dict[str, Any]],
                    keep_last: int) -> Path:
    """Write checkpoints/step-<k>/stage-<s>.pt for every stage, then coordinator.pt, each
    atomically; keep the newest `keep_last` complete checkpoints (0 keeps all)."""
    target = step_dir(run_dir, point.iteration)
    target.mkdir(parents=True, exist_ok=True)
    for s, state in enumerate(stage_states):
        save_atomically(state, target / f"stage-{s}.pt")
    # Last: its presence marks the checkpoint complete.
    save_atomically({"point": point.to_plain(), "num_stages": len(stage_states),
                     "saved_at": time.time()}, target / COORDINATOR_FILE)
    _sync_dir(target)
    if keep_last:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    return target


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted one has no coordinator file)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COORDINATOR_FILE).is_file()
             and p.name.removeprefix("step-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def _load(path: Path) -> Any:
    # Plain types and tensors only: loading a checkpoint cannot run code.
    return torch.load(path, weights_only=True, map_location="cpu")


def load_checkpoint(path: Path) -> tuple[ResumePoint, list[dict[str, Any]]]:
    meta = _load(path / COORDINATOR_FILE)
    states = [_load(path / f"stage-{s}.pt") for s in range(meta["num_stages"])]
    return ResumePoint.from_plain(meta["point"]), states


def _problem(path: Path, num_stages: int) -> str | None:
    """Why a checkpoint cannot be used (a file missing or not loadable), or None."""
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


def usable_checkpoint(run_dir: Path, num_stages: int) -> tuple[Path, list[str]]:
    """The newest checkpoint whose every file is there and loads, and a note on each newer
    one it passed over; CheckpointError when none is usable."""
    passed: list[str] = []
    for path in reversed(complete_checkpoints(run_dir)):
        problem = _problem(path, num_stages)
        if problem is None:
            return path, passed
        passed.append(f"{path.name}: {problem}")
    detail = f" ({'; '.join(passed)})" if passed else ""
    raise CheckpointError(f"{run_dir} has no usable checkpoint{detail}; set "
                          "run.checkpoint_every to write them, or start a new run")


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
    path, passed = usable_checkpoint(run_dir, len(job.model.balance))
    done = _load(path / COORDINATOR_FILE)["point"]["iteration"]
    if done >= job.run.iterations:
        raise CheckpointError(f"{run_dir} has already run {done} iterations (run.iterations is "
                              f"{job.run.iterations}); to train on, raise it, e.g. "
                              f"--set run.iterations={done + job.run.iterations}"
                              + (" (with data.epochs: raise data.epochs)"
                                 if job.data.epochs else ""))
    return path, passed
