"""`sm-dist compare`: the grid, its errors, and a real tiny grid whose tables hold its numbers."""

from __future__ import annotations

import math
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread

from sm_dist.cli import main
from sm_dist.config.job import ConfigError, dump_job, job_from_dict
from sm_dist.report import compare as compare_runs
from sm_dist.report.compare_tables import compare_markdown, steady_iteration_time
from sm_dist.report.grid import (
    CompareError,
    GridPoint,
    RunResult,
    default_at,
    depth_model,
    expand_grid,
    given_options,
    split_layers,
    split_overrides,
)
from sm_dist.report.run_data import RunData
from sm_dist.run.metrics import IterationRecord
from tests.conftest import metric_rows, run_cli, run_here, synthetic_job, write_job

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The end-to-end grid: SM at N = 1, 2 and Adam at two learning rates, each at depths 2 and 3 of
# the tiny job's MLP (widths [6, 5, 4, 3] on 3 stages): 8 runs of 3 iterations, one process each.
GRID = ["--optimizers", "sm,adam", "--inner-steps", "1,2", "--depths", "2,3",
        "--lrs", "0.01,0.1", "--single-process"]
LABELS = ["mlp2-sm-n1", "mlp2-sm-n2", "mlp2-adam-lr0.01", "mlp2-adam-lr0.1",
          "mlp3-sm-n1", "mlp3-sm-n2", "mlp3-adam-lr0.01", "mlp3-adam-lr0.1"]
HEADINGS = {2: "mlp2: 2 layers, widths 6-5-3, stages [1, 1]",
            3: "mlp3: 3 layers, widths 6-5-5-3, stages [1, 1, 1]"}


# ------------------------------------------------------------------------------ the grid
def test_split_layers_and_depth_model() -> None:
    assert split_layers(2, 2) == [1, 1]
    assert split_layers(4, 4) == [1, 1, 1, 1]
    assert split_layers(8, 4) == [2, 2, 2, 2]
    assert split_layers(6, 4) == [2, 2, 1, 1]
    paper = [784, 512, 512, 512, 10]  # the paper's 4-layer MLP on 4 stages
    assert depth_model(paper, 4, 2) == ([784, 512, 10], [1, 1])
    assert depth_model(paper, 4, 4) == (paper, [1, 1, 1, 1])
    assert depth_model(paper, 4, 8) == ([784, *[512] * 7, 10], [2, 2, 2, 2])
    assert depth_model(paper, 4, 1) == ([784, 10], [1])


def test_default_at() -> None:
    assert default_at(300) == [60, 120, 180, 240, 300]
    assert default_at(25) == [5, 10, 15, 20, 25]
    assert default_at(7) == [2, 3, 5, 6, 7]
    assert default_at(3) == [1, 2, 3]
    assert default_at(1) == [1]


SM_OWN = ("cg_tol, curvature, delta_abs, delta_floor, delta_rel, inner_lr, inner_solver, "
          "inner_steps, power_iterations, power_warm_start, recompute, rho")
CG_INNER_SM = SM_OWN
ARMIJO_CG_INNER_SM = ("armijo_beta, armijo_c, armijo_init, " + SM_OWN)


def test_expand_grid() -> None:
    base = job_from_dict(synthetic_job())
    grid = expand_grid(base, ["sm", "gd_armijo", "adam"], inner_steps=[1, 10], depths=[2, 4],
                       lrs=[0.001, 0.01])
    assert [(p.label, p.optimizer, p.depth, p.inner_steps, p.lr) for p in grid] == [
        ("mlp2-sm-n1", "sm", 2, 1, None), ("mlp2-sm-n10", "sm", 2, 10, None),
        ("mlp2-gd_armijo", "gd_armijo", 2, None, None),
        ("mlp2-adam-lr0.001", "adam", 2, None, 0.001), ("mlp2-adam-lr0.01", "adam", 2, None, 0.01),
        ("mlp4-sm-n1", "sm", 4, 1, None), ("mlp4-sm-n10", "sm", 4, 10, None),
        ("mlp4-gd_armijo", "gd_armijo", 4, None, None),
        ("mlp4-adam-lr0.001", "adam", 4, None, 0.001), ("mlp4-adam-lr0.01", "adam", 4, None, 0.01),
    ]
    # Depth 2 on 2 of the job's 3 stages, depth 4 on all 3; the first hidden width repeated.
    assert [(p.job.model.mlp.widths, p.job.model.balance) for p in grid[::5]] == [
        ([6, 5, 3], [1, 1]), ([6, 5, 5, 5, 3], [2, 1, 1])]
    # Each point's section is its own optimizer's: SM's options left out of Adam's and back.
    assert [(p.job.name, p.job.optimizer.name, getattr(p.job.optimizer, "inner_steps", None),
             getattr(p.job.optimizer, "lr", None)) for p in grid[:5]] == [
        ("mlp2-sm-n1", "sm", 1, None), ("mlp2-sm-n10", "sm", 10, None),
        ("mlp2-gd_armijo", "gd_armijo", None, None), ("mlp2-adam-lr0.001", "adam", None, 0.001),
        ("mlp2-adam-lr0.01", "adam", None, 0.01)]
    # Everything else is the base job's; the backward's halves are timed for the optimizers
    # that may run on a zero-bubble schedule (the time tables replay them there).
    assert all(p.job.data == base.data for p in grid)
    assert [p.job.run.split_backward for p in grid[:5]] == [False, False, True, True, True]
    assert all(replace(p.job.run, split_backward=False) == base.run for p in grid)


def test_another_optimizers_point_takes_its_own_defaults(tmp_path: Path) -> None:
    """A job of sm_adaptive that leaves scale_max at its default: sm_kron's point gets sm_kron's
    default, not sm_adaptive's written out; what the file gives (delta_rel) carries over."""
    raw = synthetic_job(optimizer={"name": "sm_adaptive", "inner_steps": 3, "delta_rel": 0.5})
    path = write_job(tmp_path / "job.yaml", raw)
    base = job_from_dict(raw)
    given = given_options(path, [])
    assert given == {"inner_steps", "delta_rel"}
    kron, adaptive = expand_grid(base, ["sm_kron", "sm_adaptive"], given=given)
    assert (kron.job.optimizer.scale_max, kron.job.optimizer.delta_rel) == (1e8, 0.5)
    assert adaptive.job.optimizer == base.optimizer


def test_an_optimizers_own_set_goes_to_its_points_only() -> None:
    sets, own = split_overrides(["run.iterations=3", "optimizer.cgblock_damping=2",
                                 "optimizer.replica_mode=exact", "optimizer.lr=0.5"])
    assert sets == ["run.iterations=3", "optimizer.replica_mode=exact"]
    assert own == ["optimizer.cgblock_damping=2", "optimizer.lr=0.5"]
    base = job_from_dict(synthetic_job(), sets)
    grid = expand_grid(base, ["cgblock", "sm", "sgd"], inner_steps=[3], optimizer_sets=own)
    assert [getattr(p.job.optimizer, "cgblock_damping", None) for p in grid] == [2.0, None, None]
    assert [getattr(p.job.optimizer, "lr", None) for p in grid] == [None, None, 0.5]
    # A swept lr is the grid's, whatever --set says.
    grid = expand_grid(base, ["sgd"], lrs=[0.1], optimizer_sets=own[1:])
    assert grid[0].job.optimizer.lr == 0.1
    with pytest.raises(CompareError, match="optimizer.cgblock_damping: no optimizer of "
                                           "--optimizers .sm. has that option"):
        expand_grid(base, ["sm"], optimizer_sets=own[:1])


def test_expand_grid_defaults_to_the_jobs_model_steps_and_lr() -> None:
    base = job_from_dict(synthetic_job(optimizer={"name": "sm", "inner_steps": 3}))
    notes: list[str] = []
    grid = expand_grid(base, ["sm", "adam", "ddg", "gd", "gd_armijo"], notes=notes)
    # The job's N; its optimizer takes no lr, so the lr-swept ones take their default.
    assert [p.label for p in grid] == ["sm-n3", "adam-lr0.01", "ddg-lr0.01", "gd-lr0.01",
                                       "gd_armijo"]
    assert all(p.job.model == base.model and p.depth is None for p in grid)
    assert notes == [f"optimizer.name sm -> {name}: left out sm's own options {dropped}"
                     for name, dropped in (
                         ("adam", ARMIJO_CG_INNER_SM), ("ddg", ARMIJO_CG_INNER_SM),
                         ("gd", ARMIJO_CG_INNER_SM), ("gd_armijo", CG_INNER_SM))]
    adam = job_from_dict(synthetic_job(optimizer={"name": "adam", "lr": 0.05}))
    grid = expand_grid(adam, ["sm", "adam", "ddg"])
    assert [p.label for p in grid] == ["sm-n20", "adam-lr0.05", "ddg-lr0.05"]
    assert [getattr(p.job.optimizer, "lr", None) for p in grid] == [None, 0.05, 0.05]
    fill = job_from_dict(synthetic_job(optimizer={"inner_steps": {"min": 2, "max": 9}}))
    assert [p.label for p in expand_grid(fill, ["sm"])] == ["sm-n2-9"]


# ------------------------------------------------------------------------------ bad input
def test_an_unknown_optimizer_is_named_by_the_schema(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    base = job_from_dict(synthetic_job())
    with pytest.raises(ConfigError, match="optimizer.name: unknown value 'adamw'"):
        expand_grid(base, ["sm", "adamw"])
    job = write_job(tmp_path / "job.yaml", synthetic_job())
    assert main(["compare", str(job), "--optimizers", "sm,adamw", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "optimizer.name" in err and "adamw" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # nothing written


@pytest.mark.parametrize("arguments,message", [
    (["--optimizers", "sm,sm"], "--optimizers lists sm twice"),
    (["--optimizers", "adam", "--inner-steps", "1,10"], "--inner-steps applies to sm"),
    (["--optimizers", "sm", "--lrs", "0.1"], "--lrs applies to gd, sgd, adam, ddg"),
    (["--optimizers", "sm", "--depths", "0"], "--depths 0"),
    (["--optimizers", "sm", "--at", "9"], "--at 9: the runs have iterations 1 to 3"),
    (["--optimizers", "sm", "--collect-only"], "--collect-only needs --out"),
])
def test_bad_grids_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          arguments: list[str], message: str) -> None:
    job = write_job(tmp_path / "job.yaml", synthetic_job())
    assert main(["compare", str(job), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_depths_with_a_factory_job_is_an_error(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    job = synthetic_job()
    job["model"] = {"factory": "mymodel:build", "balance": [1, 1]}
    path = write_job(tmp_path / "job.yaml", job)
    assert main(["compare", str(path), "--optimizers", "sm", "--depths", "2,4"]) == 2
    err = capsys.readouterr().err
    assert "--depths" in err and "model.factory" in err and "mymodel:build" in err


def test_a_run_directory_of_another_job_is_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path / "job.yaml", synthetic_job())
    other = job_from_dict(synthetic_job(name="sm-n3", optimizer={"inner_steps": 3,
                                                                 "delta_rel": 0.5}))
    dump_job(other, tmp_path / "out" / "runs" / "sm-n3" / "config.yaml")
    assert main(["compare", str(job), "--optimizers", "sm", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "out" / "runs" / "sm-n3") in err
    assert "optimizer.delta_rel: 0.5 there, 0.3 here" in err and "--rerun" in err
    assert sorted(p.name for p in (tmp_path / "out" / "runs" / "sm-n3").iterdir()) == [
        "config.yaml"]  # nothing trained or removed


# ------------------------------------------------------------------------------ the tables alone
def fake_result(point: GridPoint, losses: list[float | None], **last: Any) -> RunResult:
    records: list[dict[str, Any]] = [
        {"iteration": k, "train_loss": loss, "wall_time": 0.3 + 0.5 * k, "forward_passes": k,
         "backward_passes": k} for k, loss in enumerate(losses, start=1)]
    records[-1].update(test_acc=0.5, **last)
    run = RunData(Path(point.label), point.label, {"optimizer": {"name": point.optimizer}},
                  [IterationRecord.from_json(r) for r in records], None)
    return RunResult(point, Path(point.label), "collected", run=run)


def test_tables_pick_the_best_finite_lr_note_divergence_and_sum_hvps() -> None:
    base = job_from_dict(synthetic_job())
    sm, slow, fast = expand_grid(base, ["sm", "adam"], lrs=[0.1, 10.0])
    results = [fake_result(sm, [1.0, 0.5], hvp_products=[0, 40, 2], tangent_passes=7),
               fake_result(slow, [1.0, 0.9]),
               fake_result(fast, [1.0, None])]  # non-finite: diverged
    text = compare_markdown(results, at=[1, 2], job_path="job.yaml", overrides=[], grid=[],
                            command_line="sm-dist compare", out=Path("out"))
    assert "| adam (lr=0.1, best of 2) | 1.000 | 0.9000 | - | 50.0% |" in text
    assert "| 10 | non-finite | 50.0% |  |" in text and "| 0.1 | 0.9000 | 50.0% | yes |" in text
    assert "- adam-lr10: the training loss was not finite from iteration 2" in text
    # HVPs summed over the stages; runs without the keys show a dash.
    # Time per iteration leaves out the first (start-up): (1.3 s - 0.8 s) / 1 iteration.
    assert "| sm-n3 | 2 | 2 | 2 | 42 | 7 | 1.30 s | 500.0 ms |" in text
    assert "| adam-lr0.1 | 2 | 2 | 2 | - | - | 1.30 s | 500.0 ms |" in text
    assert steady_iteration_time(results[0].run) == pytest.approx(0.5)


def test_a_diverging_run_does_not_stretch_the_figure() -> None:
    """The loss axis ends HEADROOM times above the highest starting loss, so that a run that
    blows up leaves the plot instead of flattening the others; its legend entry says so."""
    from sm_dist.report.compare_plot import HEADROOM, y_limits
    from sm_dist.report.compare_tables import Row

    base = job_from_dict(synthetic_job())
    sm, adam = expand_grid(base, ["sm", "adam"])
    steady = fake_result(sm, [2.0, 1.0, 0.5]).run
    blowing = fake_result(adam, [2.5, 1e30, None]).run
    assert steady is not None and blowing is not None
    rows = [Row("sm", "sm", 3, steady), Row("adam", "adam", None, blowing)]
    assert y_limits(rows) == pytest.approx((0.8 * 0.5, HEADROOM * 2.5))
    assert y_limits(rows[:1]) == pytest.approx((0.4, HEADROOM * 2.0))


def test_pipeline_passes_count_a_tangent_pass_as_forward_and_backward() -> None:
    from sm_dist.report.compare_tables import pipeline_passes

    def record(**costs: int) -> IterationRecord:
        return IterationRecord(1, 1.0, **costs)

    assert pipeline_passes(record(forward_passes=9, backward_passes=2)) == 11
    assert pipeline_passes(record(forward_passes=3, backward_passes=3, tangent_passes=5)) == 16
    assert pipeline_passes(record()) is None


# ------------------------------------------------------------------------------ a real grid
def md_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every markdown table of compare.md under its headings ('## section / ### sub'), as
    rows of {column: cell}."""
    tables: dict[str, list[dict[str, str]]] = {}
    section = sub = ""
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            section, sub = line[3:], ""
        elif line.startswith("### "):
            sub = line[4:]
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            tables[f"{section} / {sub}"] = []
        elif not set(line) <= set("|-: "):
            tables[f"{section} / {sub}"].append(dict(zip(header, cells)))
    return tables


def table(tables: dict[str, list[dict[str, str]]], section: str, sub: str
          ) -> dict[str, dict[str, str]]:
    (key,) = [k for k in tables if k.startswith(section) and k.endswith(f" / {sub}")]
    return {row[next(iter(row))]: row for row in tables[key]}


def records_of(run_dir: Path) -> list[dict[str, Any]]:
    return metric_rows(run_dir)


def same_loss(cell: str, value: float) -> bool:
    return math.isclose(float(cell), float(f"{value:.4g}"), rel_tol=0, abs_tol=0)


def acc(value: float) -> str:
    return f"{100 * value:.1f}%"


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny grid, trained for real once: its directory and the command's output."""
    root = tmp_path_factory.mktemp("compare")
    write_job(root / "job.yaml", synthetic_job())
    result = run_here("compare", "job.yaml", *GRID, "--out", "out", cwd=root)  # runs: processes
    assert result.returncode == 0, result.stdout + result.stderr
    return root, result.stdout


def test_compare_trains_every_point_and_writes_both_files(grid_dir: tuple[Path, str]) -> None:
    root, stdout = grid_dir
    out = root / "out"
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(LABELS)
    for number, label in enumerate(LABELS, start=1):
        assert re.search(rf"\[\s*{number}/8\] {re.escape(label)} +trained: final loss", stdout)
        assert (out / "runs" / label / "summary.json").is_file()
        assert (out / "jobs" / f"{label}.yaml").is_file()
        log = (out / "logs" / f"{label}.log").read_text()
        assert log.startswith(f"$ {sys.executable} -m sm_dist train ") and "--single-process" in log
    image = out / "compare.png"
    assert image.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(image).shape[:2]
    assert width > 1000 and height > 4 * 300  # 4 rows: depths 2 and 3, N = 1 and 2
    assert "-> out\n" in stdout and "out/compare.md" in stdout and "out/compare.png" in stdout


def test_compare_md_holds_the_numbers_of_the_runs(grid_dir: tuple[Path, str]) -> None:
    root, _ = grid_dir
    out = root / "out"
    text = (out / "compare.md").read_text()
    assert f"sm-dist compare job.yaml {' '.join(GRID)} --out out" in text
    tables = md_tables(text)
    runs = {label: records_of(out / "runs" / label) for label in LABELS}
    for depth, heading in HEADINGS.items():
        # The best lr is the one with the lower final training loss.
        finals = {lr: runs[f"mlp{depth}-adam-lr{lr}"][-1]["train_loss"] for lr in ("0.01", "0.1")}
        best = min(finals, key=lambda lr: finals[lr])
        adam_row = f"adam (lr={best}, best of 2)"
        sweep = table(tables, "Learning-rate sweeps", f"adam, {heading}")
        assert [lr for lr, row in sweep.items() if row["best"] == "yes"] == [best]
        for lr, final in finals.items():
            assert same_loss(sweep[lr]["final training loss"], final)

        table1 = table(tables, "Training loss and test accuracy at chosen", heading)
        assert list(table1) == ["sm (N=1)", "sm (N=2)", adam_row]
        labels = {"sm (N=1)": f"mlp{depth}-sm-n1", "sm (N=2)": f"mlp{depth}-sm-n2",
                  adam_row: f"mlp{depth}-adam-lr{best}"}
        for name, label in labels.items():
            records = runs[label]
            assert [r["iteration"] for r in records] == [1, 2, 3]
            for record in records:
                k = record["iteration"]
                assert same_loss(table1[name][f"loss @{k}"], record["train_loss"])
                evaluated = [r for r in records if "test_acc" in r and r["iteration"] <= k]
                expected = acc(evaluated[-1]["test_acc"]) if evaluated else "-"
                assert table1[name][f"test acc @{k}"] == expected, (name, k)

        finals_table = table(tables, "Final training loss and test accuracy", heading)
        assert list(finals_table) == ["sm", adam_row]
        for n in (1, 2):
            last = runs[f"mlp{depth}-sm-n{n}"][-1]
            loss, accuracy = finals_table["sm"][f"N={n}"].split(" / ")
            assert same_loss(loss, last["train_loss"]) and accuracy == acc(last["test_acc"])
            last = runs[f"mlp{depth}-adam-lr{best}"][-1]  # repeated in every N column
            loss, accuracy = finals_table[adam_row][f"N={n}"].split(" / ")
            assert same_loss(loss, last["train_loss"]) and accuracy == acc(last["test_acc"])

    cost = table(tables, "Cost", "")
    for label, records in runs.items():
        last = records[-1]
        row = cost[label]
        assert row["iterations"] == "3"
        assert row["forward passes"] == str(last["forward_passes"])
        assert row["backward passes"] == str(last["backward_passes"])
        if "HVPs" in row:  # recorded once the engine counts them
            assert row["HVPs"] == (str(sum(last["hvp_products"])) if "hvp_products" in last
                                   else "-")
        if "tangent passes" in row:
            assert row["tangent passes"] == str(last.get("tangent_passes", "-"))


def test_a_second_compare_collects_and_trains_nothing(
        grid_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = grid_dir
    out = root / "out"
    before = {label: (out / "runs" / label / "metrics.jsonl").stat().st_mtime_ns
              for label in LABELS}
    monkeypatch.chdir(root)
    for extra in ([], ["--collect-only"]):
        assert main(["compare", "job.yaml", *GRID, "--out", "out", *extra]) == 0
        stdout = capsys.readouterr().out
        assert "(0 to train, 8 to collect)" in stdout
        assert stdout.count(" collected: final loss ") == 8
    after = {label: (out / "runs" / label / "metrics.jsonl").stat().st_mtime_ns
             for label in LABELS}
    assert after == before
    assert "8 collected from earlier" in (out / "compare.md").read_text()


def test_a_failed_run_is_reported_and_the_others_are_written(
        grid_dir: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = grid_dir
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    # The two new lr points "train" with a command that fails at once; the rest are collected.
    monkeypatch.setattr(compare_runs, "train_command", lambda job_file, path, single: [
        sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    grid = [arg if arg != "0.01,0.1" else "0.01,0.1,0.5" for arg in GRID]
    assert main(["compare", str(root / "job.yaml"), *grid, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "2 of 10 runs failed" in captured.err
    log = out / "logs" / "mlp2-adam-lr0.5.log"
    assert f"mlp2-adam-lr0.5: sm-dist train exited with 3; log {log}" in captured.err
    assert "boom" in log.read_text()
    text = (out / "compare.md").read_text()
    assert "## Failed runs" in text and "- mlp3-adam-lr0.5: sm-dist train exited with 3" in text
    assert "adam (lr=" in text and "best of 2)" in text  # the finished lrs still compared
    assert (out / "compare.png").is_file()


def test_engine_runs_and_an_unfinished_run_is_set_aside_not_lost(tmp_path: Path) -> None:
    """Without --single-process every run starts one process per stage (the engine writes a
    trace and per-stage utilisation); an unfinished run of the same job in the way is moved to
    OUT/replaced/ and trained again, its files kept."""
    job = synthetic_job(model={"mlp": {"widths": [6, 5, 3], "activation": "tanh"},
                               "balance": [1, 1]},
                        run={"iterations": 2, "eval_every": 0, "threads": 1, "rpc_timeout": 60})
    write_job(tmp_path / "job.yaml", job)
    point, = expand_grid(job_from_dict(job), ["sm"], inner_steps=[1])
    unfinished = tmp_path / "out" / "runs" / point.label
    unfinished.mkdir(parents=True)
    dump_job(point.job, unfinished / "config.yaml")
    (unfinished / "metrics.jsonl").write_text('{"iteration": 1, "note": "interrupted"}\n')
    result = run_cli("compare", "job.yaml", "--optimizers", "sm", "--inner-steps", "1",
                     "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    kept = tmp_path / "out" / "replaced" / point.label
    assert "interrupted" in (kept / "metrics.jsonl").read_text()
    assert f"earlier run kept in {Path('out') / 'replaced' / point.label}" in result.stdout
    run = tmp_path / "out" / "runs" / point.label
    assert (run / "trace.json").is_file() and (run / "summary.json").is_file()
    records = records_of(run)
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(len(r["busy_fraction"]) == 2 for r in records)
    assert (tmp_path / "out" / "compare.md").is_file()
    assert "--single-process" not in (tmp_path / "out" / "logs" / f"{point.label}.log").read_text()


def test_the_equal_passes_table_cuts_every_run_at_the_smallest_budget() -> None:
    base = job_from_dict(synthetic_job())
    sm, adam = expand_grid(base, ["sm", "adam"])
    results = [fake_result(sm, [2.0, 1.0, 0.5]),  # 2 passes an iteration: 6 in all
               fake_result(adam, [2.0, 2.5, 0.9, 0.8, 0.7])]  # 10 in all, one rise
    text = compare_markdown(results, at=[1], job_path="job.yaml", overrides=[], grid=[],
                            command_line="sm-dist compare", out=Path("out"))
    section = text[text.index("## At equal pipeline passes"):text.index("## Cost")]
    assert "| optimizer | passes | final loss | loss @ 6 passes | final test acc | rises |" \
        in section
    assert "| sm (N=3) | 6 | 0.5000 | 0.5000 | 50.0% | 0 |" in section
    assert "| adam (lr=0.01) | 10 | 0.7000 | 0.9000 | 50.0% | 1 |" in section


def test_compare_md_gives_simulated_pipeline_time(grid_dir: tuple[Path, str]) -> None:
    """Each run replayed from its measured costs on the fastest schedule its optimizer may
    run on: the totals are the simulator's, labelled with the link and the schedule."""
    from sm_dist.report.compare_tables import seconds_text
    from sm_dist.report.compare_time import fastest_schedule
    from sm_dist.report.run_data import load_run
    from sm_dist.report.simulate import simulate_run

    root, _ = grid_dir
    out = root / "out"
    text = (out / "compare.md").read_text()
    assert "## Simulated pipeline time" in text and "`pcie4` link" in text
    tables = md_tables(text)
    for depth, heading in HEADINGS.items():
        rows = table(tables, "Simulated pipeline time", f"{heading}, N=1")
        sm_run = load_run(out / "runs" / f"mlp{depth}-sm-n1")
        schedule, times = fastest_schedule(sm_run, "pcie4")
        assert schedule in ("gpipe", "1f1b")  # SM's update needs the whole drain
        total = max(simulate_run(sm_run, "pcie4", schedule=schedule).end_times().values())
        assert total == max(times.values())
        assert rows[f"sm (N=1), {schedule}"]["total"] == seconds_text(total)
        adam = next(r for r in rows if r.startswith("adam"))
        assert set(rows) == {f"sm (N=1), {schedule}", adam}
        # Adam on whichever of the five schedules ends soonest: never later than GPipe.
        lr = re.search(r"lr=([^,)]+)", adam)
        assert lr is not None, adam
        best, _ = fastest_schedule(load_run(out / "runs" / f"mlp{depth}-adam-lr{lr[1]}"),
                                   "pcie4")
        assert adam.endswith(f", {best}")


def test_a_run_that_diverges_and_stops_is_a_result_not_a_failure(tmp_path: Path) -> None:
    """run.on_nonfinite: stop ends a diverging run early (exit 1 and stopped.txt): compare
    keeps it, shows it as diverged from that iteration and still exits 0."""
    write_job(tmp_path / "job.yaml", synthetic_job(run={"iterations": 6, "eval_every": 0}))
    result = run_here("compare", "job.yaml", "--optimizers", "gd", "--lrs", "0.1,1e8",
                      "--single-process", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gd-lr1e08  stopped: diverged at iteration 2" in result.stdout
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "## Diverged runs" in text and "- gd-lr1e08: stopped at iteration 2" in text
    assert "## Failed runs" not in text
    assert "gd (lr=0.1, best of 2)" in text



def test_loss_at_equal_time_is_at_the_shortest_run_that_went_the_distance(
        tmp_path: Path) -> None:
    """A run that diverged and stopped ends soonest; the equal-time column must not use its
    few seconds as everyone's budget."""
    from sm_dist.report.compare_tables import DepthGroup, Row
    from sm_dist.report.compare_time import time_section
    from sm_dist.report.run_data import RunData
    from sm_dist.run.metrics import IterationRecord
    from sm_dist.run.run_dir import StopNote

    def run(name: str, losses: list[float], stopped: str | None) -> RunData:
        records = [IterationRecord(k + 1, loss) for k, loss in enumerate(losses)]
        stop = None if stopped is None else StopNote(len(losses), stopped, stopped)
        return RunData(tmp_path / name, name, {}, records, None, stop)

    long, short = run("long", [2.0, 1.0, 0.5, 0.25], None), run("short", [2.0, 50.0], "diverged")
    group = DepthGroup(None, "tiny", [], rows=[Row("gd", "gd", None, long),
                                               Row("cgblock", "cgblock", None, short)])
    times = {long.path: {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}, short.path: {1: 1.0, 2: 2.0}}
    lines = time_section([group], times, "none", [0.5], [])
    header = next(line for line in lines if line.startswith("| optimizer"))
    assert header.endswith("loss @ 4.00 s |"), header  # gd's whole run, not cgblock's 2 s
    gd = next(line for line in lines if line.startswith("| gd"))
    assert gd.split("|")[-2].strip() == "0.2500"
    slow = run("slow", [2.0, 1.0], None)  # its first iteration ends after everyone's budget
    group.rows.append(Row("sm", "sm", None, slow))
    times[slow.path] = {1: 9.0, 2: 18.0}
    lines = time_section([group], times, "none", [0.5], [])
    assert next(line for line in lines if line.startswith("| sm")).split("|")[-2].strip() == "-"


def test_loss_at_equal_passes_is_at_the_fewest_passes_of_a_run_that_went_the_distance(
        tmp_path: Path) -> None:
    from sm_dist.report.compare_tables import Row, _equal_passes_table
    from sm_dist.report.run_data import RunData
    from sm_dist.run.metrics import IterationRecord
    from sm_dist.run.run_dir import StopNote

    def run(name: str, losses: list[float], stopped: str | None) -> RunData:
        records = [IterationRecord(k + 1, loss, forward_passes=k + 1, backward_passes=k + 1)
                   for k, loss in enumerate(losses)]
        stop = None if stopped is None else StopNote(len(losses), stopped, stopped)
        return RunData(tmp_path / name, name, {}, records, None, stop)

    rows = [Row("gd", "gd", None, run("long", [2.0, 1.0, 0.5], None)),
            Row("cgblock", "cgblock", None, run("short", [2.0, 50.0], "diverged"))]
    lines = _equal_passes_table(rows)
    assert "loss @ 6 passes" in lines[0], lines[0]  # gd's 3 iterations, not cgblock's 2
    assert lines[2].split("|")[4].strip() == "0.5000"
