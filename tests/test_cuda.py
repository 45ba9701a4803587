"""CUDA paths: one GPU per stage with RPC device maps. Skipped where no GPU is visible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, write_job
from tests.test_engine import parity_job, records

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_job(stages: int) -> dict:
    job = parity_job(stages, 3, "sm-cg")
    job["run"]["device"] = "cuda"
    return job


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_single_process_on_a_gpu_matches_the_cpu(tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", cuda_job(2))
    gpu = run_cli("train", str(path), "--single-process", "--out", "gpu", cwd=tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    cpu = run_cli("train", str(path), "--single-process", "--out", "cpu", "--set",
                  "run.device=cpu", cwd=tmp_path)
    assert cpu.returncode == 0, cpu.stderr
    for a, b in zip(records(tmp_path / "cpu"), records(tmp_path / "gpu")):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-8)


@pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs (one per stage)")
def test_engine_one_gpu_per_stage(tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", cuda_job(2))
    gpu = run_cli("train", str(path), "--no-live", "--out", "gpu", cwd=tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    single = run_cli("train", str(path), "--single-process", "--out", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    for a, b in zip(records(tmp_path / "single"), records(tmp_path / "gpu")):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)


def test_cuda_requested_without_a_gpu_is_bad_input(tmp_path: Path) -> None:
    if GPUS:
        pytest.skip("a GPU is visible here")
    path = write_job(tmp_path / "job.yaml", cuda_job(2))
    result = run_cli("train", str(path), "--single-process", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "run.device=cpu" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_four_stages_share_one_gpu_through_device_maps(tmp_path: Path) -> None:
    """More stage processes than GPUs: they share them round-robin, tensors moving GPU to GPU
    (here: the same one) through TensorPipe's device maps, with the single-process numbers."""
    path = write_job(tmp_path / "job.yaml", cuda_job(4))
    gpu = run_cli("train", str(path), "--no-live", "--out", "gpu", cwd=tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    single = run_cli("train", str(path), "--single-process", "--out", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    for a, b in zip(records(tmp_path / "single"), records(tmp_path / "gpu")):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
