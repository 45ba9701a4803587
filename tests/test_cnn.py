"""Convolutional stages: the model.cnn builder, its checks, spec §3's properties on conv stages
against dense Hessians (per-sample curvature over a sample's whole feature map), SM = GD,
and engine parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from sm_dist.config.build import build_stage_modules
from sm_dist.config.job import ConfigError, job_from_dict, load_job
from sm_dist.models.build import split_stages
from sm_dist.models.cnn import build_cnn, cnn_shapes
from tests.conftest import REPO
from tests.helpers_math import DTYPE, randn, seeded
from tests.helpers_stages import (
    check_bound,
    check_cg,
    check_gauss_newton,
    check_local_gradients,
    check_local_loss_matches_dense,
    check_power_iteration,
    check_stage_function_matches_dense,
)
from tests.test_engine import assert_same_training, train_both
from tests.test_math_training import iterate_directly


def tiny_images() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A data.factory: 12 + 6 random 1x8x8 images of 3 classes (float64, seeded)."""
    gen = seeded(5)
    return (randn(12, 1, 8, 8, gen=gen), torch.randint(3, (12,), generator=gen),
            randn(6, 1, 8, 8, gen=gen), torch.randint(3, (6,), generator=gen))


def cnn_job(**optimizer: Any) -> dict[str, Any]:
    """4 stages: three conv blocks (8 → 4 → 2 → 1) and the head, on tiny_images."""
    return {
        "name": "tiny-cnn",
        "model": {"cnn": {"input": [1, 8, 8], "channels": [2, 3, 2], "classes": 3,
                          "activation": "tanh"}, "balance": [1, 1, 1, 1]},
        "data": {"factory": "tests.test_cnn:tiny_images", "microbatches": 3},
        "optimizer": {"name": "sm", "inner_steps": 3, **optimizer},
        "run": {"iterations": 3, "eval_every": 2, "dtype": "float64", "threads": 1,
                "rpc_timeout": 60},
    }


def conv_stage(activation: str, in_channels: int = 1, pool: int = 2,
               pooling: str = "max", seed: int = 0) -> nn.Module:
    """One conv block 2 channels, 3x3, padding 1 (the first layer of a tiny CNN), float64."""
    torch.manual_seed(seed)
    model = build_cnn([in_channels, 4, 4], [2], classes=3, pool=pool, pooling=pooling,
                      activation=activation)
    return model[0].to(DTYPE)


def images(n: int, channels: int = 1, seed: int = 10) -> Tensor:
    return randn(n, channels, 4, 4, gen=seeded(seed))


# ------------------------------------------------------------------------------ builder
def test_build_cnn_layers_and_shapes() -> None:
    model = build_cnn([1, 28, 28], [8, 16, 16], classes=10)
    assert len(model) == 4  # one layer per block, then the head
    assert [type(m) for m in model[0]] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert isinstance(model[3][0], nn.Flatten) and model[3][1].in_features == 16 * 3 * 3
    assert cnn_shapes([1, 28, 28], [8, 16, 16], 3, 1, 2) == [(8, 14, 14), (16, 7, 7),
                                                            (16, 3, 3)]
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    gelu = build_cnn([3, 9, 9], [4], classes=2, kernel=5, padding=0, pool=1, pooling="avg",
                     activation="gelu", bias=False)
    assert [type(m) for m in gelu[0]] == [nn.Conv2d, nn.GELU]
    assert gelu[0][0].bias is None and gelu[1][1].in_features == 4 * 5 * 5
    assert len(split_stages(model, [2, 1, 1])) == 3


def test_cnn_shapes_name_the_block_that_vanishes() -> None:
    with pytest.raises(ValueError, match="block 4.s 1x1 map is smaller than its 2x2 pooling"):
        cnn_shapes([1, 28, 28], [4, 4, 4, 4, 4], 3, 1, 2)
    with pytest.raises(ValueError, match="block 1 gets a 2x2 map, smaller than its 5x5"):
        cnn_shapes([1, 6, 6], [4, 4], 5, 0, 1)


FASHION_CNN: dict[str, Any] = {
    "name": "c", "model": {"cnn": {"channels": [4, 8, 8]}, "balance": [1, 1, 1, 1]},
    "data": {"dataset": "fashion_mnist", "flatten": False, "train_subset": 100},
}


def errors_of(raw: dict[str, Any], overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        job_from_dict(raw, overrides)
    return info.value.errors


def test_cnn_job_checks_say_the_key_and_the_fix() -> None:
    job = job_from_dict(FASHION_CNN)
    assert job.model.cnn is not None and job.model.cnn.input == [1, 28, 28]
    assert errors_of(FASHION_CNN, ("data.flatten=true",)) == [
        "data.flatten: true, but model.cnn needs fashion_mnist images of shape (1, 28, 28), "
        "not vectors of 784; set data.flatten: false"]
    (error,) = errors_of(FASHION_CNN, ("model.cnn.input=[1, 32, 32]",))
    assert error.startswith("model.cnn.input: [1, 32, 32] does not match the fashion_mnist")
    assert error.endswith("set model.cnn.input to [1, 28, 28]")
    (error,) = errors_of(FASHION_CNN, ("model.cnn.classes=5",))
    assert error.startswith("model.cnn.classes: 5 does not match the 10 fashion_mnist classes")
    (error,) = errors_of(FASHION_CNN, ("model.cnn.channels=[4, 4, 4, 4, 4]",
                                       "model.balance=[2, 2, 2]"))
    assert error.startswith("model.cnn.channels: the 28x28 input cannot pass every block: "
                            "block 4's 1x1 map")
    (error,) = errors_of(FASHION_CNN, ("model.balance=[1, 1, 1]",))
    assert error == ("model.balance: balance [1, 1, 1] covers 3 layers but model.cnn.channels "
                     "(one layer per block, then the head) defines 4; make the entries sum to 4")
    (error,) = errors_of(FASHION_CNN, ("data.dataset=synthetic",))
    assert error.startswith("model.cnn: data.dataset synthetic gives vectors, not images")
    (error,) = errors_of(FASHION_CNN, ("model.mlp={widths: [784, 10]}",))
    assert error.startswith("model: both of model.mlp and model.cnn given; give exactly one of "
                            "model.mlp, model.cnn, model.transformer and model.factory")
    raw = {**FASHION_CNN, "model": {"balance": [1]}}
    (error,) = errors_of(raw)
    assert error.startswith("model: none of model.mlp, model.cnn, model.transformer and "
                            "model.factory given")


@pytest.mark.parametrize("name", ["cnn-sm", "cnn-adam"])
def test_fashion_cnn_configs_are_valid(name: str) -> None:
    job = load_job(REPO / "configs" / "fashion" / f"{name}.yaml")
    assert job.model.cnn is not None and len(job.model.balance) == 4
    assert not job.data.flatten and job.data.train_subset == 2000


# ------------------------------------------------------------- spec §3 on conv stages
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_conv_stage_function_and_local_loss_match_dense(activation: str, pooling: str) -> None:
    """Property 2 on a conv block with an input (2 channels in) and on a first block."""
    middle = conv_stage(activation, in_channels=2, pooling=pooling)
    hzz = check_stage_function_matches_dense(middle, images(3, channels=2), seed=1)
    assert hzz.shape == (3 * 32, 3 * 32)  # a sample's block spans its whole 2x4x4 input
    check_local_loss_matches_dense(middle, images(3, channels=2), seed=2)
    first = conv_stage(activation, pooling=pooling, seed=1)
    x = images(3).requires_grad_(False)
    check_local_loss_matches_dense(first, x, seed=3)


def test_conv_head_local_loss_matches_dense() -> None:
    torch.manual_seed(0)
    head = build_cnn([2, 2, 2], [], classes=3)[0].to(DTYPE)  # Flatten + Linear
    check_local_loss_matches_dense(head, randn(4, 2, 2, 2, gen=seeded(4)), seed=4)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_relu_conv_stage_theta_hessian_is_gauss_newton(pooling: str) -> None:
    """Property 3: conv, ReLU and pooling are piecewise linear in θ."""
    check_gauss_newton(conv_stage("relu", in_channels=2, pooling=pooling), images(4, 2), seed=5)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_power_iteration_on_a_whole_feature_map(activation: str) -> None:
    """Property 4: λ per sample is the dominant eigenvalue of the sample's whole C×H×W
    block, which couples its pixels and channels (a per-pixel bound would be wrong)."""
    blocks = check_power_iteration(conv_stage(activation, in_channels=2, seed=2),
                                   images(4, 2, seed=3), seed=6, rounds=300)
    pixel = blocks.reshape(4, 2, 16, 2, 16)
    off_pixel = pixel.clone()
    for p in range(16):
        off_pixel[:, :, p, :, p] = 0.0
    assert float(off_pixel.abs().max()) > 1e-6 * float(blocks.abs().max())


def test_cg_on_a_positive_definite_conv_model() -> None:
    """Property 6 on a ReLU conv block (Gauss-Newton H_θθ plus the coupling: positive definite)."""
    check_cg(conv_stage("relu", in_channels=2, seed=3), images(6, 2, seed=4), seed=7,
             positive_definite=True)


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cnn_local_hessians_dominate_network_hessian(activation: str, seed: int) -> None:
    """Property 5 (second-order form) on a 3-stage smooth CNN: two conv blocks and the head."""
    torch.manual_seed(seed)
    model = build_cnn([1, 4, 4], [2, 2], classes=3, pooling="avg",
                      activation=activation).to(DTYPE)
    gen = seeded(seed + 20)
    x = 2.0 * randn(5, 1, 4, 4, gen=gen)
    y = torch.randint(3, (5,), generator=gen)
    check_bound(split_stages(model, [1, 1, 1]), x, y)


@pytest.mark.parametrize("microbatches", [1, 3])
def test_cnn_local_gradients_are_network_gradients(microbatches: int) -> None:
    """Property 1 on a 4-stage CNN pipeline."""
    raw = cnn_job()
    raw["data"]["microbatches"] = microbatches
    check_local_gradients(job_from_dict(raw))


def test_sm_one_fixed_step_is_gradient_descent_on_a_cnn() -> None:
    """Property 7: N = 1, gradient inner solver, inner_lr = α equals GD with α, iterate by
    iterate, on a 4-stage ReLU CNN."""
    sm_raw = cnn_job(inner_solver="gradient", inner_steps=1, inner_lr=0.2)
    gd_raw = cnn_job()
    gd_raw["optimizer"] = {"name": "gd", "lr": 0.2}
    for raw in (sm_raw, gd_raw):
        raw["model"]["cnn"]["activation"] = "relu"
    sm_losses, sm_iterates = iterate_directly(job_from_dict(sm_raw), 3)
    gd_losses, gd_iterates = iterate_directly(job_from_dict(gd_raw), 3)
    initial = torch.cat([p.detach().reshape(-1) for m in build_stage_modules(
        job_from_dict(sm_raw)) for p in m.parameters()])
    assert float((sm_iterates[0] - initial).norm()) > 1e-3
    for a, b in zip(sm_iterates, gd_iterates):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert sm_losses == pytest.approx(gd_losses, rel=1e-12)
    assert sm_losses[-1] < sm_losses[0]


# ------------------------------------------------------------------------ engine parity
def test_cnn_engine_parity_with_single_process(tmp_path: Path) -> None:
    """Property 8: a 4-stage CNN under SM, one process per stage, equals --single-process."""
    assert_same_training(*train_both(tmp_path, cnn_job()))
