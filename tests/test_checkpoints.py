"""Checkpoints: written per stage with the coordinator's file last; resuming continues exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from sm_dist.cli import main
from sm_dist.config.job import load_job
from sm_dist.run.checkpoints import (
    COORDINATOR_FILE,
    MANIFEST_FILE,
    complete_checkpoints,
    job_fingerprint,
)
from tests.conftest import metric_rows, run_cli, run_here, synthetic_job, write_job


def records(out: Path) -> list[dict[str, Any]]:
    return metric_rows(out)


def checkpointed_job(optimizer: dict[str, Any]) -> dict[str, Any]:
    return synthetic_job(optimizer=optimizer,
                         run={"iterations": 5, "checkpoint_every": 2, "keep_last": 2,
                              "eval_every": 0, "rpc_timeout": 60})


@pytest.mark.parametrize("optimizer", [
    {"name": "sm", "inner_solver": "gradient", "inner_steps": 3},  # carries its step size
    {"name": "adam", "lr": 0.05},  # carries Adam's moments
    {"name": "gd_armijo"},  # the coordinator carries the step
    {"name": "ddg", "lr": 0.3},  # carries each stage's delayed gradients
    {"name": "sso", "inner_steps": 3},  # the coordinator carries the inner step size
    # stateless between iterations; costs carried (damped: plain CGBlock diverges on this job)
    {"name": "cgblock", "inner_steps": 2, "cgblock_damping": 1.0},
    # carries the scale, the step held for acceptance and the accepted loss
    {"name": "sm_adaptive", "inner_steps": 3, "step_scale": 30.0, "trust_radius": 0.5},
])
def test_resume_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  optimizer: dict[str, Any]) -> None:
    assert_resume_continues_exactly(tmp_path, monkeypatch, checkpointed_job(optimizer))


def test_resume_continues_exactly_with_minibatch_trials(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """sm_adaptive on minibatches: the coordinator's trials leave their α in the stages."""
    job = checkpointed_job({"name": "sm_adaptive", "inner_steps": 3, "step_scale": 30.0})
    assert_resume_continues_exactly(tmp_path, monkeypatch, {**job, "data": {
        **job["data"], "batch": 8}})


def assert_resume_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    job: dict[str, Any]) -> None:
    """5 iterations checkpointed at 4 and 5, resumed to 8: the records and the model of 8
    straight iterations, bit for bit."""
    monkeypatch.chdir(tmp_path)
    path = write_job(tmp_path / "job.yaml", job)
    assert main(["train", str(path), "--single-process", "--no-live", "--out", "a",
                 "--set", "run.iterations=8"]) == 0
    assert main(["train", str(path), "--single-process", "--no-live", "--out", "b"]) == 0
    assert [p.name for p in complete_checkpoints(tmp_path / "b")] == ["step-4", "step-5"]
    assert main(["train", str(path), "--single-process", "--no-live", "--resume", "b",
                 "--set", "run.iterations=8"]) == 0
    straight, resumed = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["iteration"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert b["train_loss"] == a["train_loss"], a["iteration"]
        for cost in ("forward_passes", "backward_passes", "tangent_passes", "hvp_products"):
            assert b[cost] == a[cost], cost
    final_a = torch.load(tmp_path / "a" / "model.pt")["stages"]
    final_b = torch.load(tmp_path / "b" / "model.pt")["stages"]
    for sa, sb in zip(final_a, final_b):
        for name in sa:
            assert torch.equal(sa[name], sb[name])
    assert list((tmp_path / "b").glob("metrics.jsonl.before-resume-*"))


def test_a_checkpoint_ahead_of_its_record_puts_the_record_back_on_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An iteration's record is written once the next iteration's result is in, so a run
    that dies (a full disk) between them leaves the newest checkpoint one iteration ahead of
    metrics.jsonl; resuming from it writes that record back from the checkpoint's own copy
    and goes on exactly as a run that never stopped."""
    monkeypatch.chdir(tmp_path)
    path = write_job(tmp_path / "job.yaml", checkpointed_job({"name": "adam", "lr": 0.05}))
    assert main(["train", str(path), "--single-process", "--no-live", "--out", "a",
                 "--set", "run.iterations=8"]) == 0
    assert main(["train", str(path), "--single-process", "--no-live", "--out", "b"]) == 0
    metrics = tmp_path / "b" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-1]))  # iteration 5's record lost, its checkpoint kept
    assert main(["train", str(path), "--single-process", "--no-live", "--resume", "b",
                 "--set", "run.iterations=8"]) == 0
    straight, resumed = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["iteration"] for r in resumed] == list(range(1, 9))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]


@pytest.fixture
def finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 5-iteration single-process run in tmp_path/run, checkpointed at 4 and 5; its job file
    is tmp_path/job.yaml and the working directory tmp_path."""
    monkeypatch.chdir(tmp_path)
    path = write_job(tmp_path / "job.yaml", checkpointed_job({"name": "sm", "inner_steps": 2}))
    assert main(["train", str(path), "--single-process", "--no-live", "--out", "run"]) == 0
    return path


def test_an_incomplete_checkpoint_is_not_used(tmp_path: Path, finished_run: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A crash while step-5 was written: its coordinator file and manifest (both written after
    the stages' files) are missing. It is not a checkpoint: no note, step-4 is used."""
    path = finished_run
    newest = tmp_path / "run" / "checkpoints" / "step-5"
    (newest / MANIFEST_FILE).unlink()
    (newest / COORDINATOR_FILE).unlink()
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-4"]
    capsys.readouterr()
    assert main(["train", str(path), "--single-process", "--no-live", "--resume", "run"]) == 0
    said = capsys.readouterr()
    assert "resumed after iteration 4" in said.out and said.err == ""
    assert [r["iteration"] for r in records(tmp_path / "run")] == [1, 2, 3, 4, 5]


def flip_bytes_inside_a_tensor(path: Path) -> None:
    """Change 64 bytes in the middle of the largest tensor a checkpoint file holds, in place:
    the file keeps its size and still loads (torch checks no content)."""
    state = torch.load(path, weights_only=True)
    tensors = [t for t in state["module"].values() if isinstance(t, torch.Tensor)]
    largest = max(tensors, key=lambda t: t.numel()).contiguous()
    data = bytearray(path.read_bytes())
    raw = largest.numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes are not in the file once"
    middle = at + len(raw) // 2 - 32
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    torch.load(path, weights_only=True)  # accepted as it is: only the manifest tells


def test_bytes_changed_inside_a_tensor_are_found_and_passed_over(
        tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The manifest's SHA-256 finds damage torch.load accepts: the resumed run says which
    file on stderr, continues from the checkpoint before, and gives the uninterrupted run's
    numbers."""
    path = finished_run
    run = tmp_path / "run"
    flip_bytes_inside_a_tensor(run / "checkpoints" / "step-5" / "stage-1.pt")
    assert main(["train", str(path), "--single-process", "--no-live", "--out", "straight",
                 "--set", "run.iterations=7"]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "--single-process", "--no-live", "--resume", "run",
                 "--set", "run.iterations=7"]) == 0
    said = capsys.readouterr()
    assert "resumed after iteration 4" in " ".join(said.out.split())
    assert said.err.splitlines() == [
        "sm-dist: warning: passed over checkpoints/step-5: stage-1.pt is damaged (its SHA-256 "
        "differs from the one in manifest.json); resuming from step-4"]
    straight, resumed = records(tmp_path / "straight"), records(run)
    assert [r["iteration"] for r in resumed] == list(range(1, 8))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]


def test_every_checkpoint_damaged_is_bad_input_with_each_named(
        tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = finished_run
    run = tmp_path / "run"
    flip_bytes_inside_a_tensor(run / "checkpoints" / "step-5" / "stage-0.pt")
    coordinator = run / "checkpoints" / "step-4" / COORDINATOR_FILE
    coordinator.write_bytes(os.urandom(coordinator.stat().st_size))  # random, same size
    before = sorted((p.name, p.stat().st_size) for p in run.rglob("*") if p.is_file())
    capsys.readouterr()
    assert main(["train", str(path), "--single-process", "--no-live", "--resume", "run",
                 "--set", "run.iterations=7"]) == 2
    said = capsys.readouterr()
    assert said.err.splitlines() == [
        f"sm-dist: error: {Path('run')} has no intact checkpoint: every one is damaged "
        "(step-5: stage-0.pt is damaged (its SHA-256 differs from the one in manifest.json); "
        "step-4: coordinator.pt is damaged (its SHA-256 differs from the one in "
        "manifest.json)); start a new run (the checkpoints are left as they are)"]
    assert sorted((p.name, p.stat().st_size) for p in run.rglob("*") if p.is_file()) == before


def test_a_checkpoint_of_another_job_is_passed_over(tmp_path: Path, finished_run: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A manifest records the job's fingerprint (what a resumed run may not change): a step
    copied in from another run is not continued."""
    path = finished_run
    manifest = tmp_path / "run" / "checkpoints" / "step-5" / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["job_sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["train", str(path), "--single-process", "--no-live", "--resume", "run",
                 "--set", "run.iterations=6"]) == 0
    assert "step-5: it was written by another job" in capsys.readouterr().err
    # What a resumed run may change does not change the fingerprint.
    job = load_job(path)
    more = load_job(path, ["run.iterations=90", "run.keep_last=5", "run.log_every=3"])
    assert job_fingerprint(job) == job_fingerprint(more)
    assert job_fingerprint(job) != job_fingerprint(load_job(path, ["run.seed=9"]))


def test_resume_refuses_a_different_job(tmp_path: Path, finished_run: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = finished_run
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(["train", str(path), "--single-process", "--no-live", "--resume", "run",
                 "--set", "optimizer.delta_rel=0.5"]) == 2
    assert "optimizer.delta_rel" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert main(["train", str(path), "--single-process", "--resume", "nowhere"]) == 2


def test_engine_resumes_a_single_process_checkpoint_identically(tmp_path: Path) -> None:
    """Checkpoints are the same files either way: the engine continues a run exactly."""
    path = write_job(tmp_path / "job.yaml", checkpointed_job({"name": "sm", "inner_steps": 3}))
    straight = run_here("train", str(path), "--single-process", "--out", "a",
                        "--set", "run.iterations=7", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    first = run_here("train", str(path), "--single-process", "--out", "b", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run_cli("train", str(path), "--no-live", "--resume", "b",
                      "--set", "run.iterations=7", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["iteration"] for r in b] == list(range(1, 8))
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-9)
    assert (tmp_path / "b" / "trace.json").exists()


def test_resume_needs_more_iterations(tmp_path: Path, finished_run: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = finished_run
    model = (tmp_path / "run" / "model.pt").read_bytes()
    assert main(["train", str(path), "--single-process", "--resume", "run"]) == 2
    assert "has already run 5 iterations" in capsys.readouterr().err
    assert (tmp_path / "run" / "model.pt").read_bytes() == model


def test_resume_after_a_torn_last_metrics_line(tmp_path: Path, finished_run: Path) -> None:
    """A crash mid-write leaves half a line: --resume reads past it and rewrites the file."""
    path = finished_run
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"iteration": 6, "train_lo')
    assert main(["train", str(path), "--single-process", "--no-live", "--resume", "run",
                 "--set", "run.iterations=7"]) == 0
    assert [r["iteration"] for r in records(tmp_path / "run")] == [1, 2, 3, 4, 5, 6, 7]
