"""benchmarks/gpu_check.sh runs only where a GPU is lent, so nothing else would notice when a
benchmark it calls renames an option: every option it passes must be one its script declares."""

from __future__ import annotations

import re

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def benchmark_calls() -> list[tuple[str, list[str]]]:
    """(benchmark script, the --options given to it) for each `$PY benchmarks/X.py ...` call,
    continuation lines joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = []
    for match in re.finditer(r"\$PY (benchmarks/\w+\.py)([^\n]*)", text):
        calls.append((match.group(1), re.findall(r"(--[\w-]+)", match.group(2))))
    return calls


def test_every_option_gpu_check_passes_is_declared_by_its_benchmark() -> None:
    calls = benchmark_calls()
    assert {script for script, _ in calls} >= {"benchmarks/hvp_cost.py",
                                                "benchmarks/engine_vs_torch_pipelining.py",
                                                "benchmarks/memory_per_stage.py"}
    for script, options in calls:
        source = (REPO / script).read_text()
        for option in options:
            assert f'"{option}"' in source, f"{script} has no option {option} (gpu_check.sh)"
