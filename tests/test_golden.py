"""Every job of docs/results, shortened (tests/golden.py), gives the numbers it gave before the
architecture's second round: the refactoring moved code, not arithmetic. float64, fixed inner
steps, one process; every record field but times, memory and utilisation, to the bit, against
the numbers stored for this machine's arithmetic where it has its own (tests/golden.py)."""

from __future__ import annotations

import json

import pytest

from tests.golden import JOBS, GoldenJob, stored_path, train_numbers

STORED = stored_path()  # this machine's own numbers where it has them (tests/golden.py)
STORED_NUMBERS = json.loads(STORED.read_text()) if STORED.exists() else {}


def _param(job: GoldenJob):  # type: ignore[no-untyped-def]
    return pytest.param(job, id=job.label, marks=[pytest.mark.slow] if job.slow else [])


def test_every_job_has_stored_numbers() -> None:
    assert sorted(STORED_NUMBERS) == sorted(job.label for job in JOBS)


@pytest.mark.parametrize("job", [_param(job) for job in JOBS])
def test_a_docs_job_gives_the_stored_numbers(job: GoldenJob) -> None:
    assert train_numbers(job) == STORED_NUMBERS[job.label]
