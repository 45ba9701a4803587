"""Spec §3's properties for any stage module, against dense float64 references: shared by the
CNN and transformer tests (tests/helpers_math.py holds the dense pieces they build on)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from sm_dist.config.build import build_local_pipeline, load_job_data
from sm_dist.config.job import JobConfig
from sm_dist.data.batches import split_microbatches
from sm_dist.math.curvature import damped_curvature, initial_vectors, power_iteration
from sm_dist.math.line_search import ArmijoRule
from sm_dist.math.local_loss import LocalLoss, unflatten
from sm_dist.math.losses import get_loss
from sm_dist.math.solvers import TruncatedCG
from sm_dist.math.stage_function import StageFunction
from sm_dist.optim.sm import SMStageOptimizer
from tests.helpers_math import (
    DTYPE,
    as_matrix,
    flat,
    param_dict,
    per_sample_blocks,
    psi_dense,
    randn,
    seeded,
)

RTOL = 1e-10


# torch.func.hessian (vmap over functorch's vjp) gets the second derivatives through a
# LayerNorm that follows a Linear wrong in torch 2.14 (off by O(1), where finite differences,
# double backward and torch.autograd.functional.hessian agree), so the dense references here
# use torch.autograd.functional.hessian.
def dense_hessian(fn, x: Tensor) -> Tensor:
    """The dense Hessian of a scalar function of one vector, by autograd."""
    return torch.autograd.functional.hessian(fn, x, vectorize=True)


def psi_hessian(module: nn.Module, z_in: Tensor, g: Tensor, c: Tensor) -> Tensor:
    """The full dense Hessian of Ψ in (z, θ), z first."""
    psi, x0 = psi_dense(module, z_in, g, c)
    return dense_hessian(psi, x0)


def local_hessian_dense(module: nn.Module, z_in: Tensor, g: Tensor, c: Tensor,
                        delta: Tensor) -> Tensor:
    """𝓗 = H_θθ + H_θz Δ⁻¹ H_zθ from the dense Hessian of Ψ (one δ per sample)."""
    h = psi_hessian(module, z_in, g, c)
    nz = z_in.numel()
    inv = (1.0 / delta).repeat_interleave(nz // z_in.shape[0])
    return h[nz:, nz:] + h[:nz, nz:].T @ (inv[:, None] * h[:nz, nz:])


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    """Relative to the size of the reference (entries near zero do not blow it up)."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale)


def stage_point(module: nn.Module, z_in: Tensor, seed: int,
                g_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """A random received gradient g (the module's output shape) and per-sample c > 0."""
    gen = seeded(seed)
    with torch.no_grad():
        out = module(z_in)
    n = z_in.shape[0]
    g = g_scale * randn(*out.shape, gen=gen) / n
    c = (0.5 + torch.rand(n, generator=gen, dtype=DTYPE)) / n
    return g, c


def theta_hessian_dense(module: nn.Module, z_in: Tensor, g: Tensor, c: Tensor) -> Tensor:
    """H_θθ of Ψ for a fixed input (stage 1, whose input may be integer tokens)."""
    with torch.no_grad():
        z_out = module(z_in)
    cs = c.reshape(-1, *([1] * (z_out.dim() - 1)))

    def psi(theta: Tensor) -> Tensor:
        res = functional_call(module, param_dict(module, theta), (z_in,)) - z_out
        return (g * res).sum() + 0.5 * (cs * res * res).sum()

    return dense_hessian(psi, flat(list(module.parameters())))


# ------------------------------------------------------------ property 2: 𝓗 and its parts
def check_local_loss_matches_dense(module: nn.Module, z_in: Tensor, seed: int) -> None:
    """𝓗v = (H_θθ + H_θz Δ⁻¹ H_zθ)v from the dense Hessian of Ψ (H_θθ v for an input that
    needs no derivatives), and 𝓗 is symmetric."""
    with_input = z_in.is_floating_point()
    g, c = stage_point(module, z_in, seed)
    gen = seeded(seed + 1)
    delta = (0.1 + torch.rand(len(z_in), generator=gen, dtype=DTYPE)) / len(z_in)
    if with_input:
        dense = local_hessian_dense(module, z_in, g, c, delta)
    else:
        dense = theta_hessian_dense(module, z_in, g, c)
    fn = StageFunction.build(module, z_in, g, c, with_input=with_input)
    loss = LocalLoss([(fn, delta if with_input else None)], flat(fn.gradients()[1]), 0.0)
    assert dense.shape == (loss.dim, loss.dim)
    for _ in range(3):
        v = randn(loss.dim, gen=gen)
        assert_close(loss.hvp(v), dense @ v)
    matrix = as_matrix(loss)
    assert_close(matrix, dense)
    u, w = randn(loss.dim, gen=gen), randn(loss.dim, gen=gen)
    assert float(u @ loss.hvp(w)) == pytest.approx(float(w @ loss.hvp(u)), rel=RTOL)


def check_stage_function_matches_dense(module: nn.Module, z_in: Tensor, seed: int) -> Tensor:
    """Every product of Ψ against the dense Hessian over (z, θ); returns the dense H_zz."""
    g, c = stage_point(module, z_in, seed)
    dense = psi_hessian(module, z_in, g, c)
    nz = z_in.numel()
    hzz, hzt, htt = dense[:nz, :nz], dense[:nz, nz:], dense[nz:, nz:]
    fn = StageFunction.build(module, z_in, g, c)
    gen = seeded(seed + 2)
    u, w = randn(*z_in.shape, gen=gen), randn(htt.shape[0], gen=gen)
    hz, ht = fn.hvp(u, unflatten(w, fn.params))
    assert_close(torch.cat([hz.reshape(-1), flat(ht)]), dense @ torch.cat([u.reshape(-1), w]))
    assert_close(fn.hvp_zz(u).reshape(-1), hzz @ u.reshape(-1))
    assert_close(flat(fn.hvp_z_theta_part(u)), hzt.T @ u.reshape(-1))
    # Samples are independent: H_zz is block diagonal over dim 0, each block a whole sample.
    size = nz // z_in.shape[0]
    for k in range(z_in.shape[0]):
        rows = hzz[k * size:(k + 1) * size].clone()
        rows[:, k * size:(k + 1) * size] = 0.0
        assert float(rows.abs().max()) == 0.0
    return hzz


# ---------------------------------------------------------------- property 4: λ per sample
def check_power_iteration(module: nn.Module, z_in: Tensor, seed: int, rounds: int) -> Tensor:
    """The batched power iteration gives every sample's |dominant eigenvalue| of its whole
    block of H_zz (all of the sample's features); returns those blocks."""
    g, c = stage_point(module, z_in, seed, g_scale=0.1)  # H_zz dominated by c·JᵀJ ⪰ 0
    n = z_in.shape[0]
    hzz = psi_hessian(module, z_in, g, c)[:z_in.numel(), :z_in.numel()]
    blocks = per_sample_blocks(hzz, n)
    magnitudes = [torch.linalg.eigvalsh(b).abs().sort(descending=True).values for b in blocks]
    exact = torch.stack([m[0] for m in magnitudes])
    assert float(max(m[1] / m[0] for m in magnitudes)) < 0.9  # a clear dominant eigenvalue
    fn = StageFunction.build(module, z_in, g, c)
    before = fn.products
    lam, vectors = power_iteration(fn.hvp_zz, initial_vectors(z_in, seeded(seed)), rounds)
    assert fn.products - before == rounds  # one Ψ product per round for every sample at once
    torch.testing.assert_close(lam, exact, rtol=1e-8, atol=0.0)
    assert vectors.shape == z_in.shape
    return torch.stack(blocks)


# --------------------------------------------------------------- property 3: Gauss-Newton
def check_gauss_newton(module: nn.Module, z_in: Tensor, seed: int) -> None:
    """A stage piecewise linear in θ (conv, ReLU, max pooling): H_θθ = Σ_k c_k J_kᵀJ_k."""
    g, c = stage_point(module, z_in, seed)
    theta0 = flat(list(module.parameters()))

    def f(theta: Tensor) -> Tensor:
        return functional_call(module, param_dict(module, theta), (z_in,))

    jac = torch.func.jacrev(f)(theta0).reshape(len(z_in), -1, theta0.numel())
    gauss_newton = torch.einsum("k,kod,koe->de", c, jac, jac)
    fn = StageFunction.build(module, z_in, g, c)
    eye = torch.eye(theta0.numel(), dtype=DTYPE)
    htt = torch.stack([flat(fn.hvp_theta(unflatten(e, fn.params))[1]) for e in eye], dim=1)
    assert_close(htt, gauss_newton)
    assert float(torch.linalg.eigvalsh(htt).min()) >= -1e-12 * float(htt.abs().max())


# ------------------------------------------------------------------------ property 6: CG
def check_cg(module: nn.Module, z_in: Tensor, seed: int, positive_definite: bool) -> None:
    """CG on a stage's local loss: the model value falls at every step and the residuals are
    orthogonal; on a positive-definite 𝓗 it reaches 𝓗d = −g within dim steps."""
    g, c = stage_point(module, z_in, seed)
    delta = 0.3 * c
    fn = StageFunction.build(module, z_in, g, c)
    loss = LocalLoss([(fn, delta)], flat(fn.gradients()[1]), 0.0)
    matrix = as_matrix(loss)
    matrix = 0.5 * (matrix + matrix.T)
    if positive_definite:
        assert float(torch.linalg.eigvalsh(matrix).min()) > 0.0
    cg = TruncatedCG(loss, tol=1e-10, armijo=ArmijoRule(), fallback_step=1.0)
    residuals, values = [cg.r.clone()], [cg.report().value]
    steps = loss.dim if positive_definite else min(loss.dim, 6)
    for _ in range(steps):
        if cg.run(1) == 0:
            break
        residuals.append(cg.r.clone())
        values.append(cg.report().value)
    assert len(values) > 2  # CG took steps
    # It falls at every step, down to round-off once CG has converged.
    assert all(b < a + 1e-13 * abs(a) for a, b in zip(values, values[1:]))
    assert values[2] < values[1] < values[0]
    stacked = torch.stack(residuals[:6])
    norms = stacked.norm(dim=1)
    cosines = (stacked @ stacked.T) / torch.outer(norms, norms) - torch.eye(len(stacked),
                                                                             dtype=DTYPE)
    assert float(cosines.abs().max()) <= 1e-8
    if positive_definite:
        assert cg.stopped == "converged" and cg.steps <= loss.dim
        solution = torch.linalg.solve(matrix, -loss.grad)
        torch.testing.assert_close(cg.d, solution, rtol=0.0,
                                   atol=1e-8 * float(solution.norm()))


# ---------------------------------------------------------------- property 5: upper bound
def exact_local_losses(stages: list[nn.Module], x: Tensor, y: Tensor,
                       coupling: bool = True, granularity: str = "sample",
                       delta_rel: float = 0.3, delta_abs: float = 0.0) -> list[LocalLoss]:
    """L_1..L_p from the top, with exact λ's (dense eigvalsh of each sample's H_zz block; their
    maximum over the batch for `granularity="batch"`) and δ from `delta_rel`, `delta_abs`; the
    top's g and c from cross-entropy (vectors or sequences alike). `coupling=False` drops
    H_θz Δ⁻¹ H_zθ (a deliberately wrong model, for a negative control)."""
    spec, n = get_loss("cross_entropy"), len(x)
    zs = [x]
    with torch.no_grad():
        for module in stages:
            zs.append(module(zs[-1]))
    top = zs[-1].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(spec.per_sample(top, y).sum() / n, top)
    c = torch.full((n,), spec.smoothness(tuple(top.shape[1:])) / n, dtype=DTYPE)
    losses: list[LocalLoss] = []
    for s in reversed(range(len(stages))):
        fn = StageFunction.build(stages[s], zs[s], g, c, with_input=s > 0)
        g_in, g_theta = fn.gradients()
        if s == 0:
            losses.insert(0, LocalLoss([(fn, None)], flat(g_theta), 0.0))
            break
        nz = zs[s].numel()
        hzz = psi_hessian(stages[s], zs[s], g, c)[:nz, :nz]
        lam = torch.stack([torch.linalg.eigvalsh(b).abs().max()
                           for b in per_sample_blocks(hzz, n)])
        if granularity == "batch":
            lam = lam.max().expand(n).clone()
        c, delta = damped_curvature(lam, delta_rel=delta_rel, delta_abs=delta_abs,
                                    delta_floor=1e-12)
        part = delta if coupling else torch.full_like(delta, float("inf"))
        losses.insert(0, LocalLoss([(fn, part)], flat(g_theta), 0.0))
        assert g_in is not None
        g = g_in
    return losses


def check_bound(stages: list[nn.Module], x: Tensor, y: Tensor) -> None:
    """blockdiag(𝓗_1..𝓗_p) − ∇²h ⪰ 0 and Σ_s ∇L_s(0) = ∇h; without the coupling term the
    gap has a clearly negative eigenvalue (the test can fail)."""
    model = nn.Sequential(*stages)
    spec = get_loss("cross_entropy")

    def h(theta: Tensor) -> Tensor:
        return spec.per_sample(functional_call(model, param_dict(model, theta), (x,)), y).mean()

    theta = flat(list(model.parameters()))
    losses = exact_local_losses(stages, x, y)
    torch.testing.assert_close(torch.cat([loss.grad for loss in losses]),
                               torch.autograd.functional.jacobian(h, theta), rtol=1e-12,
                               atol=1e-15)
    hess = dense_hessian(h, theta)
    gap = torch.block_diag(*[as_matrix(loss) for loss in losses]) - hess
    assert float((gap - gap.T).abs().max()) <= 1e-12 * float(hess.abs().max()) + 1e-15
    assert float(torch.linalg.eigvalsh(0.5 * (gap + gap.T)).min()) >= -1e-10
    control = torch.block_diag(*[as_matrix(loss) for loss in
                                 exact_local_losses(stages, x, y, coupling=False)]) - hess
    assert float(torch.linalg.eigvalsh(0.5 * (control + control.T)).min()) < -1e-6


# --------------------------------------------------------- property 1: ∇L_s(0) = ∂h/∂θ_s
def check_local_gradients(job: JobConfig) -> None:
    """A real pipeline's local losses have gradient ∂h/∂θ_s at 0 (h by autograd, whole net)."""
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    data = load_job_data(job)
    x, y = data.train_x, data.train_y
    model = nn.Sequential(*[stage.module for stage in pipeline.stages])
    params = list(model.parameters())
    spec = get_loss(job.loss)
    expected = flat(torch.autograd.grad(spec.per_sample(model(x), y).mean(), params))
    for p in params:
        p.grad = None
    microbatches = split_microbatches(x, y, job.data.microbatches)
    result = pipeline.forward_backward(microbatches, len(x), False)
    assert result.loss == pytest.approx(float(spec.per_sample(model(x), y).mean()), rel=1e-12)
    assert_local_gradients_are_the_networks(pipeline, expected, rtol=1e-11)


def assert_local_gradients_are_the_networks(pipeline: Any, expected: Tensor,
                                            rtol: float) -> None:
    """Σ_s ∇L_s(0) = ∇h: each SM stage's local-loss gradient at 0 (after `begin`) is its slice
    of the network's flat gradient `expected`, and the slices cover it."""
    offset = 0
    for stage in pipeline.stages:
        part = stage.optimizer
        assert isinstance(part, SMStageOptimizer)
        part.begin()
        assert part.solver is not None
        loss = part.solver.loss
        zero = torch.zeros(loss.dim, dtype=DTYPE)
        torch.testing.assert_close(loss.gradient(zero, loss.hvp(zero)),
                                   expected[offset:offset + loss.dim], rtol=rtol, atol=1e-15)
        offset += loss.dim
    assert offset == expected.numel()
