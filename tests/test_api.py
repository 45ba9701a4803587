"""The Python API end to end, your own data (data.factory, tensors, Datasets), epochs, the
full-training-set evaluation and TensorBoard files read back with tensorboard's own reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sm_dist
from sm_dist.config.job import ConfigError
from sm_dist.data.datasets import DataError
from tests.conftest import REPO, metric_rows, run_cli, synthetic_job, write_job


def tensors(seed: int = 0, n: int = 40, features: int = 6) -> tuple[torch.Tensor, ...]:
    """Train and test tensors of a 3-class task (float64, labels from two features' signs)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    cut = 3 * n // 4
    return x[:cut], y[:cut], x[cut:], y[cut:]


def own_model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def api_job(**run: Any) -> dict[str, Any]:
    return {"name": "api", "model": {"balance": [2, 2, 1]}, "data": {"microbatches": 2},
            "optimizer": {"name": "sm", "inner_steps": 3},
            "run": {"iterations": 4, "eval_every": 2, "dtype": "float64", "threads": 1,
                    "rpc_timeout": 60, **run}}


def test_api_trains_own_model_and_tensors_single_process_and_engine(tmp_path: Path) -> None:
    model, data = own_model(), tensors()
    before = [p.detach().clone() for p in model.parameters()]
    single = sm_dist.train(api_job(), model=model, data=data, out=tmp_path / "single",
                           single_process=True, live=False)
    engine = sm_dist.train(api_job(), model=model, data=data, out=tmp_path / "engine",
                           live=False)
    for p, q in zip(model.parameters(), before):  # the caller's model is not changed
        assert torch.equal(p, q)
    for result in (single, engine):
        assert [r.iteration for r in result.records] == [1, 2, 3, 4]
        assert result.summary["final_train_loss"] == result.records[-1].train_loss
        assert result.records[1].test_loss is not None
        assert (result.path / "config.yaml").is_file()
    for a, b in zip(single.records, engine.records):
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-9, abs=0)
    assert single.records[-1].train_loss < single.records[0].train_loss
    trained = single.load_model()
    x = data[0]
    with torch.no_grad():
        loss = nn.functional.cross_entropy(trained(x), data[1]).item()
    # model.pt is the state after the last update, which the last record's evaluation saw
    assert loss < single.records[0].train_loss
    for p, q in zip(trained.parameters(), engine.load_model().parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_api_takes_datasets_factories_and_job_files(tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = tensors()
    datasets = (torch.utils.data.TensorDataset(train_x, train_y),
                torch.utils.data.TensorDataset(test_x, test_y))
    a = sm_dist.train(api_job(), model=own_model, data=datasets, out=tmp_path / "a",
                      single_process=True, live=False)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(api_job()))  # JSON is YAML
    b = sm_dist.train(path, model=own_model(), data=lambda: tensors(), out=tmp_path / "b",
                      single_process=True, live=False, overrides=["run.iterations=3"])
    assert len(b.records) == 3
    # own_model seeds itself, so the factory and the instance start from the same weights
    assert [r.train_loss for r in a.records[:3]] == [r.train_loss for r in b.records]


def test_api_bad_input_is_named(tmp_path: Path) -> None:
    job = api_job()
    job["model"]["mlp"] = {"widths": [6, 3]}
    with pytest.raises(ConfigError, match="model: given to train"):
        sm_dist.train(job, model=own_model(), data=tensors(), out=tmp_path / "a")
    train_x, train_y, test_x, test_y = tensors()
    with pytest.raises(DataError, match="labels must be integer class indices"):
        sm_dist.train(api_job(), model=own_model(), data=(train_x, train_y.double()),
                      out=tmp_path / "b", single_process=True)
    with pytest.raises(DataError, match="30 inputs but 29 labels"):
        sm_dist.train(api_job(), model=own_model(), data=(train_x, train_y[:-1]),
                      out=tmp_path / "c", single_process=True)
    narrow = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                           nn.Linear(5, 2)).double()
    with pytest.raises(DataError, match="3 classes.*2 outputs"):
        sm_dist.train(api_job(), model=narrow, data=tensors(), out=tmp_path / "d",
                      single_process=True)
    wide_x = torch.randn(30, 9, dtype=torch.float64)
    with pytest.raises(DataError, match="cannot take the data's inputs of shape"):
        sm_dist.train(api_job(), model=own_model(), data=(wide_x, train_y),
                      out=tmp_path / "e", single_process=True)
    assert not any((tmp_path / name).exists() for name in "abcde")  # nothing written


class Scaled(nn.Module):
    """A layer whose class a stage process could not import, when set to live in __main__."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_engine_refuses_a_class_from_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setattr(Scaled, "__module__", "__main__")
    model = nn.Sequential(nn.Linear(6, 3), Scaled(), nn.Linear(3, 3)).double()
    job = api_job()
    job["model"]["balance"] = [1, 1, 1]
    with pytest.raises(sm_dist.api.JobSetupError, match="Scaled.*__main__.*single_process"):
        sm_dist.train(job, model=model, data=tensors(), out=tmp_path / "x")


FACTORY_MODULE = """
import torch

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x[:24], y[:24], x[24:], y[24:]

def train_only():
    return data()[:2]

def bad_labels():
    x, y = data()[:2]
    return x, y[:5]
"""


def factory_job(factory: str, **data: Any) -> dict[str, Any]:
    job = synthetic_job(name="factory")
    job["data"] = {"factory": factory, "microbatches": 2, **data}
    return job


def test_data_factory_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "mydata.py").write_text(FACTORY_MODULE)
    path = write_job(tmp_path / "job.yaml", factory_job("mydata:data"))
    done = run_cli("train", str(path), "--single-process", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3] and "test_loss" in rows[1]
    # Without a test split nothing is evaluated, and the run says nothing of a test set.
    path = write_job(tmp_path / "train-only.yaml", factory_job("mydata:train_only"))
    done = run_cli("train", str(path), "--single-process", "--out", "only", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "test_loss" not in (tmp_path / "only/metrics.jsonl").read_text()
    summary = json.loads((tmp_path / "only/summary.json").read_text())
    assert summary["final_test_loss"] is None


@pytest.mark.parametrize(("factory", "message"), [
    ("mydata:bad_labels", "24 inputs but 5 labels; give one label per input"),
    ("mydata:missing", "module 'mydata' has no function 'missing'"),
    ("nosuchmodule:data", "cannot import data factory 'nosuchmodule:data'"),
])
def test_bad_data_factory_is_one_line_exit_2(tmp_path: Path, factory: str, message: str) -> None:
    (tmp_path / "mydata.py").write_text(FACTORY_MODULE)
    path = write_job(tmp_path / "job.yaml", factory_job(factory))
    done = run_cli("train", str(path), "--out", "run", cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()


def test_dataset_and_factory_are_exclusive(tmp_path: Path) -> None:
    job = factory_job("mydata:data")
    job["data"]["dataset"] = "synthetic"
    done = run_cli("validate", str(write_job(tmp_path / "job.yaml", job)), cwd=tmp_path)
    assert done.returncode == 2 and "data: both of data.dataset and data.factory" in done.stderr


def test_epochs_set_the_iterations_and_full_training_set_is_evaluated(tmp_path: Path) -> None:
    job = synthetic_job(name="epochs", data={"batch": 10, "epochs": 2},
                        run={"eval_train_every": 2, "eval_every": 0})
    result = sm_dist.train(job, out=tmp_path / "run", single_process=True, live=False)
    # 24 samples in batches of 10: 3 batches an epoch, so 2 epochs are 6 iterations
    assert [r.iteration for r in result.records] == [1, 2, 3, 4, 5, 6]
    assert [r.epoch for r in result.records] == pytest.approx(
        [10 / 24, 20 / 24, 1, 1 + 10 / 24, 1 + 20 / 24, 2])
    evaluated = [r.iteration for r in result.records if r.full_train_loss is not None]
    assert evaluated == [2, 4, 6]
    assert all(0 <= r.full_train_acc <= 1 for r in result.records if r.full_train_acc)
    assert result.summary["final_full_train_loss"] == result.records[-1].full_train_loss


def test_full_batch_full_train_loss_is_the_next_iterations_loss(tmp_path: Path) -> None:
    job = synthetic_job(name="fulltrain", run={"eval_train_every": 1, "iterations": 3})
    result = sm_dist.train(job, out=tmp_path / "run", single_process=True, live=False)
    records = result.records
    for before, after in zip(records, records[1:]):  # h after t's update is t+1's h
        assert before.full_train_loss == pytest.approx(after.train_loss, rel=1e-12)


def test_tensorboard_files_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = synthetic_job(name="board", run={"tensorboard": True, "iterations": 3})
    result = sm_dist.train(job, out=tmp_path / "run", single_process=True, live=False)
    board = EventAccumulator(str(result.path / "tensorboard"))
    board.Reload()
    tags = board.Tags()["scalars"]
    rows = [{k: v for k, v in row.items() if k != "optimizer"}
            for row in metric_rows(result.path)]  # the section's keys are tags of their own
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key == "iteration" or value is None:
                continue
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for s, item in items:
                if isinstance(item, (int, float)):
                    tag = key if s is None else f"{key}/stage_{s}"
                    expected.setdefault(tag, {})[row["iteration"]] = float(item)
    assert {"train_loss", "test_loss", "local_loss/stage_0", "inner_steps/stage_2"} <= set(tags)
    assert set(tags) == set(expected)
    for tag, values in expected.items():
        got = {event.step: event.value for event in board.Scalars(tag)}
        assert got == pytest.approx(values, rel=1e-6), tag  # TensorBoard keeps float32


def test_missing_tensorboard_is_bad_input(tmp_path: Path) -> None:
    """Without the package (hidden from this subprocess) the run is refused up front."""
    path = write_job(tmp_path / "job.yaml", synthetic_job(run={"tensorboard": True}))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tensorboard"] = None  # as if it were not installed
        from sm_dist.cli import main
        sys.exit(main(["train", {str(path)!r}, "--single-process", "--out", "run"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert "pip install 'sm-dist[tensorboard]'" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", [["--single-process"], pytest.param([], marks=pytest.mark.slow)])
def test_the_example_runs(tmp_path: Path, mode: list[str]) -> None:
    """examples/own_model_and_data.py as the docs tell a user to run it."""
    done = subprocess.run([sys.executable, str(REPO / "examples" / "own_model_and_data.py"),
                           *mode, "--iterations", "6", "--out", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "the trained model, loaded back: test accuracy" in done.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 6
