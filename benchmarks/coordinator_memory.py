"""The coordinator's memory over a long run: the resident memory of rank 0 (the coordinator and
stage 0) at iteration 1,000 and at iteration 10,000 of a tiny engine job. Flat within noise
means nothing grows with the run (records, timeline events, batch-stream states)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def rank0(out: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out) in cmdline and b"RANK=0" in environ:
            return int(entry.name)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--at", type=int, nargs="+", default=[1_000, 10_000])
    args = parser.parse_args()
    job = {"name": "memory", "model": {"mlp": {"widths": [6, 5, 4, 3]}, "balance": [1, 1, 1]},
           "data": {"dataset": "synthetic", "microbatches": 2,
                    "synthetic": {"features": 6, "classes": 3, "train_size": 24,
                                  "test_size": 12}},
           "optimizer": {"name": "sm", "inner_steps": 2},
           "run": {"iterations": args.iterations, "eval_every": 0, "threads": 1,
                   "checkpoint_every": 500}}
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "job.yaml", Path(tmp) / "run"
        path.write_text(yaml.safe_dump(job))
        proc = subprocess.Popen([sys.executable, "-m", "sm_dist", "train", str(path),
                                 "--no-live", "--out", str(out)], cwd=REPO,
                                stdout=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(REPO),
                                     "OMP_NUM_THREADS": "1"})
        samples: dict[int, float] = {}
        metrics = out / "metrics.jsonl"
        pid = None
        while proc.poll() is None and len(samples) < len(args.at):
            done = sum(1 for _ in metrics.open()) if metrics.exists() else 0
            pid = pid or rank0(out)
            for k in args.at:
                if k not in samples and done >= k and pid is not None:
                    samples[k] = rss_mb(pid)
            time.sleep(0.05)
        proc.wait()
    print(f"coordinator (rank 0) resident memory, tiny 3-stage SM job, {args.iterations} "
          "iterations:")
    for k, mb in samples.items():
        print(f"  at iteration {k:>6}: {mb:8.1f} MB")
    first, last = samples[args.at[0]], samples[args.at[-1]]
    per_iteration = (last - first) / (args.at[-1] - args.at[0]) * 1024
    print(f"  growth {last - first:+.1f} MB ({per_iteration:.2f} KB per iteration)")


if __name__ == "__main__":
    main()
