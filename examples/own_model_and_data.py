"""Train your own nn.Sequential on your own tensors with SM, from Python.

    .venv/bin/python examples/own_model_and_data.py            # one process per stage
    .venv/bin/python examples/own_model_and_data.py --single-process

The data is a made-up task (the sign pattern of two features picks one of four classes);
replace it with your tensors, or with torch Datasets."""

from __future__ import annotations

import argparse

import torch
from torch import nn

import sm_dist


def make_data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with 10 features and labels 0-3 from the signs of the first two."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 10, generator=generator)
    y = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single-process", action="store_true")
    parser.add_argument("--out", default=None, help="run directory (default: runs/...)")
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()

    train_x, train_y = make_data(512, seed=1)
    test_x, test_y = make_data(256, seed=2)
    model = nn.Sequential(            # top-level children are what model.balance splits
        nn.Linear(10, 32), nn.Tanh(),
        nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, 4),
    )
    job = {
        "name": "own-model",
        "model": {"balance": [2, 2, 1]},   # 3 stages: 2 + 2 + 1 children
        "data": {"microbatches": 4},
        "optimizer": {"name": "sm_adaptive", "inner_steps": 10},
        "run": {"iterations": args.iterations, "eval_every": 10, "dtype": "float32",
                "threads": 1},
    }
    result = sm_dist.train(job, model=model, data=(train_x, train_y, test_x, test_y),
                           out=args.out, single_process=args.single_process)
    print(f"final training loss {result.summary['final_train_loss']:.3g}, test accuracy "
          f"{result.summary['final_test_acc']:.1%}, {len(result.records)} iterations in "
          f"{result.path}")
    trained = result.load_model().eval()
    with torch.no_grad():
        accuracy = (trained(test_x).argmax(1) == test_y).float().mean().item()
    print(f"the trained model, loaded back: test accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
