"""The sm-dist command line: training writes a run directory; bad input exits 2 writing nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sm_dist.cli import main
from tests.conftest import REPO, metric_rows, run_cli, synthetic_job, write_job


def test_train_single_process_writes_config_and_metrics(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", synthetic_job())
    result = run_cli("train", str(job), "--single-process", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["optimizer"]["inner_steps"] == 3 and config["run"]["iterations"] == 3
    assert config["optimizer"]["delta_rel"] == 0.3  # defaults are written out, resolved
    records = metric_rows(out)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("train_loss", "train_acc", "wall_time", "forward_passes", "backward_passes",
                    "predicted_decrease", "inner_steps", "curvature"):
            assert key in r, key
        assert len(r["inner_steps"]) == 3 and len(r["curvature"]) == 3
        assert r["curvature"][0] is None  # stage 1 sends nothing down
        assert all(c > 0 for c in r["curvature"][1:])
        assert r["predicted_decrease"] < 0
    assert [r["forward_passes"] for r in records] == [1, 2, 3]
    assert "test_acc" in records[1] and "test_acc" in records[2] and "test_acc" not in records[0]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert "iter 3/3" in result.stdout


def test_train_default_run_dir_and_overrides(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", synthetic_job())
    result = run_cli("train", str(job), "--single-process", "--set", "run.runs_dir=myruns",
                     "--set", "optimizer.name=gd_armijo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "myruns").iterdir()
    assert run.name.startswith("tiny-")
    records = metric_rows(run)
    # Each Armijo trial is one forward-only pass on top of the forward of the iteration.
    assert all(r["forward_passes"] > r["backward_passes"] for r in records)
    assert all(r["step_size"] > 0 for r in records)


def test_refuses_a_directory_that_holds_a_run(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", synthetic_job())
    assert run_cli("train", str(job), "--single-process", "--out", "out",
                   cwd=tmp_path).returncode == 0
    before = (tmp_path / "out" / "metrics.jsonl").read_text()
    again = run_cli("train", str(job), "--single-process", "--out", "out", cwd=tmp_path)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == before  # nothing lost


BAD_INPUTS = {
    "unknown key": ({"optimizer": {"name": "sm", "inner_step": 3}},
                    ["optimizer.inner_step", "did you mean 'optimizer.inner_steps'"]),
    "wrong type": ({"optimizer": {"name": "sm", "delta_rel": "fast"}},
                   ["optimizer.delta_rel", "number"]),
    "another optimizer's option": ({"optimizer": {"name": "sm", "lr": 0.1}},
                                   ["optimizer.lr", "an option of gd, sgd, adam, ddg, shampoo, "
                                    "soap, muon and psgd"]),
    "balance": ({"model": {"mlp": {"widths": [6, 5, 4, 3]}, "balance": [1, 1]}},
                ["model.balance", "2", "3"]),
    "microbatches": ({"data": {"dataset": "synthetic", "microbatches": 0,
                               "synthetic": {"features": 6, "classes": 3}}},
                     ["data.microbatches"]),
    "dataset": ({"data": {"dataset": "imagenet", "microbatches": 2}},
                ["data.dataset", "imagenet", "fashion_mnist"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["train", "validate"])
def test_bad_job_exits_2_with_a_clear_message_and_writes_nothing(
        tmp_path: Path, case: str, command: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    change, expected = BAD_INPUTS[case]
    job = synthetic_job()
    job.update(change)
    path = write_job(tmp_path / "job.yaml", job)
    monkeypatch.chdir(tmp_path)
    args = [command, str(path)] + (["--single-process"] if command == "train" else [])
    assert main(args) == 2
    stderr = capsys.readouterr().err
    for text in expected:
        assert text in stderr, (text, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # no run directory


def test_bad_job_in_a_real_process_exits_2(tmp_path: Path) -> None:
    job = synthetic_job()
    job["data"]["dataset"] = "imagenet"
    path = write_job(tmp_path / "job.yaml", job)
    result = run_cli("train", str(path), "--single-process", cwd=tmp_path)
    assert result.returncode == 2
    assert "data.dataset" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_several_mistakes_reported_at_once(tmp_path: Path) -> None:
    job = synthetic_job()
    job["optimizer"] = {"name": "sm", "inner_step": 3, "delta_rel": "fast"}
    job["data"]["microbatches"] = -1
    path = write_job(tmp_path / "job.yaml", job)
    result = run_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    for key in ("optimizer.inner_step", "optimizer.delta_rel", "data.microbatches"):
        assert key in result.stderr


def test_missing_fashion_mnist_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    job = synthetic_job(model={"mlp": {"widths": [784, 10]}, "balance": [1]},
                        data={"dataset": "fashion_mnist", "root": str(tmp_path / "nodata"),
                              "microbatches": 1})
    path = write_job(tmp_path / "job.yaml", job)
    monkeypatch.setenv("SM_DIST_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    # Block torchvision's download so the test is the same with or without a network.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    result = run_cli("train", str(path), "--single-process", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "dataset-fashion-mnist" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_validate_accepts_the_shipped_job_files(path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_fashion_mnist_first_loss_is_ln10(tmp_path: Path) -> None:
    """Real data, real model: a fresh 10-class classifier starts at ln 10 (spec §3.9)."""
    job = REPO / "configs" / "fashion" / "mlp4-sm.yaml"
    result = run_cli("train", str(job), "--single-process", "--out", "out",
                     "--set", f"data.root={tmp_path / 'data'}", "--set", "data.train_subset=400",
                     "--set", "run.iterations=3", "--set", "optimizer.inner_steps=5",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line)
               for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert abs(records[0]["train_loss"] - math.log(10)) < 0.05
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_acc"] > 0.3


def test_five_mistakes_in_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The user's-view acceptance: a misspelt key, a string for a number, negative
    microbatches, a balance that does not match the model and an unknown dataset, all reported
    at once, exit code 2, no run directory."""
    job = synthetic_job()
    job["optimizer"] = {"name": "sm", "inner_stepz": 10}
    job["run"]["iterations"] = "thirty"
    job["data"]["microbatches"] = -4
    job["model"]["balance"] = [1, 1]
    job["data"]["dataset"] = "cifar100"
    path = write_job(tmp_path / "job.yaml", job)
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(path), "--no-live"]) == 2
    err = capsys.readouterr().err
    assert "has 5 errors" in err, err
    for text in ("optimizer.inner_stepz", "did you mean 'optimizer.inner_steps'",
                 "run.iterations", "data.microbatches", "model.balance", "data.dataset"):
        assert text in err, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_schedule_prints_the_grid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedule", str(REPO / "configs" / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "4 stages, 4 microbatches, sm" in out
    assert "stage 0: F0 F1 F2 F3 B3 B2 B1 B0 L I10 A" in out
    assert "stage 3: F0 F1 F2 F3 B3 B2 B1 B0 L I10 W50 A" in out
    grid = [line for line in out.splitlines() if line.startswith("    ")]
    # Cut into blocks of the terminal's width (80 here), W50 named once per stage.
    assert len(grid) % 4 == 0 and all(len(line) <= 80 for line in out.splitlines()[5:])
    assert [sum(line.count("W50") for line in grid[s::4]) for s in range(4)] == [0, 1, 1, 1]


def test_schedule_into_a_closed_pipe_is_quiet() -> None:
    """`sm-dist schedule JOB | head -1`: no BrokenPipeError when the reader leaves."""
    done = subprocess.run(
        f"{sys.executable} -m sm_dist schedule configs/quickstart.yaml --iterations 400 | head -1",
        shell=True, cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.startswith("quickstart: 4 stages")
    assert done.stderr == ""


def test_version_and_subcommand_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("sm-dist 0.")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "configs/quickstart.yaml", "--iterations", "5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("usage: sm-dist train")
    assert "unrecognized arguments: --iterations 5" in err


def test_report_command_on_a_finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_job(tmp_path / "job.yaml", synthetic_job())
    assert main(["train", str(path), "--single-process", "--no-live", "--out", "run"]) == 0
    for name in ("summary.json", "loss_vs_iteration.png", "accuracy.png"):
        (tmp_path / "run" / name).unlink()
    capsys.readouterr()
    assert main(["report", "run"]) == 0
    assert (tmp_path / "run" / "loss_vs_iteration.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 3
    assert main(["report", "nowhere"]) == 2
