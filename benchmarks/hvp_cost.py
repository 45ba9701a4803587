"""Cost of one local-loss product 𝓗v relative to one forward+backward of the same stage."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from sm_dist.math.local_loss import LocalLoss, flatten
from sm_dist.math.stage_function import StageFunction


def median_time(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):  # warm-up
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    stage = nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU()).to(device)
    x = torch.randn(args.batch, args.width, device=device)
    g = torch.randn(args.batch, args.width, device=device) / args.batch
    c = torch.full((args.batch,), 0.5 / args.batch, device=device)
    delta = torch.full((args.batch,), 0.1 / args.batch, device=device)

    def forward_backward() -> None:
        z = x.detach().requires_grad_(True)
        stage(z).backward(g)
        sync()

    def build() -> StageFunction:
        z = x.detach().requires_grad_(True)
        return StageFunction(z, stage(z), list(stage.parameters()), g, c)

    fn = build()
    grad = flatten(fn.gradients()[1])
    inner = LocalLoss([(fn, delta)], grad, rho=0.0)  # a stage s >= 2: H_θθ + H_θz Δ⁻¹ H_zθ
    first = LocalLoss([(StageFunction(x, stage(x), list(stage.parameters()), g, c), None)],
                      grad, rho=0.0)  # stage 1: H_θθ only
    v = torch.randn_like(grad)
    u = torch.randn_like(x)

    timings = {
        "forward+backward": median_time(forward_backward, args.repeats),
        "Hv (stage s>=2)": median_time(lambda: (inner.hvp(v), sync()), args.repeats),
        "Hv (stage 1)": median_time(lambda: (first.hvp(v), sync()), args.repeats),
        "H_zz u (power round)": median_time(lambda: (fn.hvp_zz(u), sync()), args.repeats),
        "build Psi (once/iter)": median_time(lambda: (build(), sync()), args.repeats),
    }
    base = timings["forward+backward"]
    print(f"stage Linear({args.width}, {args.width})+ReLU, microbatch {args.batch}, float32, "
          f"{args.device}, {args.threads} thread(s), median of {args.repeats}")
    for name, seconds in timings.items():
        print(f"  {name:<24} {seconds * 1e3:8.3f} ms   ratio {seconds / base:5.2f}")
    print(f"Hv / (forward+backward) = {timings['Hv (stage s>=2)'] / base:.2f}")


if __name__ == "__main__":
    main()
