"""sm-dist: pipeline-parallel training with the Surrogate Minimization optimizer.

`sm_dist.train(job, model=..., data=...)` trains from Python (sm_dist/api.py)."""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["TrainResult", "train", "__version__"]


def __getattr__(name: str) -> Any:
    """`train` and `TrainResult` on first use: importing sm_dist stays cheap (no torch)."""
    if name in ("train", "TrainResult"):
        from sm_dist import api

        return getattr(api, name)
    raise AttributeError(f"module 'sm_dist' has no attribute {name!r}")
