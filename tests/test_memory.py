"""Memory: the probe's peak and base, the figures every run records (per stage process in the
engine, one for --single-process), the monitor's column, and SM's recompute mode, which must
give exactly the iterates of keeping every Ψ graph."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from sm_dist.config.build import build_local_pipeline, load_job_data
from sm_dist.data.batches import split_microbatches
from sm_dist.pipeline.memory import MemoryProbe
from sm_dist.run.metrics import IterationRecord
from sm_dist.run.monitor import LiveMonitor, format_record
from tests.conftest import metric_rows, run_cli, run_here, synthetic_job, write_job
from tests.helpers_math import make_job
from tests.test_cnn import cnn_job
from tests.test_transformer import text_job

CPU = torch.device("cpu")


def records(out: Path) -> list[dict[str, Any]]:
    return metric_rows(out)


def test_the_probe_sees_a_peak_after_its_start_and_not_before() -> None:
    probe = MemoryProbe(CPU)
    assert probe.reading() is None  # nothing before training starts
    big = torch.ones(64 * 1024 * 1024 // 8, dtype=torch.float64)  # 64 MiB, touched
    del big
    probe.start()  # forgets that peak (Linux resets VmHWM on clear_refs)
    before = probe.reading()
    assert before is not None and before.base > 0 and before.peak >= before.base
    assert before.resident
    assert before.training < 32 * 1024 * 1024
    big = torch.ones(96 * 1024 * 1024 // 8, dtype=torch.float64)  # 96 MiB while training
    del big
    after = probe.reading()
    assert after is not None and after.training >= 80 * 1024 * 1024


def test_engine_and_single_process_runs_record_memory(tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", synthetic_job(run={"iterations": 3,
                                                               "eval_every": 0}))
    for mode, extra, count in (("engine", [], 3), ("single", ["--single-process"], 1)):
        result = run_cli("train", str(path), "--no-live", "--out", mode, *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        for record in records(tmp_path / mode):
            assert len(record["peak_memory_mb"]) == count, mode
            assert all(m > 50 for m in record["peak_memory_mb"])  # torch alone is more
            assert all(0 <= t <= p for t, p in zip(record["training_memory_mb"],
                                                   record["peak_memory_mb"]))
            assert record["memory_kind"] == "resident"
        summary = json.loads((tmp_path / mode / "summary.json").read_text())
        assert summary["peak_memory_mb"] == records(tmp_path / mode)[-1]["peak_memory_mb"]
        said = " ".join(result.stdout.split())
        if mode == "engine":  # a row per stage under the pipeline's shares
            assert "peak memory MiB" in said and "added by training" in said
        else:
            assert "peak memory (resident, the one process):" in said


def test_the_monitor_shows_each_stages_peak() -> None:
    record = IterationRecord.from_json({"iteration": 2, "train_loss": 1.0, "train_acc": 0.5,
                                        "peak_memory_mb": [612.3, 540.0, 555.5],
                                        "training_memory_mb": [40.0, 30.0, 20.0],
                                        "memory_kind": "resident"})
    console = Console(record=True, width=80, file=io.StringIO(), force_terminal=True)
    with LiveMonitor("demo", 5, 3, [], console, refresh_per_second=20) as monitor:
        monitor.progress(record)
        monitor.record(record)
    frame = console.export_text()
    assert "peak memory" in frame and "612 MiB" in frame and "556 MiB" in frame
    assert "peak_mem_mib 612,540,556" in format_record(record, 5)
    one = dataclasses.replace(record, peak_memory_mb=[700.0], training_memory_mb=[50.0])
    console = Console(record=True, width=80, file=io.StringIO(), force_terminal=True)
    with LiveMonitor("demo", 5, 3, [], console, refresh_per_second=20) as monitor:
        monitor.progress(one)
    assert "peak memory 700 MiB" in console.export_text()  # one process holds every stage


@pytest.mark.parametrize("job", [
    synthetic_job(optimizer={"name": "sm", "inner_steps": 4},
                  data={"dataset": "synthetic", "microbatches": 3,
                        "synthetic": {"features": 6, "classes": 3, "train_size": 24,
                                      "test_size": 12}}),
    pytest.param(synthetic_job(optimizer={"name": "sm_adaptive", "inner_steps": 3,
                                          "step_scale": 30.0}), marks=pytest.mark.slow),
    pytest.param(synthetic_job(optimizer={"name": "sm", "inner_steps": 3,
                                          "inner_solver": "gradient", "curvature": "batch"}),
                 marks=pytest.mark.slow),
    pytest.param(cnn_job(name="sm", inner_steps=3), marks=pytest.mark.slow),
    text_job(name="sm", inner_steps=2),
], ids=["sm-cg", "sm_adaptive", "sm-gradient-batch", "cnn", "transformer"])
def test_recompute_gives_exactly_the_iterates_of_kept_graphs(tmp_path: Path,
                                                              job: dict[str, Any]) -> None:
    job = {**job, "run": {**job.get("run", {}), "iterations": 3, "eval_every": 0}}
    path = write_job(tmp_path / "job.yaml", job)
    for value in ("false", "true"):
        # Warm starts kept in both: recompute alone drops them (their default follows it).
        result = run_here("train", str(path), "--single-process", "--no-live", "--out", value,
                          "--set", f"optimizer.recompute={value}",
                          "--set", "optimizer.power_warm_start=true", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    kept, rebuilt = records(tmp_path / "false"), records(tmp_path / "true")
    for a, b in zip(kept, rebuilt, strict=True):
        assert b["train_loss"] == a["train_loss"]
        assert b["hvp_products"] == a["hvp_products"] and b["inner_steps"] == a["inner_steps"]
    for sa, sb in zip(torch.load(tmp_path / "false" / "model.pt")["stages"],
                      torch.load(tmp_path / "true" / "model.pt")["stages"]):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize(("recompute", "warm_start", "keeps_vectors"), [
    (False, None, True), (True, None, False), (True, True, True), (False, False, False)])
def test_power_vectors_are_kept_unless_recompute_or_told(recompute: bool,
                                                        warm_start: bool | None,
                                                        keeps_vectors: bool) -> None:
    """power_warm_start: null keeps each microbatch's power-iteration vectors with graphs kept
    and not with recompute; true or false is what it says. config.yaml gets the choice."""
    optimizer: dict[str, Any] = {"name": "sm", "recompute": recompute}
    if warm_start is not None:
        optimizer["power_warm_start"] = warm_start
    job = make_job(optimizer=optimizer)
    assert job.optimizer.power_warm_start is keeps_vectors
    pipeline = build_local_pipeline(job, CPU)
    data = load_job_data(job)
    pipeline.forward_backward(split_microbatches(data.train_x, data.train_y, 2),
                              len(data.train_x), True)
    for stage in pipeline.stages[1:]:  # the first stage runs no power iteration
        assert (sorted(stage.optimizer.power_vectors) == [0, 1]) is keeps_vectors


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_keeps_no_forward_graph_until_the_backward(recompute: bool) -> None:
    """With recompute, a stage's forward keeps the input alone (no graph); its backward runs
    the forward again, recording, and gives the gradients the kept graph gives."""
    job = make_job(optimizer={"name": "sm", "recompute": recompute})
    pipeline = build_local_pipeline(job, CPU)
    stage = pipeline.stages[1]
    x = torch.randn(5, 5, dtype=torch.float64,  # stage 1: Linear(5, 4) + tanh
                    generator=torch.Generator().manual_seed(0))
    out = stage.forward_microbatch(0, x)
    entry = stage.stash[0]
    assert entry.recorded is not recompute
    assert (entry.out.grad_fn is None) is recompute
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    c = torch.full((5,), 0.1, dtype=out.dtype)
    g_in, _ = stage.backward_microbatch(0, g, c)
    assert g_in is not None
    expected = torch.autograd.functional.vjp(stage.module, x, g)[1]
    torch.testing.assert_close(g_in, expected, rtol=1e-12, atol=1e-14)
