"""benchmarks/heldout_seeds.py: one line per variant from its seeds' held-out evaluations."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("heldout_seeds",
                                               REPO / "benchmarks" / "heldout_seeds.py")
assert _spec is not None and _spec.loader is not None
heldout_seeds = importlib.util.module_from_spec(_spec)
sys.modules["heldout_seeds"] = heldout_seeds
_spec.loader.exec_module(heldout_seeds)


def test_a_variant_line_gives_bests_finals_and_when_each_seed_reached_its_target() -> None:
    runs = {0: [(10, 0.9), (20, 0.5), (30, 0.7)], 1: [(10, 0.8), (20, 0.75), (30, 0.6)]}
    assert heldout_seeds.parse_targets("0=0.55,1=0.5") == {0: 0.55, 1: 0.5}
    line = heldout_seeds.variant_line("secant-d0.2", runs, {0: 0.55, 1: 0.5})
    assert line == ("secant-d0.2              0.500@20 0.600@30  mean best 0.550  final mean "
                    "0.650 worst 0.700  reaches target at 20,-")
    assert "reaches" not in heldout_seeds.variant_line("v", runs, {})


def test_a_directory_that_is_no_run_is_bad_input(tmp_path: Path) -> None:
    for name in ("notaseed", "ratio-s0"):
        (tmp_path / name).mkdir()
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "heldout_seeds.py"),
                               str(tmp_path / name)], capture_output=True, text=True)
        assert done.returncode == 2
        assert str(tmp_path / name) in done.stderr and len(done.stderr.strip().splitlines()) == 1
