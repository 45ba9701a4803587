"""The output directory's free space, checked before any process starts: room for the
checkpoints the job will keep at once and the trained model, estimated from the model's size."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sm_dist.config.job import JobConfig
from sm_dist.run.checkpoints import checkpoint_iteration, complete_checkpoints
from sm_dist.run.run_dir import RunDirError

# A checkpoint holds each stage's parameters and its optimizer's state: up to two tensors the
# size of the parameters (Adam's moments), a few more small ones (warm-start vectors).
CHECKPOINT_COPIES = 3
PER_FILE = 64 * 1024  # a stage file's own overhead: pickled structure, small tensors
SMALL_FILES = 1024 * 1024  # config.yaml, the first records and trace lines, plots


def size_text(size: float) -> str:
    """Bytes for people: 0 bytes, 512 KiB, 3.6 MiB, 2.1 GiB."""
    if size < 1024:
        return f"{size:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            return f"{size:,.1f} {unit}" if size < 100 else f"{size:,.0f} {unit}"
    raise AssertionError("unreachable")


def checkpoints_written(job: JobConfig, after: int) -> int:
    """How many checkpoints a run writes after iteration `after`: one every
    run.checkpoint_every iterations and one after the last."""
    every, last = job.run.checkpoint_every, job.run.iterations
    count = (last // every - after // every) if every else 0
    return count + (0 if every and last % every == 0 else 1)


def space_needed(job: JobConfig, model_size: int, kept_now: int = 0,
                 after: int = 0) -> tuple[int, int, int]:
    """(bytes the run needs at most beyond what the directory holds, checkpoints on disk at
    once beyond those kept now, the estimated size of one). A new checkpoint is complete
    before the oldest goes, so run.keep_last + 1 are on disk at once (every one with 0)."""
    one = CHECKPOINT_COPIES * model_size + PER_FILE * (len(job.model.balance) + 1)
    written = checkpoints_written(job, after)
    at_once = min(written, job.run.keep_last + 1) if job.run.keep_last else written
    extra = max(at_once - kept_now, min(written, 1))
    return extra * one + model_size + SMALL_FILES, extra, one


def check_free_space(path: Path, job: JobConfig, model_size: int, resume: bool = False) -> None:
    """RunDirError, with the numbers, when the file system of `path` (or of the nearest
    directory above it that exists) has less room than the run needs; nothing is written."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    kept = complete_checkpoints(Path(path)) if resume else []
    after = checkpoint_iteration(kept[-1]) if kept else 0
    needed, count, one = space_needed(job, model_size, len(kept), after)
    try:
        stats = os.statvfs(existing)
    except OSError:
        return  # a file system that does not say: the writes themselves will tell
    free = stats.f_bavail * stats.f_frsize
    if free >= needed:
        return
    if job.run.keep_last and count == job.run.keep_last + 1:
        why = f"run.keep_last {job.run.keep_last}, and the next one while it is written"
    else:
        why = "the ones this run writes" + (" (run.keep_last 0 keeps every one)"
                                            if not job.run.keep_last else "")
    raise RunDirError(
        f"{path}: {size_text(free)} free on its file system ({existing}), the run needs about "
        f"{size_text(needed)}: {count} checkpoint{'s' if count != 1 else ''} of about "
        f"{size_text(one)} at once ({why}), model.pt ({size_text(model_size)}) and "
        f"{size_text(SMALL_FILES)} for the records; free space, lower run.keep_last, or "
        "choose another --out")


def model_bytes(modules: Sequence[nn.Module]) -> int:
    """The bytes of the stages' state (parameters and buffers): what model.pt holds."""
    return sum(t.numel() * t.element_size() for module in modules
               for t in module.state_dict().values() if isinstance(t, torch.Tensor))
