"""Shared test fixtures: small job dicts and a runner for the sm-dist command line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# Multi-process tests start several torch processes on 2 cores: one thread each.
torch.set_num_threads(1)


def synthetic_job(**sections: Any) -> dict[str, Any]:
    """A tiny synthetic-data job as a dict; keyword arguments replace or extend its sections."""
    job: dict[str, Any] = {
        "name": "tiny",
        "model": {"mlp": {"widths": [6, 5, 4, 3], "activation": "tanh"}, "balance": [1, 1, 1]},
        "data": {"dataset": "synthetic", "microbatches": 2,
                 "synthetic": {"features": 6, "classes": 3, "train_size": 24, "test_size": 12}},
        "loss": "cross_entropy",
        "optimizer": {"name": "sm", "inner_steps": 3},
        "run": {"iterations": 3, "eval_every": 2, "dtype": "float64", "threads": 1},
    }
    for name, value in sections.items():
        if name == "optimizer" and isinstance(value, dict) and "name" in value:
            # As `--set optimizer.name=...` does: the old optimizer's own options go.
            from sm_dist.optim import registry

            if registry.known(value["name"]):
                job[name], _ = registry.switch_section(job[name], value["name"])
        if isinstance(value, dict) and isinstance(job.get(name), dict):
            job[name] = {**job[name], **value}
        else:
            job[name] = value
    return job


def metric_rows(path: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl (or the run directory's) as dicts, the optimizer's section's keys
    beside the record's own, as the tests compare them."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{**row, **row.get("optimizer", {})} for row in rows]


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m sm_dist ARGS` in a subprocess, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sm_dist", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_here(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The same command as run_cli, run by `main` in this process from `cwd`, its output
    captured: for the commands a test needs as a reference rather than as a process of its own
    (a single-process run beside an engine run), without a Python and torch start-up each."""
    from sm_dist.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    before = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(list(args))
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["sm-dist", *args], code, stdout.getvalue(),
                                       stderr.getvalue())


@pytest.fixture
def tiny_job() -> dict[str, Any]:
    return synthetic_job()
