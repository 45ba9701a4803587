"""What the live monitor costs: the same job with the live view and with plain lines, side by side.

Both runs use fixed inner steps, so they do identical work; the live view is forced onto a
terminal-like output (`--live`) and thrown away. Prints the median iteration time of each and
their ratio (1.00 = free). Runs alternate, `--repeats` times each, to spread the machine's noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def iteration_times(job: str, flag: str, out: Path, overrides: list[str]) -> list[float]:
    args = [sys.executable, "-m", "sm_dist", "train", job, flag, "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration_time"] for r in records[1:-1]]  # skip warm-up and the last iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("job", nargs="?", default="configs/fashion/mlp4-sm.yaml")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    overrides = [f"run.iterations={args.iterations}", "run.eval_every=0",
                 "optimizer.inner_steps=10"]
    times: dict[str, list[float]] = {"--live": [], "--no-live": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for flag in times:
                out = Path(tmp) / f"{flag.strip('-')}-{repeat}"
                times[flag] += iteration_times(args.job, flag, out, overrides)
    live, plain = statistics.median(times["--live"]), statistics.median(times["--no-live"])
    print(f"job {args.job}: {args.iterations} iterations x {args.repeats} runs per mode")
    print(f"  live monitor   median iteration {live * 1e3:8.1f} ms")
    print(f"  plain lines    median iteration {plain * 1e3:8.1f} ms")
    print(f"  live / plain = {live / plain:.3f}")


if __name__ == "__main__":
    main()
