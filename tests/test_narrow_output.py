"""The end-of-run summary and `sm-dist report` at 80 columns and wider: real runs of several
optimizers, rendered into recorded consoles; no figure may be cut, no line may be too wide."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from sm_dist.report.summary import finish_run, report_main
from tests.conftest import run_cli, run_here, synthetic_job, write_job

ITERATIONS = 4
SHORT = ("sm-fill", "sm_adaptive", "adam")
# What `sm-dist compare` names its runs, and an optimizer named by a plugin's module:Class.
COMPARE_LIKE = "mlp4-sm_adaptive-n20-20261129-002231"
PLUGIN = "plugin-20261129-002231"
PLUGIN_OPTIMIZER = "tests.test_optim_plugin:SignGD"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Finished runs trained for real: SM filling the bubbles over one process per stage (with
    utilisation figures), sm_adaptive and Adam in one process, and copies under the long names
    a compare grid and a plugin optimizer give."""
    root = tmp_path_factory.mktemp("narrow")
    run = {"iterations": ITERATIONS, "eval_every": 2, "threads": 1, "rpc_timeout": 60}
    jobs = {"sm-fill": ({"name": "sm", "inner_steps": {"min": 2, "max": 20,
                                                        "fill_bubbles": True}}, []),
            "sm_adaptive": ({"name": "sm_adaptive", "inner_steps": 3}, ["--single-process"]),
            "adam": ({"name": "adam", "lr": 0.01}, ["--single-process"])}
    dirs = {}
    for name, (optimizer, extra) in jobs.items():
        job = write_job(root / f"{name}.yaml", synthetic_job(optimizer=optimizer, run=run))
        dirs[name] = root / name
        runner = run_here if extra else run_cli  # the single-process ones in this process
        result = runner("train", str(job), "--no-live", *extra, "--out", str(dirs[name]), cwd=root)
        assert result.returncode == 0, result.stderr
    dirs[COMPARE_LIKE] = shutil.copytree(dirs["sm_adaptive"], root / COMPARE_LIKE)
    dirs[PLUGIN] = shutil.copytree(dirs["adam"], root / PLUGIN)
    config = yaml.safe_load((dirs[PLUGIN] / "config.yaml").read_text())
    config["optimizer"]["name"] = PLUGIN_OPTIMIZER
    (dirs[PLUGIN] / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dirs


def figures(summary: dict[str, Any]) -> dict[str, str]:
    """What the table shows of a summary.json, by column, formatted as the table formats it
    (written out here again, so that a change of format or a cut figure fails)."""
    def number(key: str, form: str) -> str:
        return "-" if summary[key] is None else format(summary[key], form)

    shown = {"run": summary["name"], "optimizer": summary["optimizer"],
             "stages": str(summary["stages"]), "iterations": str(summary["iterations"]),
             "final loss": number("final_train_loss", ".4g"),
             "best loss": f"{summary['best_train_loss']:.4g} "
                          f"@{summary['best_train_loss_iteration']}",
             "final test acc": f"{100 * summary['final_test_acc']:.1f}%",
             "wall time": f"{summary['wall_time']:.1f} s",
             "passes F/B": f"{summary['forward_passes']}/{summary['backward_passes']}",
             "bubble": "-" if summary["mean_bubble_fraction"] is None
             else f"{100 * summary['mean_bubble_fraction']:.0f}%"}
    return shown


def report(dirs: list[Path], out: Path, width: int, terminal: bool
           ) -> tuple[str, list[dict[str, Any]]]:
    """`sm-dist report` of `dirs` into a recorded console: its text and the summaries."""
    console = Console(width=width, record=True, file=io.StringIO(), force_terminal=terminal)
    assert report_main([str(d) for d in dirs], str(out), console) == 0
    summaries = json.loads((out / "summary.json").read_text())
    return console.export_text(), summaries if isinstance(summaries, list) else [summaries]


def table_lines(text: str) -> list[str]:
    """The summary's lines: everything before the list of files written."""
    return text[:text.index("sm-dist: report in")].splitlines()


def assert_nothing_cut(text: str, summaries: list[dict[str, Any]], width: int) -> None:
    lines = table_lines(text)
    assert "…" not in text
    assert all(len(line.rstrip()) <= width for line in lines), "\n".join(lines)
    for summary in summaries:
        for column, figure in figures(summary).items():
            # Each figure whole, on a line with its column's name or its run's other figures.
            assert any(figure in line for line in lines), (column, figure, text)


def layout(text: str, names: list[str]) -> str:
    """Which layout the summary took: one row per run, one column per run, or blocks."""
    lines = table_lines(text)
    if any("iterations" in line and "bubble" in line for line in lines):
        return "wide"
    if any(all(name in line for name in names) for line in lines):
        return "columns"
    return "blocks"


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "plain"])
@pytest.mark.parametrize("width", [80, 120, 200])
def test_no_figure_is_cut(runs: dict[str, Path], tmp_path: Path, width: int,
                          terminal: bool) -> None:
    short = [runs[name] for name in SHORT]
    text, summaries = report(short, tmp_path / "short", width, terminal)
    assert_nothing_cut(text, summaries, width)
    assert [s["optimizer"] for s in summaries] == ["sm", "sm_adaptive", "adam"]
    assert summaries[0]["mean_bubble_fraction"] is not None  # the bubble column is filled
    assert layout(text, list(SHORT)) == ("wide" if width >= 120 else "columns")
    if width >= 120:  # one row per run: each run's figures on its own line, in order
        for summary in summaries:
            (line,) = [line for line in table_lines(text) if summary["name"] in line.split()]
            cells = list(figures(summary).values())
            positions = [line.index(cell) for cell in cells]
            assert positions == sorted(positions), (line, cells)
    every = [runs[name] for name in (*SHORT, COMPARE_LIKE, PLUGIN)]
    text, summaries = report(every, tmp_path / "every", width, terminal)
    assert_nothing_cut(text, summaries, width)
    assert PLUGIN_OPTIMIZER in text and COMPARE_LIKE in text
    # Two long names: only 200 columns hold one row per run, and 80 not even a column each
    # (at 120 either of the narrow layouts may fit, by a few columns).
    if width != 120:
        assert layout(text, [s["name"] for s in summaries]) == ("wide" if width == 200
                                                                 else "blocks")


@pytest.mark.parametrize("name", [*SHORT, PLUGIN])
def test_one_run_at_80_columns(runs: dict[str, Path], tmp_path: Path, name: str) -> None:
    for terminal in (True, False):
        text, summaries = report([runs[name]], tmp_path / f"out-{terminal}", 80, terminal)
        assert_nothing_cut(text, summaries, 80)
        for column, figure in figures(summaries[0]).items():
            if column != "run":  # one run: its name heads the column, each figure its row
                assert any(column in line and figure in line
                           for line in table_lines(text)), (column, figure)


def test_the_end_of_a_run_at_80_columns(runs: dict[str, Path], tmp_path: Path) -> None:
    out = shutil.copytree(runs["sm-fill"], tmp_path / "the-run-directory-of-a-long-job-name")
    console = Console(width=80, record=True, file=io.StringIO(), force_terminal=True)
    finish_run(out, console)
    text = console.export_text()
    lines = text.splitlines()
    assert "…" not in text and all(len(line) <= 80 for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    for figure in figures(summary).values():
        assert figure in text, figure
    # The pipeline's means are the bubble column's, and the path is whole on its own line.
    assert f"bubble {100 * summary['mean_bubble_fraction']:.0f}%):" in text
    assert len(str(out)) > 80 or str(out) in lines
