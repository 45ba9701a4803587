"""Where the pipeline idles: GPipe+GD against SM with fixed N and SM filling the bubbles.

Runs one job three times on the engine, side by side in one session, and prints, per stage,
the busy fraction, the idle time between its last forward and first backward (GPipe's
turnaround, which no update schedule can remove), and the idle time between its last backward
and its next forward (the bubbles around the update phase that SM fills), each as a share of
the iteration; plus the inner steps SM took per stage. Means over the middle iterations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "gpipe+gd": ["optimizer.name=gd", "optimizer.lr=0.1"],
    "sm fixed N": ["optimizer.name=sm"],
    "sm fill_bubbles": ["optimizer.name=sm"],
}


def run(job: str, overrides: list[str], out: Path) -> list[dict]:
    args = [sys.executable, "-m", "sm_dist", "train", job, "--no-live", "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def mean_lists(rows: list[list[float]]) -> list[float]:
    return [statistics.fmean(column) for column in zip(*rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("job", nargs="?", default="configs/fashion/mlp4-sm.yaml")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--inner-steps", type=int, default=10, help="N, and the fill minimum")
    parser.add_argument("--fill-max", type=int, default=400)
    args = parser.parse_args()
    n = args.inner_steps
    common = [f"run.iterations={args.iterations}", "run.eval_every=0"]
    extra = {"sm fixed N": [f"optimizer.inner_steps={n}"],
             "sm fill_bubbles": [f"optimizer.inner_steps={{min: {n}, max: {args.fill_max}, "
                                 "fill_bubbles: true}"]}
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run(args.job, common + overrides + extra.get(mode, []),
                             Path(tmp) / mode.replace(" ", "_").replace("+", "_"))
                   for mode, overrides in MODES.items()}
    print(f"job {args.job}, {args.iterations} iterations; means over iterations 2.."
          f"{args.iterations - 1} (the first warms up, the last has no next input)")
    for mode, records in results.items():
        middle = records[1:-1]
        stages = len(middle[0]["busy_fraction"])
        busy = mean_lists([r["busy_fraction"] for r in middle])
        turnaround = mean_lists([r["turnaround_idle"] for r in middle])
        update = mean_lists([r["update_idle"] for r in middle])
        time = statistics.fmean(r["iteration_time"] for r in middle)
        bubble = statistics.fmean(r["bubble_fraction"] for r in middle)
        print(f"\n{mode}: iteration {time * 1e3:.0f} ms, bubble fraction {bubble:.1%}"
              + (f" (GPipe theory (p-1)/(M+p-1) for M=4: {(stages - 1) / (4 + stages - 1):.0%})"
                 if mode == "gpipe+gd" else ""))
        print("  stage        " + " ".join(f"{s:>7}" for s in range(stages)))
        print("  busy         " + " ".join(f"{b:7.1%}" for b in busy))
        print("  F->B idle    " + " ".join(f"{t:7.1%}" for t in turnaround))
        print("  B->F idle    " + " ".join(f"{u:7.1%}" for u in update))
        if "inner_steps" in middle[0].get("optimizer", {}):
            steps = mean_lists([r["optimizer"]["inner_steps"] for r in middle])
            print("  inner steps  " + " ".join(f"{s:7.1f}" for s in steps))
    fixed, fill = results["sm fixed N"][1:-1], results["sm fill_bubbles"][1:-1]
    gained = [f - n for f in mean_lists([r["optimizer"]["inner_steps"] for r in fill])]
    ratio = (statistics.fmean(r["iteration_time"] for r in fill)
             / statistics.fmean(r["iteration_time"] for r in fixed))
    print(f"\nfill_bubbles: extra inner steps per stage per iteration "
          f"{[round(g, 1) for g in gained]} at {ratio:.2f}x the fixed-N iteration time")


if __name__ == "__main__":
    main()
