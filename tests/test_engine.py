"""The multi-process engine: the same numbers as one process, fill mode, nodes, dead stages."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, metric_rows, run_cli, run_here, synthetic_job, write_job

BALANCES = {1: [4], 2: [2, 2], 4: [1, 1, 1, 1]}
OPTIMIZERS = {
    "sm-cg": {"name": "sm", "inner_solver": "cg", "inner_steps": 3},
    "sm-gradient": {"name": "sm", "inner_solver": "gradient", "inner_steps": 3},
    "gd_armijo": {"name": "gd_armijo"},
    "ddg": {"name": "ddg", "lr": 0.3},
    "sso": {"name": "sso", "inner_steps": 3},
    "cgblock": {"name": "cgblock", "inner_steps": 3},
    # A first step far too long: rejected, then retried (the acceptance protocol's notes).
    "sm_adaptive": {"name": "sm_adaptive", "inner_steps": 3, "step_scale": 30.0,
                    "trust_radius": 0.5},
}


def parity_job(stages: int, microbatches: int, optimizer: str) -> dict[str, Any]:
    return synthetic_job(
        name=f"parity-{stages}-{microbatches}-{optimizer}",
        model={"mlp": {"widths": [6, 5, 5, 4, 3], "activation": "tanh"},
               "balance": BALANCES[stages]},
        data={"microbatches": microbatches},
        optimizer=OPTIMIZERS[optimizer],
        run={"iterations": 3, "eval_every": 2, "rpc_timeout": 60})


def records(out: Path) -> list[dict[str, Any]]:
    return metric_rows(out)


def model_params(out: Path) -> list[dict[str, torch.Tensor]]:
    return torch.load(out / "model.pt")["stages"]


def train_both(tmp_path: Path, job: dict[str, Any]) -> tuple[Path, Path]:
    path = write_job(tmp_path / "job.yaml", job)
    single = run_here("train", str(path), "--single-process", "--out", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    multi = run_cli("train", str(path), "--no-live", "--out", "multi", cwd=tmp_path)
    assert multi.returncode == 0, multi.stderr
    return tmp_path / "single", tmp_path / "multi"


def assert_same_training(single: Path, multi: Path) -> None:
    a, b = records(single), records(multi)
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-9, abs=0)
        for key in ("test_loss", "predicted_decrease", "step_size", "step_scale"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-9, abs=1e-15), key
        for key in ("forward_passes", "backward_passes", "tangent_passes", "hvp_products",
                    "inner_steps", "line_search_trials", "step_rejected"):
            assert rb.get(key) == ra.get(key), key
    for sa, sb in zip(model_params(single), model_params(multi), strict=True):
        assert sa.keys() == sb.keys()
        for name in sa:
            torch.testing.assert_close(sb[name], sa[name], rtol=1e-9, atol=1e-12)


# The default run's share; the rest (DDG, SSO, CGBlock among them: their in-process parity is
# in test_engine_units) is the slow suite's.
FAST_GRID = [(4, 3, "sm-cg"), (4, 3, "sm_adaptive")]
FULL_GRID = [(p, m, o) for p in (1, 2, 4) for m in (1, 3, 8) for o in OPTIMIZERS]


@pytest.mark.parametrize("stages,microbatches,optimizer", FAST_GRID)
def test_parity_with_single_process(tmp_path: Path, stages: int, microbatches: int,
                                    optimizer: str) -> None:
    assert_same_training(*train_both(tmp_path, parity_job(stages, microbatches, optimizer)))


@pytest.mark.slow
@pytest.mark.parametrize("stages,microbatches,optimizer",
                         [c for c in FULL_GRID if c not in FAST_GRID])
def test_parity_full_grid(tmp_path: Path, stages: int, microbatches: int, optimizer: str) -> None:
    assert_same_training(*train_both(tmp_path, parity_job(stages, microbatches, optimizer)))


def test_outputs_and_fill_bubbles(tmp_path: Path) -> None:
    """Fill mode: stages further from the input get more inner steps for free (spec §5);
    the run directory holds the timeline, and every record its utilisation."""
    job = parity_job(4, 4, "sm-cg")
    job["data"]["synthetic"]["train_size"] = 64
    job["optimizer"]["inner_steps"] = {"min": 2, "max": 400, "fill_bubbles": True}
    job["run"]["iterations"] = 5
    path = write_job(tmp_path / "job.yaml", job)
    result = run_cli("train", str(path), "--no-live", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = records(tmp_path / "run")
    for r in run:
        assert len(r["busy_fraction"]) == 4 and 0 <= r["bubble_fraction"] <= 1
        assert r["inner_steps"][0] == 2  # stage 0's next input is there at once
    steps = [r["inner_steps"] for r in run[:-1]]  # the last iteration has nothing to wait for
    assert sum(s[3] for s in steps) > sum(s[0] for s in steps)
    assert run[-1]["inner_steps"] == [2, 2, 2, 2]
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    kinds = {e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"forward", "backward", "inner steps", "fill inner steps", "apply update"} <= kinds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_agents(tmp_path: Path, path: Path, torchrun: list[str], env: dict[str, str],
               timeout: float) -> list[tuple[str, str]]:
    """`torchrun` as node 0 and node 1 of `path`'s job into tmp_path/multi; both must end with
    0. Their (stdout, stderr)."""
    nodes = [subprocess.Popen([*torchrun, "--node-rank", str(rank), "-m", "sm_dist", "train",
                               str(path), "--no-live", "--out", "multi",
                               "--set", "run.bind=lo"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err
    return outputs


@pytest.mark.slow  # the default run has test_launch_scripts' two-node launch
def test_two_nodes_on_one_machine(tmp_path: Path) -> None:
    """Two torchrun agents, 2 processes each, a loopback c10d rendezvous: one 4-stage job."""
    job = parity_job(4, 3, "sm-cg")
    path = write_job(tmp_path / "job.yaml", job)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]
    two_agents(tmp_path, path, torchrun, env, timeout=240)
    single = run_here("train", str(path), "--single-process", "--out", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert_same_training(tmp_path / "single", tmp_path / "multi")


def _pid_of_rank(rank: int, marker: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def start_training(tmp_path: Path, job: dict, out: Path, iterations: int
                   ) -> subprocess.Popen[str]:
    """`sm-dist train` of `job` into `out` in the background, once `iterations` are done."""
    path = write_job(tmp_path / "job.yaml", job)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sm_dist", "train", str(path), "--no-live",
                             "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= iterations:
            return proc
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the run did not get going")


def kill_rank_during_training(tmp_path: Path, job: dict, out: Path,
                              rank: int) -> tuple[str, float, int]:
    """Train `job` into `out`, kill `rank`'s process once 3 iterations are done and wait for
    the job to fail: (its stderr, seconds from the kill to its end, records before the kill)."""
    proc = start_training(tmp_path, job, out, iterations=3)
    try:
        victim = _pid_of_rank(rank, str(out))
        assert victim is not None, f"rank {rank}'s process not found"
        before = len((out / "metrics.jsonl").read_text().splitlines())
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode != 0
    return stderr, time.time() - killed_at, before


def test_killed_stage_fails_the_job_naming_it(tmp_path: Path) -> None:
    job = parity_job(4, 2, "sm-cg")
    job["data"]["synthetic"]["train_size"] = 256
    job["run"].update(iterations=500, eval_every=0, rpc_timeout=30)
    out = tmp_path / "victim-run"
    stderr, seconds, before = kill_rank_during_training(tmp_path, job, out, rank=2)
    assert seconds < 30 + 30  # within the RPC timeout, plus teardown
    assert "stage 2 (rank 2" in stderr, stderr
    kept = records(out)  # every line is whole JSON
    assert len(kept) >= before - 1 and kept[0]["iteration"] == 1
    assert [r["iteration"] for r in kept] == list(range(1, len(kept) + 1))


EXPLODING = '''
import torch
from torch import nn


class ExplodeOnThirdCall(nn.Module):
    calls = 0

    def forward(self, x):
        ExplodeOnThirdCall.calls += 1
        if ExplodeOnThirdCall.calls == 3:
            raise RuntimeError("boom: the layer failed")
        return x


def build():
    return nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.Tanh()),
                         nn.Sequential(nn.Linear(5, 4), ExplodeOnThirdCall()),
                         nn.Sequential(nn.Linear(4, 3)))
'''


def test_error_in_a_stage_is_reported_with_stage_and_rank(tmp_path: Path) -> None:
    (tmp_path / "exploding.py").write_text(EXPLODING)
    job = synthetic_job(optimizer={"name": "sgd", "lr": 0.1}, data={"microbatches": 1},
                        run={"iterations": 6, "rpc_timeout": 30})
    job["model"] = {"factory": "exploding:build", "balance": [1, 1, 1]}
    path = write_job(tmp_path / "job.yaml", job)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sm_dist", "train", str(path), "--no-live",
                             "--out", "run"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert "stage 1 (rank 1" in result.stderr and "boom: the layer failed" in result.stderr
    assert len(records(tmp_path / "run")) >= 1


def test_wrong_world_size_is_bad_input(tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", parity_job(2, 1, "sm-cg"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "3", "-m", "sm_dist", "train", str(path),
                             "--out", "run"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "the job has 2 stages" in result.stderr and "--nproc-per-node 2" in result.stderr
    assert not (tmp_path / "run").exists()
