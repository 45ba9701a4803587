"""Transformer stages: the model.transformer builder, the sequence loss and its curvature bound,
spec §3's properties on a tiny transformer against dense Hessians, SM = GD, engine parity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sm_dist.config.job import ConfigError, job_from_dict, load_job
from sm_dist.math.losses import evaluate_loss, get_loss, top_of_pipeline
from sm_dist.models.build import split_stages
from sm_dist.models.transformer import Block, build_transformer, causal_attention
from tests.conftest import REPO
from tests.helpers_math import DTYPE, randn, seeded
from tests.helpers_stages import (
    check_bound,
    check_cg,
    check_local_gradients,
    check_local_loss_matches_dense,
    check_power_iteration,
    check_stage_function_matches_dense,
)
from tests.test_engine import assert_same_training, train_both
from tests.test_math_training import iterate_directly


def tiny_transformer(seed: int, activation: str = "gelu", blocks: int = 1,
                     vocab: int = 5) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return build_transformer(vocab=vocab, context=3, width=4, blocks=blocks, heads=2,
                             mlp_ratio=2, activation=activation).to(DTYPE)


def block(seed: int, activation: str = "gelu") -> Block:
    module = tiny_transformer(seed, activation)[1]
    assert isinstance(module, Block)
    return module


def activations(n: int, seed: int) -> Tensor:
    """(n, T, width) inputs of a block: samples, then their tokens, then features."""
    return randn(n, 3, 4, gen=seeded(seed))


def text_job(**optimizer: Any) -> dict[str, Any]:
    """4 stages (embedding + block, block, block, head) on the default corpus' first bytes."""
    return {
        "name": "tiny-text",
        "model": {"transformer": {"context": 6, "width": 8, "blocks": 3, "heads": 2,
                                  "mlp_ratio": 2}, "balance": [2, 1, 1, 1]},
        "data": {"dataset": "text", "context": 6, "text_bytes": 4000, "train_subset": 9,
                 "test_subset": 3, "microbatches": 3},
        "optimizer": {"name": "sm", "inner_steps": 3, **optimizer},
        "run": {"iterations": 3, "eval_every": 2, "dtype": "float64", "threads": 1,
                "rpc_timeout": 60},
    }


# ------------------------------------------------------------------------------ builder
def test_transformer_layers_shapes_and_causality() -> None:
    model = tiny_transformer(0, blocks=2)
    assert len(model) == 4  # embedding, two blocks, head
    tokens = torch.randint(5, (2, 3), generator=seeded(1))
    out = model(tokens)
    assert out.shape == (2, 3, 5) and out.dtype == DTYPE
    changed = tokens.clone()
    changed[:, 1] = (changed[:, 1] + 1) % 5
    delta = (model(changed) - out).abs().amax(dim=(0, 2))
    assert float(delta[0]) == 0.0 and float(delta[1]) > 0 and float(delta[2]) > 0
    with pytest.raises(ValueError, match="exceed the model's context of 3"):
        model(torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple of the 3 heads"):
        build_transformer(vocab=5, context=3, width=4, blocks=1, heads=3)
    assert [len(s) for s in split_stages(model, [2, 2])] == [2, 2]


def test_attention_is_sdpa_and_differentiates_twice() -> None:
    """The written-out attention equals torch's causal SDPA, and has the double backward that
    SDPA's CPU flash kernel lacks (SM's products need it)."""
    gen = seeded(2)
    q, k, v = (randn(2, 2, 5, 3, gen=gen).requires_grad_(True) for _ in range(3))
    ours = causal_attention(q, k, v)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(ours.square().sum(), q, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), q)
    assert float(second.abs().max()) > 0
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    (grad,) = torch.autograd.grad(fused.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(grad.square().sum(), q)


TEXT_MODEL: dict[str, Any] = {
    "name": "t", "model": {"transformer": {"width": 32, "heads": 4}, "balance": [2, 2, 2]},
    "data": {"dataset": "text", "train_subset": 100},
}


def test_transformer_job_checks_say_the_key_and_the_fix() -> None:
    job = job_from_dict(TEXT_MODEL)
    assert job.model.transformer is not None and job.model.transformer.blocks == 4
    with pytest.raises(ConfigError) as info:
        job_from_dict(TEXT_MODEL, ["model.transformer.heads=3", "model.transformer.vocab=128",
                                   "data.context=128"])
    assert info.value.errors == [
        "model.transformer.heads: the width 32 is not a multiple of 3 heads; choose heads "
        "that divide model.transformer.width",
        "model.transformer.vocab: 128 does not match the 256 byte values of data.dataset "
        "text; set model.transformer.vocab to 256",
        "model.transformer.context: 64 positions are fewer than the 128 tokens of a sample "
        "(data.context); set model.transformer.context to at least 128"]
    with pytest.raises(ConfigError) as info:
        job_from_dict(TEXT_MODEL, ["data.dataset=mnist", "model.balance=[1, 1]"])
    assert info.value.errors == [
        "model.balance: balance [1, 1] covers 2 layers but model.transformer.blocks (the "
        "embedding, the blocks, the head) defines 6; make the entries sum to 6",
        "model.transformer: data.dataset mnist gives no token sequences; use data.dataset: "
        "text (or a data.factory giving tokens)"]


@pytest.mark.parametrize("name", ["transformer-sm", "transformer-adam"])
def test_text_configs_are_valid(name: str) -> None:
    job = load_job(REPO / "configs" / "text" / f"{name}.yaml")
    t = job.model.transformer
    assert t is not None and (t.blocks, t.width, job.data.context) == (4, 128, 64)
    assert len(job.model.balance) == 4 and job.data.dataset == "text"


# -------------------------------------------------------------- the sequence loss (top)
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_sequence_cross_entropy_curvature_bounds_the_dense_hessian(scale: float) -> None:
    """ℓ_i = (1/T) Σ_t CE(z_it, y_it): one sample's Hessian is block diagonal over its tokens,
    each block (diag p − ppᵀ)/T, so λ_max ≤ 1/(2T), and c = 1/(2Tn) for h = Σ ℓ_i / n."""
    n, length, vocab = 6, 4, 7
    gen = seeded(int(scale * 10))
    z = scale * randn(n, length, vocab, gen=gen)
    y = torch.randint(vocab, (n, length), generator=gen)
    spec = get_loss("cross_entropy")
    assert spec.smoothness((length, vocab)) == 0.5 / length
    top = top_of_pipeline(spec, z, y, n)
    torch.testing.assert_close(top.curvature, torch.full((n,), 0.5 / (length * n), dtype=DTYPE),
                               rtol=0.0, atol=0.0)
    expected_grad = (F.softmax(z, -1) - F.one_hot(y, vocab).to(DTYPE)) / (n * length)
    torch.testing.assert_close(top.grad, expected_grad, rtol=1e-12, atol=1e-17)
    assert float(top.loss) == pytest.approx(float(F.cross_entropy(z.reshape(-1, vocab),
                                                                   y.reshape(-1))), rel=1e-13)

    def one(zk: Tensor, yk: Tensor) -> Tensor:
        return spec.per_sample(zk[None], yk[None]).sum() / n

    hessians = torch.vmap(torch.func.hessian(one))(z, y).reshape(n, length * vocab, -1)
    lam_max = torch.linalg.eigvalsh(hessians)[:, -1]
    assert bool((lam_max <= top.curvature * (1 + 1e-12)).all())
    blocks = hessians.reshape(n, length, vocab, length, vocab)
    for t in range(length):
        blocks[:, t, :, t, :] = 0.0
    assert float(blocks.abs().max()) == 0.0  # no coupling between tokens


def test_sequence_cross_entropy_bound_is_tight() -> None:
    """Two equally likely classes at every position: λ_max = 1/(2T) exactly."""
    n, length = 3, 5
    z = torch.full((n, length, 6), -60.0, dtype=DTYPE)
    z[..., :2] = 0.0
    y = torch.zeros(n, length, dtype=torch.int64)
    spec = get_loss("cross_entropy")
    hessian = torch.func.hessian(lambda zz: spec.per_sample(zz[None], y[:1]).sum())(z[0])
    lam = float(torch.linalg.eigvalsh(hessian.reshape(length * 6, -1))[-1])
    assert lam == pytest.approx(spec.smoothness((length, 6)), rel=1e-12)


def test_sequence_correct_count_is_token_accuracy_per_sample() -> None:
    z = torch.zeros(2, 4, 3, dtype=DTYPE)
    z[0, :, 1] = 1.0  # sample 0 predicts class 1 everywhere, sample 1 class 0
    y = torch.tensor([[1, 1, 0, 2], [0, 0, 0, 0]])
    spec = get_loss("cross_entropy")
    assert top_of_pipeline(spec, z, y, 2).correct == pytest.approx(0.5 + 1.0)
    assert evaluate_loss(spec, z, y)[1] == pytest.approx(1.5)  # /2 samples: 75% of tokens
    vector = top_of_pipeline(spec, z[:, 0], y[:, 0], 2).correct
    assert vector == 2 and isinstance(vector, int)  # vector samples: an int count, as ever
    mse = get_loss("mse")
    assert mse.smoothness((4, 3)) == 2.0 / 12 and mse.smoothness((3,)) == 2.0 / 3


# --------------------------------------------------------- spec §3 on transformer stages
@pytest.mark.parametrize("activation", ["gelu", "tanh", "relu"])
def test_block_stage_function_and_local_loss_match_dense(activation: str) -> None:
    """Property 2 on a decoder block: (n, T, d) activations, dim 0 the sample."""
    hzz = check_stage_function_matches_dense(block(0, activation), activations(2, 1), seed=1)
    assert hzz.shape == (24, 24)  # two samples of 3 tokens x 4 features
    check_local_loss_matches_dense(block(1, activation), activations(3, 2), seed=2)


def test_embedding_and_head_local_losses_match_dense() -> None:
    model = tiny_transformer(2)
    tokens = torch.randint(5, (3, 3), generator=seeded(3))
    check_local_loss_matches_dense(model[0], tokens, seed=3)  # integer input: H_θθ alone
    check_local_loss_matches_dense(model[2], activations(3, 4), seed=4)


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_power_iteration_on_a_whole_sequence(activation: str) -> None:
    """Property 4: λ per sample from its whole T·d block, which attention couples across
    tokens (treating tokens as samples would be wrong)."""
    blocks = check_power_iteration(block(3, activation), activations(3, 5), seed=5, rounds=300)
    tokens = blocks.reshape(3, 3, 4, 3, 4)
    assert float(tokens[:, 2, :, 0, :].abs().max()) > 1e-6 * float(blocks.abs().max())


def test_cg_on_a_block_model() -> None:
    """Property 6 as far as it holds for an indefinite model: values fall, residuals orthogonal."""
    check_cg(block(4), activations(4, 6), seed=6, positive_definite=False)


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
@pytest.mark.parametrize("seed", [0, 1])
def test_transformer_local_hessians_dominate_network_hessian(activation: str,
                                                             seed: int) -> None:
    """Property 5 (second-order form) on embedding | block | head with the sequence loss."""
    model = tiny_transformer(seed, activation)
    gen = seeded(seed + 30)
    x = torch.randint(5, (3, 3), generator=gen)
    y = torch.randint(5, (3, 3), generator=gen)
    check_bound(split_stages(model, [1, 1, 1]), x, y)


@pytest.mark.parametrize("microbatches", [1, 3])
def test_transformer_local_gradients_are_network_gradients(microbatches: int) -> None:
    """Property 1 on a 4-stage transformer pipeline on text."""
    raw = text_job()
    raw["data"]["microbatches"] = microbatches
    check_local_gradients(job_from_dict(raw))


def test_sm_one_fixed_step_is_gradient_descent_on_a_transformer() -> None:
    """Property 7 on the 4-stage transformer."""
    # A short step, so that no stage's model predicts a rise (SM would then keep its θ).
    sm_raw = text_job(inner_solver="gradient", inner_steps=1, inner_lr=0.002)
    gd_raw = text_job()
    gd_raw["optimizer"] = {"name": "gd", "lr": 0.002}
    sm_losses, sm_iterates = iterate_directly(job_from_dict(sm_raw), 3)
    gd_losses, gd_iterates = iterate_directly(job_from_dict(gd_raw), 3)
    for a, b in zip(sm_iterates, gd_iterates):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert sm_losses == pytest.approx(gd_losses, rel=1e-12)
    assert sm_losses[-1] < sm_losses[0]
    assert abs(sm_losses[0] - math.log(256)) < 1.0  # a fresh byte model: about ln 256


# ------------------------------------------------------------------------ engine parity
def test_transformer_engine_parity_with_single_process(tmp_path: Path) -> None:
    """Property 8: a 4-stage transformer under SM, one process per stage, = --single-process."""
    assert_same_training(*train_both(tmp_path, text_job()))
