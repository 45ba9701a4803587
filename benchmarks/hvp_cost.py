"""Cost of one local-loss product 𝓗v relative to one forward+backward of the same stage."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from sm_dist.math.local_loss import LocalLoss, flatten
from sm_dist.math.stage_function import StageFunction, affine_in_parameters


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int,
                      calls: int = 10) -> dict[str, list[float]]:
    """Per round, each function's mean time over `calls` calls in a row (as the inner loop
    and the pipeline call them, on warm caches); the rounds alternate the functions, so that
    a slow spell of a shared machine falls on all of them and each round gives one ratio."""
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
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

    affine = affine_in_parameters(stage)  # as the optimizers decide it: True here

    def build(affine_in_params: bool = affine) -> StageFunction:
        z = x.detach().requires_grad_(True)
        return StageFunction(z, stage(z), list(stage.parameters()), g, c,
                             affine_in_params=affine_in_params)

    fn = build()
    grad = flatten(fn.gradients()[1])
    inner = LocalLoss([(fn, delta)], grad, rho=0.0)  # a stage s >= 2: H_θθ + H_θz Δ⁻¹ H_zθ
    # The general form, which stages that are not affine in θ use (two separate products).
    general = LocalLoss([(build(affine_in_params=False), delta)], grad, rho=0.0)
    first = LocalLoss([(StageFunction(x, stage(x), list(stage.parameters()), g, c), None)],
                      grad, rho=0.0)  # stage 1: H_θθ only
    v = torch.randn_like(grad)
    u = torch.randn_like(x)

    samples = interleaved_times({
        "forward+backward": forward_backward,
        "Hv (stage s>=2)": lambda: (inner.hvp(v), sync()),
        "Hv (general form)": lambda: (general.hvp(v), sync()),
        "Hv (stage 1)": lambda: (first.hvp(v), sync()),
        "H_zz u (power round)": lambda: (fn.hvp_zz(u), sync()),
        "build Psi (once/iter)": lambda: (build(), sync()),
    }, args.rounds)
    base = samples["forward+backward"]
    print(f"stage Linear({args.width}, {args.width})+ReLU (affine in its parameters: {affine}), "
          f"microbatch {args.batch}, float32, "
          f"{args.device}, {args.threads} thread(s), {args.rounds} rounds of 10 calls "
          f"each: medians of the mean times and of each round's ratio to its forward+backward")
    ratios = {}
    for name, times in samples.items():
        ratios[name] = statistics.median(t / b for t, b in zip(times, base))
        print(f"  {name:<24} {statistics.median(times) * 1e3:8.3f} ms   ratio {ratios[name]:5.2f}")
    print(f"Hv / (forward+backward) = {ratios['Hv (stage s>=2)']:.2f}")

if __name__ == "__main__":
    main()
