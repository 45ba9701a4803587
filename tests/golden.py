"""The jobs of docs/results, shortened, and the numbers they gave before a refactoring: a change
that must not alter an iterate is checked against them (tests/test_golden.py).

Each job is a docs/results job (the base job file, the grid point `compare` makes of it, the
`--set` overrides of the page's command) in float64 with fixed inner steps, cut to a few
iterations. `python -m tests.golden --write` stores what the code of the day computes in
tests/data/golden_records.json; run it only to record numbers that a reviewed change is meant
to move, never to make a failing comparison pass.

Another CPU's BLAS and LAPACK round differently (an AMD EPYC gives 3e-15 relative on most of
these jobs, 0.38 on the undamped CGBlock, which amplifies rounding), so bits are a machine's:
`--machine` stores the numbers of this machine's arithmetic, named by `machine_key()`, in
tests/data/golden_records.<key>.json, which the test then reads instead of the first file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STORED = REPO / "tests" / "data" / "golden_records.json"  # the machine that first stored them
# What a record measures of time, memory and the machine: not part of the numbers compared.
NOT_COMPARED = {"wall_time", "iteration_time", "busy_fraction", "bubble_fraction",
                "turnaround_idle", "update_idle", "peak_memory_mb", "training_memory_mb",
                "memory_kind"}
MLP_JOB = "docs/results/fashion-cpu.yaml"
CNN_JOB = "configs/fashion/cnn-sm.yaml"
TEXT_JOB = "configs/text/transformer-sm.yaml"
SHORT = ["run.dtype=float64", "run.threads=1"]


@dataclass(frozen=True)
class GoldenJob:
    """One shortened docs/results job: its base file, optimizer, depth and overrides."""

    label: str
    base: str
    optimizer: str
    iterations: int
    depth: int | None = None
    steps: int | None = None
    lr: float | None = None
    overrides: tuple[str, ...] = ()
    slow: bool = field(default=True, compare=False)

    def job(self) -> Any:
        """The validated job, built as `sm-dist compare` builds its grid point."""
        from sm_dist.config.job import load_job
        from sm_dist.report.grid import expand_grid, given_options, split_overrides

        sets, optimizer_sets = split_overrides([
            *SHORT, f"run.iterations={self.iterations}", f"run.eval_every={self.iterations}",
            *self.overrides])
        base = load_job(REPO / self.base, sets)
        point, = expand_grid(base, [self.optimizer],
                             None if self.steps is None else [self.steps],
                             None if self.depth is None else [self.depth],
                             None if self.lr is None else [self.lr],
                             optimizer_sets=optimizer_sets,
                             given=given_options(REPO / self.base, sets))
        return point.job


def _mlp_jobs() -> list[GoldenJob]:
    jobs = []
    for depth in (2, 4, 8):
        for name in ("sm", "sm_adaptive", "sso", "cgblock"):
            jobs.append(GoldenJob(f"mlp{depth}-{name}", MLP_JOB, name, 3, depth, steps=10,
                                  slow=depth != 4))
        jobs.append(GoldenJob(f"mlp{depth}-gd_armijo", MLP_JOB, "gd_armijo", 3, depth,
                              slow=depth != 4))
        jobs.append(GoldenJob(f"mlp{depth}-ddg", MLP_JOB, "ddg", 4, depth, lr=0.1,
                              slow=depth != 4))
        jobs.append(GoldenJob(f"mlp{depth}-adam", MLP_JOB, "adam", 3, depth, lr=0.01,
                              slow=depth != 4))
    jobs.append(GoldenJob("mlp4-cgblock-damping1", MLP_JOB, "cgblock", 3, 4, steps=10,
                          overrides=("optimizer.cgblock_damping=1",)))
    for activation, sets in (("tanh", ("model.mlp.activation=tanh",)),
                             ("2-per-stage", ("model.balance=[2, 2]",))):
        for name in ("sm", "sm_adaptive"):
            jobs.append(GoldenJob(f"mlp4-{activation}-{name}", MLP_JOB, name, 3, steps=20,
                                  overrides=sets))
    return jobs


def _cnn_and_text_jobs() -> list[GoldenJob]:
    jobs = []
    for name in ("sm", "sm_adaptive", "gd_armijo", "adam"):
        steps = 10 if name.startswith("sm") else None
        lr = 0.01 if name == "adam" else None
        jobs.append(GoldenJob(f"cnn-{name}", CNN_JOB, name, 2, steps=steps, lr=lr))
        jobs.append(GoldenJob(f"cnn-minibatch-{name}", CNN_JOB, name, 3, steps=steps, lr=lr,
                              overrides=("data.batch=200",)))
        jobs.append(GoldenJob(f"text-{name}", TEXT_JOB, name, 2, steps=steps, lr=lr))
    for name in ("sm_adaptive", "adam"):
        steps = 10 if name.startswith("sm") else None
        lr = 0.003 if name == "adam" else None
        jobs.append(GoldenJob(f"text-minibatch-{name}", TEXT_JOB, name, 3, steps=steps, lr=lr,
                              overrides=("data.batch=32",)))
    return jobs


JOBS = _mlp_jobs() + _cnn_and_text_jobs()


def machine_key() -> str:
    """12 hex digits of the bits that fixed float64 and float32 products, a Cholesky factor,
    its inverse and an eigendecomposition give on this machine: machines that agree on them
    round these jobs alike."""
    import hashlib

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the jobs run (SHORT)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 129, generator=gen, dtype=torch.float64)
    gram = rows.T @ rows + torch.eye(129, dtype=torch.float64)
    small = gram[:6, :6].clone()
    parts = [gram, torch.cholesky_inverse(torch.linalg.cholesky(gram)),
             torch.cholesky_inverse(torch.linalg.cholesky(small)), torch.linalg.eigh(gram)[0],
             rows.float() @ rows.float().T]
    torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def machine_path() -> Path:
    """Where this machine's own numbers are stored (`--machine`)."""
    return STORED.with_name(f"golden_records.{machine_key()}.json")


def stored_path() -> Path:
    """This machine's stored numbers if it has its own, else the first machine's."""
    own = machine_path()
    return own if own.exists() else STORED


def numbers(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl record's numbers, its optimizer's section flattened beside the rest."""
    flat = {k: v for k, v in record.items() if k not in NOT_COMPARED and k != "optimizer"}
    for key, value in (record.get("optimizer") or {}).items():
        flat[key] = value
    return flat


def train_numbers(job: GoldenJob) -> list[dict[str, Any]]:
    """Each record's numbers when `job` is trained in one process."""
    import sm_dist

    with tempfile.TemporaryDirectory() as out:
        try:
            sm_dist.train(job.job(), single_process=True, out=Path(out) / "run", live=False)
        except Exception as err:  # a diverging job stops: its records are the numbers
            if type(err).__name__ != "NonFiniteLoss":
                raise
        lines = (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()
    return [numbers(json.loads(line)) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"store the numbers in {STORED}")
    parser.add_argument("--machine", action="store_true",
                        help="store them as this machine's (golden_records.<machine_key>.json)")
    parser.add_argument("--only", default=None, help="labels, comma-separated")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    target = machine_path() if args.machine else STORED
    stored = json.loads(target.read_text()) if target.exists() else {}
    for job in JOBS:
        if only is not None and job.label not in only:
            continue
        start = time.perf_counter()
        stored[job.label] = train_numbers(job)
        print(f"{job.label}: {time.perf_counter() - start:.1f} s, final loss "
              f"{stored[job.label][-1]['train_loss']}", flush=True)
    if args.write or args.machine:
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(stored, indent=1) + "\n")
        print(f"stored in {target}")


if __name__ == "__main__":
    main()
