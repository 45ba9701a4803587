"""Checkpoints in a run directory: one file per stage, the coordinator's file written last."""

from __future__ import annotations

import dataclasses
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

    def to_plain(self) -> dict[str, Any]:
        """Plain types and tensors only, so that loading it runs no code (weights_only)."""
        return {"iteration": self.iteration, "stream": self.stream, "steering": self.steering,
                "costs": dataclasses.asdict(self.costs), "wall_time": self.wall_time,
                "last_record": self.last_record.to_json()}

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> ResumePoint:
        return cls(data["iteration"], data["stream"], data["steering"], Costs(**data["costs"]),
                   data["wall_time"], IterationRecord.from_json(data["last_record"]))


def step_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / "checkpoints" / f"step-{iteration}"


def save_checkpoint(run_dir: Path, point: ResumePoint, stage_states: list[dict[str, Any]],
                    keep_last: int) -> Path:
    """Write checkpoints/step-<k>/stage-<s>.pt for every stage, then coordinator.pt; keep the
    newest `keep_last` complete checkpoints (0 keeps all)."""
    target = step_dir(run_dir, point.iteration)
    target.mkdir(parents=True, exist_ok=True)
    for s, state in enumerate(stage_states):
        torch.save(state, target / f"stage-{s}.pt")
    tmp = target / (COORDINATOR_FILE + ".tmp")
    torch.save({"point": point.to_plain(), "num_stages": len(stage_states),
                "saved_at": time.time()}, tmp)
    tmp.replace(target / COORDINATOR_FILE)  # last, and atomic: now the checkpoint is complete
    if keep_last:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    return target


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted one has no coordinator file)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COORDINATOR_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def load_checkpoint(path: Path) -> tuple[ResumePoint, list[dict[str, Any]]]:
    meta = _load(path / COORDINATOR_FILE)
    states = [_load(path / f"stage-{s}.pt") for s in range(meta["num_stages"])]
    return ResumePoint.from_plain(meta["point"]), states


def check_resumable(run_dir: Path, job: JobConfig) -> Path:
    """The newest complete checkpoint of run_dir, if `job` may continue it (only
    run.iterations may differ from the job the run was started with)."""
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml); "
                              "give --resume the directory a run wrote")
    found = complete_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} has no complete checkpoint; set run.checkpoint_every "
                              "to write them, or start a new run")
    differ = [key for key in job_differences(load_job(run_dir / "config.yaml"), job)
              if key != "run.iterations"]
    if differ:
        raise CheckpointError(f"the job differs from the one {run_dir} was started with in "
                              f"{', '.join(differ)}; only run.iterations may change on resume")
    done = _load(found[-1] / COORDINATOR_FILE)["point"]["iteration"]
    if done >= job.run.iterations:
        raise CheckpointError(f"{run_dir} has already run {done} iterations (run.iterations is "
                              f"{job.run.iterations}); to train on, raise it, e.g. "
                              f"--set run.iterations={done + job.run.iterations}")
    return found[-1]
