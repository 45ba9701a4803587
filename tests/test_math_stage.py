"""Stage function Ψ and local loss 𝓗 against dense torch.func references (spec §3, 1-3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sm_dist.config.build import build_local_pipeline, load_job_data
from sm_dist.data.batches import split_microbatches
from sm_dist.math.local_loss import LocalLoss, unflatten
from sm_dist.math.stage_function import StageFunction, affine_in_parameters
from sm_dist.models.cnn import build_cnn
from sm_dist.models.transformer import build_transformer
from sm_dist.optim.sm import SMStageOptimizer
from tests.helpers_math import (
    ACTIVATIONS,
    DTYPE,
    flat,
    local_hessian_dense,
    make_job,
    psi_dense,
    psi_hessian,
    randn,
    seeded,
    split_hessian,
    tiny_mlp,
    whole_model,
)
from tests.helpers_stages import assert_local_gradients_are_the_networks

RTOL = 1e-10


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    """Relative to the size of the reference vector (entries near zero do not blow it up)."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale)


def stage_inputs(widths: list[int], activation: str, samples: int, seed: int,
                 c_scale: float = 1.0) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A one-layer stage (Linear + activation) with random z_in, g and per-sample c > 0."""
    module = tiny_mlp(widths + [1], activation, seed)[0]  # the first layer: Linear + activation
    gen = seeded(seed + 100)
    z_in = randn(samples, widths[0], gen=gen)
    g = randn(samples, widths[1], gen=gen) / samples
    c = c_scale * (0.5 + torch.rand(samples, generator=gen, dtype=DTYPE)) / samples
    return module, z_in, g, c


# ------------------------------------------------------------------- 1. ∇L_s(0) = ∂h/∂θ_s
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("microbatches", [1, 3])
@pytest.mark.parametrize("optimizer", ["sm", "gd"])
def test_local_gradient_is_network_gradient(activation: str, microbatches: int,
                                            optimizer: str) -> None:
    job = make_job(model={"mlp": {"activation": activation}},
                   data={"microbatches": microbatches}, optimizer={"name": optimizer})
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    data = load_job_data(job)
    x, y = data.train_x, data.train_y
    model = whole_model([stage.module for stage in pipeline.stages])
    params = list(model.parameters())
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    for p in params:
        p.grad = None

    result = pipeline.forward_backward(split_microbatches(x, y, microbatches), len(x), False)
    assert result.loss == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-13)
    got = [p.grad for stage in pipeline.stages for p in stage.params]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    if optimizer == "sm":
        assert_local_gradients_are_the_networks(pipeline, flat(expected), rtol=1e-12)


# ------------------------------------------------------- StageFunction against dense Ψ
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_stage_function_derivatives_match_dense(activation: str) -> None:
    module, z_in, g, c = stage_inputs([3, 4], activation, samples=5, seed=1)
    psi, x0 = psi_dense(module, z_in, g, c)
    nz = z_in.numel()
    dense_grad = torch.func.jacrev(psi)(x0)
    dense_h = torch.func.hessian(psi)(x0)
    assert float(psi(x0)) == 0.0  # the residual vanishes at the base point
    hzz, hzt, htt = split_hessian(dense_h, nz)

    fn = StageFunction.build(module, z_in, g, c)
    gz, gt = fn.gradients()
    assert gz is not None
    assert_close(gz.reshape(-1), dense_grad[:nz])
    assert_close(flat(gt), dense_grad[nz:])

    gen = seeded(7)
    for _ in range(3):
        u = randn(*z_in.shape, gen=gen)
        w = randn(x0.numel() - nz, gen=gen)
        wl = unflatten(w, fn.params)
        hz, ht = fn.hvp(u, wl)
        full = dense_h @ torch.cat([u.reshape(-1), w])
        assert_close(torch.cat([hz.reshape(-1), flat(ht)]), full)
        a, b = fn.hvp_theta(wl)
        assert a is not None
        assert_close(a.reshape(-1), hzt @ w)
        assert_close(flat(b), htt @ w)
        assert_close(flat(fn.hvp_z_theta_part(u)), hzt.T @ u.reshape(-1))
        assert_close(fn.hvp_zz(u).reshape(-1), hzz @ u.reshape(-1))
    # Ψ treats samples independently: H_zz is block-diagonal over samples.
    w_out = z_in.shape[1]
    for k in range(z_in.shape[0]):
        block = hzz[k * w_out:(k + 1) * w_out].clone()
        block[:, k * w_out:(k + 1) * w_out] = 0.0
        assert float(block.abs().max()) == 0.0


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stage_function_products_are_those_of_psi_written_out(activation: str,
                                                               dtype: torch.dtype) -> None:
    """StageFunction hands f's backward ∂Ψ/∂f = g + c·r directly; differentiating Ψ written
    out as sums and squares (as the runs in docs/results were trained) gives the same bits."""
    module, z_in, g, c = stage_inputs([6, 5], activation, samples=4, seed=5)
    module, z_in, g, c = module.to(dtype), z_in.to(dtype), g.to(dtype), c.to(dtype)
    fn = StageFunction.build(module, z_in, g, c)
    z = z_in.detach().requires_grad_(True)
    out = module(z)
    residual = out - out.detach()
    psi = (g * residual).sum() + 0.5 * (c[:, None] * residual * residual).sum()
    written_out = torch.autograd.grad(psi, [z, *fn.params], create_graph=True)
    gen = torch.Generator().manual_seed(8)
    u = torch.randn(z_in.shape, generator=gen, dtype=dtype)
    w = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in fn.params]
    expected = torch.autograd.grad(written_out, [z, *fn.params], grad_outputs=[u, *w],
                                   retain_graph=True)
    hz, ht = fn.hvp(u, w)
    assert torch.equal(fn.grad_z, written_out[0])
    for got, want in zip([hz, *ht], expected):
        assert torch.equal(got, want)
    expected_zz = torch.autograd.grad(written_out[0], z, grad_outputs=u)[0]
    assert torch.equal(fn.hvp_zz(u), expected_zz)


def test_stage_function_without_input_has_theta_derivatives_only() -> None:
    module, z_in, g, c = stage_inputs([3, 4], "tanh", samples=4, seed=2)
    fn = StageFunction.build(module, z_in, g, c, with_input=False)
    assert not fn.with_input
    gz, gt = fn.gradients()
    assert gz is None
    psi, x0 = psi_dense(module, z_in, g, c)
    nz = z_in.numel()
    assert_close(flat(gt), torch.func.jacrev(psi)(x0)[nz:])
    htt = torch.func.hessian(psi)(x0)[nz:, nz:]
    w = randn(htt.shape[0], gen=seeded(3))
    a, b = fn.hvp_theta(unflatten(w, fn.params))
    assert a is None
    assert_close(flat(b), htt @ w)
    assert fn.products == 1


# ---------------------------------------------------------------- 2. 𝓗 against dense
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_input", [True, False])
def test_local_loss_hvp_matches_dense_and_is_symmetric(activation: str,
                                                       with_input: bool) -> None:
    module, _, _, _ = stage_inputs([3, 4], activation, samples=1, seed=4)
    gen = seeded(40)
    parts, dense = [], torch.zeros((), dtype=DTYPE)
    for size in (3, 2):  # two microbatches of one stage
        z_in = randn(size, 3, gen=gen)
        g = randn(size, 4, gen=gen) / 5
        c = (0.5 + torch.rand(size, generator=gen, dtype=DTYPE)) / 5
        delta = (0.1 + torch.rand(size, generator=gen, dtype=DTYPE)) / 5 if with_input else None
        fn = StageFunction.build(module, z_in, g, c, with_input=with_input)
        parts.append((fn, delta))
        dense = dense + local_hessian_dense(module, z_in, g, c, delta)
    grad = flat([sum(gp) for gp in zip(*(fn.gradients()[1] for fn, _ in parts))])
    loss = LocalLoss(parts, grad, rho=0.0)
    dim = loss.dim
    assert dense.shape == (dim, dim)
    for _ in range(3):
        v = randn(dim, gen=gen)
        assert_close(loss.hvp(v), dense @ v)
    # The operator as a matrix, column by column: equal to the dense one and symmetric.
    columns = torch.stack([loss.hvp(e) for e in torch.eye(dim, dtype=DTYPE)], dim=1)
    assert_close(columns, dense)
    u, w = randn(dim, gen=gen), randn(dim, gen=gen)
    uhw, whu = float(u @ loss.hvp(w)), float(w @ loss.hvp(u))
    assert uhw == pytest.approx(whu, rel=RTOL)
    # Two Ψ products per microbatch with an input, one without.
    per_product = sum(2 if with_input else 1 for _ in parts)
    before = sum(fn.products for fn, _ in parts)
    loss.hvp(u)
    assert sum(fn.products for fn, _ in parts) - before == per_product


def test_local_loss_rejects_mismatched_delta() -> None:
    module, z_in, g, c = stage_inputs([3, 4], "tanh", samples=3, seed=5)
    with_input = StageFunction.build(module, z_in, g, c)
    without = StageFunction.build(module, z_in, g, c, with_input=False)
    grad = flat(with_input.gradients()[1])
    with pytest.raises(ValueError):
        LocalLoss([(with_input, None)], grad, 0.0)
    with pytest.raises(ValueError):
        LocalLoss([(without, torch.ones(3, dtype=DTYPE))], grad, 0.0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("curvature", ["sample", "microbatch", "batch"])
def test_pipeline_local_losses_match_dense(activation: str, curvature: str) -> None:
    """Every stage's 𝓗 from a real backward equals the dense one built from the spec's recipe.

    delta_rel = 1, delta_abs = 0 makes δ = λ and c = λ + δ = 2δ exactly, so the c each stage
    received can be read from the δ its upper neighbour kept.
    """
    job = make_job(model={"mlp": {"activation": activation}}, data={"microbatches": 3},
                   optimizer={"curvature": curvature, "delta_rel": 1.0, "delta_abs": 0.0})
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    data = load_job_data(job)
    x, y = data.train_x, data.train_y
    n, mbs = len(x), split_microbatches(x, y, 3)

    # Reference g's: ∂h/∂z_s of the whole network, cut per microbatch like the pipeline.
    zs: list[Tensor] = [x]
    for stage in pipeline.stages:
        zs.append(stage.module(zs[-1]))
    outs = zs[1:]
    grads = torch.autograd.grad(F.cross_entropy(zs[-1], y), outs)
    for stage in pipeline.stages:
        for p in stage.params:
            p.grad = None

    pipeline.forward_backward(mbs, n, False)
    stages = pipeline.stages
    gen = seeded(11)
    for s, stage in enumerate(stages):
        ins = torch.tensor_split(zs[s].detach(), 3)
        gs = torch.tensor_split(grads[s], 3)
        dense = torch.zeros((), dtype=DTYPE)
        for j in range(3):
            if s == len(stages) - 1:
                c = torch.full((len(ins[j]),), 0.5 / n, dtype=DTYPE)
            else:
                c = 2.0 * stages[s + 1].optimizer.deltas[j]
            delta = None if s == 0 else stage.optimizer.deltas[j]
            dense = dense + local_hessian_dense(stage.module, ins[j], gs[j], c, delta)
        update = stage.optimizer
        assert isinstance(update, SMStageOptimizer)
        # One Linear layer per stage: ReLU stages and the last (a lone Linear) take the
        # shared-backward product, tanh and GELU stages the general one.
        assert update.affine_in_params is (activation == "relu" or s == len(stages) - 1)
        update.begin()
        assert update.solver is not None
        loss = update.solver.loss
        for _ in range(2):
            v = randn(loss.dim, gen=gen)
            assert_close(loss.hvp(v), dense @ v)
        if s > 0:
            deltas = [stage.optimizer.deltas[j] for j in range(3)]
            if curvature == "sample":
                assert len(set(float(d) for d in torch.cat(deltas))) > 1
            elif curvature == "microbatch":
                assert all(bool((d == d.max()).all()) for d in deltas)
            else:
                assert len(set(float(d) for d in torch.cat(deltas))) == 1


# ------------------------------------------------------------- 3. ReLU: H_θθ = c·JᵀJ
@pytest.mark.parametrize("last", [False, True])
def test_relu_stage_theta_hessian_is_gauss_newton(last: bool) -> None:
    """Linear+ReLU (or the last, Linear-only layer): H_θθ = Σ_k c_k J_kᵀJ_k exactly."""
    module, z_in, g, c = stage_inputs([3, 4], "relu", samples=6, seed=6)
    if last:
        module = nn.Sequential(module[0])
    assert any(isinstance(m, nn.ReLU) for m in module.modules()) != last
    theta0 = flat(list(module.parameters()))

    def f(theta: Tensor, z: Tensor) -> Tensor:
        names = [name for name, _ in module.named_parameters()]
        sizes = [p.numel() for p in module.parameters()]
        parts = dict(zip(names, (t.view_as(p) for t, p in
                                 zip(theta.split(sizes), module.parameters()))))
        return torch.func.functional_call(module, parts, (z,))

    jac = torch.func.jacrev(f)(theta0, z_in)  # (samples, out, dθ)
    gauss_newton = torch.einsum("k,kod,koe->de", c, jac, jac)
    fn = StageFunction.build(module, z_in, g, c)
    eye = torch.eye(theta0.numel(), dtype=DTYPE)
    htt = torch.stack([flat(fn.hvp_theta(unflatten(e, fn.params))[1]) for e in eye], dim=1)
    assert_close(htt, gauss_newton)
    assert float(torch.linalg.eigvalsh(htt).min()) >= -1e-12 * float(htt.abs().max())
    # The same from the dense Hessian of Ψ (g drops out: f is linear in θ between kinks).
    assert_close(psi_hessian(module, z_in, g, c)[z_in.numel():, z_in.numel():], gauss_newton)


# ------------------------------------------- 3b. stages affine in θ: 𝓗w in one backward less
class _OwnLinear(nn.Linear):
    """A subclass may compute anything in its forward: never taken for affine."""


def _transformer_block() -> nn.Module:
    return build_transformer(vocab=8, context=4, width=8, heads=2, blocks=1)[1]


@pytest.mark.parametrize(("build", "affine"), [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU()), True),
    (lambda: nn.Sequential(nn.Linear(3, 4)), True),
    (lambda: nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(), nn.AvgPool2d(2))),
     True),
    (lambda: build_cnn([1, 8, 8], [2, 3], classes=3)[0], True),  # conv, ReLU, max pooling
    (lambda: build_cnn([1, 8, 8], [2, 3], classes=3)[2], True),  # Flatten + Linear head
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh()), False),  # tanh'' ≠ 0
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()), False),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), False),  # θ1·θ2
    (lambda: nn.Sequential(nn.Linear(3, 4).requires_grad_(False), nn.Linear(4, 2)), False),
    (lambda: nn.Sequential(_OwnLinear(3, 4), nn.ReLU()), False),
    (lambda: nn.Sequential(nn.ReLU()), False),  # nothing to train
    (_transformer_block, False),
])
def test_affine_in_parameters_takes_only_what_it_can_prove(build, affine: bool) -> None:
    assert affine_in_parameters(build()) is affine


def _local_hvp_both_forms(module: nn.Module, z_in: Tensor, g: Tensor, c: Tensor,
                          delta: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """One microbatch's 𝓗w in the shared-backward form and in the general one (the same w),
    each counted as two Ψ products."""
    results = []
    for affine in (True, False):
        fn = StageFunction.build(module, z_in, g, c, affine_in_params=affine)
        result = torch.zeros(sum(p.numel() for p in fn.params), dtype=DTYPE)
        fn.add_local_hvp([randn(*p.shape, gen=seeded(seed)) for p in fn.params], delta, result)
        assert fn.products == 2
        results.append(result)
    return results[0], results[1]


@pytest.mark.parametrize("stage", ["relu", "last", "conv", "head"])
def test_affine_product_is_the_general_one(stage: str) -> None:
    """On stages affine in θ, 𝓗w by one backward that applies J_θᵀ once equals the two
    separate products of the general form (other rounding, float64 agreement)."""
    gen = seeded(11)
    torch.manual_seed(11)
    module: nn.Module
    if stage in ("relu", "last"):
        module = stage_inputs([5, 4], "relu", samples=2, seed=11)[0]
        module = module if stage == "relu" else nn.Sequential(module[0])
        z_in = randn(6, 5, gen=gen)
    else:
        cnn = build_cnn([2, 6, 6], [3], classes=4).to(DTYPE)
        module = cnn[0] if stage == "conv" else cnn[1]
        z_in = randn(6, 2, 6, 6, gen=gen) if stage == "conv" else randn(6, 3, 3, 3, gen=gen)
    assert affine_in_parameters(module)
    with torch.no_grad():
        out = module(z_in)
    g, c = randn(*out.shape, gen=gen), torch.rand(6, generator=gen, dtype=DTYPE)
    delta = 0.1 + torch.rand(6, generator=gen, dtype=DTYPE)
    shared, general = _local_hvp_both_forms(module, z_in, g, c, delta, seed=12)
    assert_close(shared, general, rtol=1e-13)


def test_affine_product_needs_a_stage_affine_in_theta() -> None:
    """Forced on two Linear layers (θ1·θ2 terms in H_θθ) the shortcut is wrong: the check in
    affine_in_parameters is what keeps it exact."""
    module = tiny_mlp([3, 4, 2], "relu", seed=13)
    gen = seeded(13)
    z_in, g = randn(5, 3, gen=gen), randn(5, 2, gen=gen)
    c, delta = torch.rand(5, generator=gen, dtype=DTYPE), torch.ones(5, dtype=DTYPE)
    shared, general = _local_hvp_both_forms(module, z_in, g, c, delta, seed=14)
    assert float((shared - general).abs().max()) > 1e-3 * float(general.abs().max())


@pytest.mark.parametrize("affine", [True, False])
def test_local_hvp_writes_only_its_own_buffers(affine: bool) -> None:
    """Δ⁻¹ is applied in the product's own buffer (one input-sized tensor fewer per product):
    the directions, δ, g, c and the stored input are left as they were."""
    gen = seeded(21)
    module = stage_inputs([5, 4], "relu", samples=2, seed=21)[0]
    z_in = randn(6, 5, gen=gen)
    with torch.no_grad():
        out = module(z_in)
    g, c = randn(*out.shape, gen=gen), torch.rand(6, generator=gen, dtype=DTYPE)
    delta = 0.1 + torch.rand(6, generator=gen, dtype=DTYPE)
    fn = StageFunction.build(module, z_in, g, c, affine_in_params=affine)
    w = [randn(*p.shape, gen=gen) for p in fn.params]
    before = [t.clone() for t in (z_in, g, c, delta, *w)]
    result = torch.zeros(sum(p.numel() for p in fn.params), dtype=DTYPE)
    fn.add_local_hvp(w, delta, result)
    assert result.abs().max() > 0
    for now, then in zip((z_in, g, c, delta, *w), before, strict=True):
        assert torch.equal(now, then)
