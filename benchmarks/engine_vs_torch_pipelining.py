"""Time per iteration of sm-dist's engine (GPipe + SGD) against torch's ScheduleGPipe."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from sm_dist.config.build import build_stage_modules, load_job_data
from sm_dist.config.job import job_from_dict

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 1024, 1024, 1024, 10])
    parser.add_argument("--balance", type=int, nargs="+", default=[1, 1, 1, 1],
                        help="layers per stage; one process per stage on both sides")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: GPUs shared round-robin by the stage processes")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep our engine's run directory here (default: a temp dir)")
    return parser.parse_args()


def job_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The job both sides run; our engine gets one extra iteration (the last one evaluates)."""
    return {
        "name": "bench-gpipe-sgd",
        "model": {"mlp": {"widths": args.widths, "activation": "relu"},
                  "balance": args.balance},
        "data": {"dataset": "synthetic", "batch": args.batch,
                 "microbatches": args.microbatches, "shuffle": False,
                 "synthetic": {"features": args.widths[0], "classes": args.widths[-1],
                               "train_size": args.batch, "test_size": 64, "seed": 0}},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": args.lr, "momentum": 0.0},
        "run": {"iterations": args.warmup + args.iterations + 1, "seed": 0, "dtype": "float32",
                "device": args.device, "eval_every": 0, "threads": args.threads},
    }


# ------------------------------------------------------------------------------ our engine
def run_engine(raw: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`python -m sm_dist train` as a subprocess; per-iteration times from metrics.jsonl."""
    job_path = work / "job.yaml"
    job_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = args.keep if args.keep is not None else work / "run"
    cmd = [sys.executable, "-m", "sm_dist", "train", str(job_path), "--out", str(out),
           "--no-live"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"our engine failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # iteration_time is the timeline window: this iteration's first action (stage 0's F0) to
    # the next iteration's first action. The last iteration has no next one and evaluates.
    timed = [r for r in records if args.warmup < r["iteration"] <= args.warmup + args.iterations]
    assert len(timed) == args.iterations, f"expected {args.iterations} timed records"
    return {"times": [r["iteration_time"] for r in timed],
            "bubble": [r["bubble_fraction"] for r in timed],
            "busy": [r["busy_fraction"] for r in timed],
            "loss_first": records[0]["train_loss"], "loss_last": timed[-1]["train_loss"],
            "wall": wall, "out": out}


def engine_breakdown(out: Path, first: int, last: int) -> list[str]:
    """Per stage, from trace.json: mean ms per action kind over the timed iterations, and the
    busy ms per iteration (compare with the iteration time: the rest is waiting)."""
    trace = json.loads((out / "trace.json").read_text())["traceEvents"]
    per: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for ev in trace:
        if ev.get("ph") == "X" and first <= ev["args"]["iteration"] <= last:
            per[ev["tid"]][ev["name"][0]].append(ev["dur"] / 1e3)
    iterations = last - first + 1
    lines = []
    for stage in sorted(per):
        kinds = per[stage]
        parts = [f"{k} {statistics.mean(v):6.1f} ms x{len(v) // iterations}"
                 for k, v in sorted(kinds.items())]
        busy = sum(sum(v) for v in kinds.values()) / iterations
        lines.append(f"  stage {stage}: " + ", ".join(parts) + f"; busy {busy:6.1f} ms/iter")
    return lines


# ---------------------------------------------------------------------------- torch side
def torch_rank(raw: dict[str, Any], warmup: int, iterations: int) -> dict[str, Any]:
    """One stage of torch.distributed.pipelining's ScheduleGPipe (runs in its own process)."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    job = job_from_dict(raw)
    torch.set_num_threads(job.run.threads)
    cuda = job.run.device == "cuda"
    device = (torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
              if cuda else torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    module = build_stage_modules(job)[rank].to(device)  # same seed, same split as our engine
    data = load_job_data(job)
    x, y = data.train_x.to(device), data.train_y.to(device)
    stage = PipelineStage(module, rank, world, device)
    schedule = ScheduleGPipe(stage, job.data.microbatches, loss_fn=F.cross_entropy)
    optimizer = torch.optim.SGD(module.parameters(), lr=job.optimizer.lr, momentum=0.0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses: list[float] = []
    stamps = []
    for _ in range(warmup + iterations):
        stamps.append(time.perf_counter())
        mb_losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y, losses=mb_losses, return_outputs=False)
        else:
            schedule.step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if mb_losses:
            losses.append(float(sum(t.item() for t in mb_losses)) / len(mb_losses))
    stamps.append(time.perf_counter())
    dist.barrier()
    dist.destroy_process_group()
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"times": times[warmup:], "losses": losses}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torch(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One process per stage through torch's launcher API (as our engine starts its own)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=len(args.balance),
        run_id=f"bench-{uuid.uuid4()}", rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0, monitor_interval=0.2,
        start_method="spawn")
    start = time.perf_counter()
    results = elastic_launch(config, torch_rank)(raw, args.warmup, args.iterations)
    wall = time.perf_counter() - start
    last = results[len(args.balance) - 1]["losses"]
    return {"times": results[0]["times"], "wall": wall, "loss_first": last[0],
            "loss_last": last[-1],
            "rank_medians": [statistics.median(results[r]["times"]) for r in sorted(results)]}


# --------------------------------------------------------------------------------- report
def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:9.1f} {statistics.mean(values) * 1e3:9.1f}"


def main() -> int:
    args = parse_args()
    if sum(args.balance) != len(args.widths) - 1:
        sys.exit(f"balance {args.balance} must sum to {len(args.widths) - 1} layers")
    raw = job_dict(args)
    job_from_dict(raw)  # fail here, not in a child process, if the settings are invalid
    load = os.getloadavg()[0]  # before any of ours: other work on the machine
    with tempfile.TemporaryDirectory(prefix="sm-bench-") as tmp:
        ours = run_engine(raw, args, Path(tmp))
        breakdown = engine_breakdown(ours["out"], args.warmup + 1,
                                     args.warmup + args.iterations)
    theirs = run_torch(raw, args)

    stages = len(args.balance)
    print("engine vs torch.distributed.pipelining.ScheduleGPipe: GPipe + SGD (momentum 0)")
    print(f"  model: MLP widths {args.widths}, balance {args.balance} ({stages} processes, "
          f"one stage each), float32, {args.device}, {args.threads} torch thread(s)/process")
    print(f"  batch {args.batch} in {args.microbatches} microbatches, synthetic data; "
          f"{args.warmup} warm-up + {args.iterations} timed iterations; "
          f"{os.cpu_count()} CPU cores here")
    print()
    print(f"  {'per iteration (ms)':<34}{'median':>9} {'mean':>9}")
    print(f"  {'ours (sm-dist engine)':<34}{ms(ours['times'])}")
    print(f"  {'theirs (ScheduleGPipe, rank 0)':<34}{ms(theirs['times'])}")
    ratio_med = statistics.median(ours["times"]) / statistics.median(theirs["times"])
    ratio_mean = statistics.mean(ours["times"]) / statistics.mean(theirs["times"])
    print(f"  ratio ours / theirs:  median {ratio_med:.3f}   mean {ratio_mean:.3f}   "
          f"(target <= 1.5, ideally 1.1)")
    print()
    busy = [statistics.mean(r[s] for r in ours["busy"]) for s in range(stages)]
    print(f"  ours: mean bubble_fraction {statistics.mean(ours['bubble']):.3f}; busy fraction "
          "per stage " + " ".join(f"{b:.2f}" for b in busy))
    print("  ours, per action (trace.json, timed iterations):")
    print("\n".join(breakdown))
    print("  theirs: median per rank (ms) " +
          " ".join(f"{t * 1e3:.1f}" for t in theirs["rank_medians"]))
    print(f"  train loss, first iteration: ours {ours['loss_first']:.5f}, "
          f"theirs {theirs['loss_first']:.5f}; last timed: ours {ours['loss_last']:.5f}, "
          f"theirs {theirs['loss_last']:.5f}")
    print(f"  wall time incl. start-up: ours {ours['wall']:.1f} s, theirs {theirs['wall']:.1f} s")
    print(f"  1-min load average at start: {load:.1f}"
          + (" (other work was running: timings may be noisy; rerun on a quiet machine)"
             if load >= 1.0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
