"""Inner solvers on local losses: truncated CG and GD+Armijo (spec §2 and §3, 6 and 8)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from sm_dist.math.line_search import ArmijoRule, armijo_backtrack
from sm_dist.math.local_loss import LocalLoss
from sm_dist.math.solvers import GradientDescentArmijo, TruncatedCG
from sm_dist.math.stage_function import StageFunction
from tests.helpers_math import (
    DTYPE,
    DenseLocalLoss,
    as_matrix,
    flat,
    randn,
    seeded,
    tiny_mlp,
)


def stage_local_loss(kind: str, rho: float = 0.0, seed: int = 0) -> tuple[LocalLoss, Tensor]:
    """A real LocalLoss of a tiny stage with input, and its dense 𝓗.

    `linear`: a lone Linear stage (H_θθ = c·JᵀJ, positive definite here); `tanh`: Linear+tanh,
    whose 𝓗 need not be.
    """
    gen = seeded(seed)
    layer = tiny_mlp([3, 2] if kind == "linear" else [3, 4, 1], "tanh", seed)[0]
    module: nn.Module = layer
    out = 2 if kind == "linear" else 4
    samples = 6
    z_in = randn(samples, 3, gen=gen)
    g = randn(samples, out, gen=gen) / samples
    c = (0.5 + torch.rand(samples, generator=gen, dtype=DTYPE)) / samples
    delta = 0.3 * (0.5 + torch.rand(samples, generator=gen, dtype=DTYPE)) / samples
    fn = StageFunction.build(module, z_in, g, c)
    loss = LocalLoss([(fn, delta)], flat(fn.gradients()[1]), rho)
    matrix = as_matrix(loss)
    loss.products = 0
    return loss, 0.5 * (matrix + matrix.T)


def exact_value(matrix: Tensor, grad: Tensor, rho: float, d: Tensor) -> float:
    """L(d) = ⟨g, d⟩ + ½ dᵀ𝓗d + (2ρ/3)‖d‖³ from the dense 𝓗."""
    return float(grad @ d + 0.5 * d @ matrix @ d + (2.0 * rho / 3.0) * d.norm() ** 3)


def spd_dense_loss(dim: int, seed: int) -> DenseLocalLoss:
    gen = seeded(seed)
    q, _ = torch.linalg.qr(randn(dim, dim, gen=gen))
    spectrum = torch.logspace(-0.5, 0.5, dim, dtype=DTYPE)  # condition number 10
    return DenseLocalLoss(q @ torch.diag(spectrum) @ q.T, randn(dim, gen=gen))


# ------------------------------------------------------------------------------- 6. CG
@pytest.mark.parametrize("kind", ["stage", "dense"])
def test_cg_solves_positive_definite_model_within_dim_steps(kind: str) -> None:
    if kind == "stage":
        loss, matrix = stage_local_loss("linear")
    else:
        dense = spd_dense_loss(10, seed=1)
        loss, matrix = dense, dense.matrix
    assert float(torch.linalg.eigvalsh(matrix).min()) > 0.0
    g, dim = loss.grad, loss.dim
    cg = TruncatedCG(loss, tol=1e-10, armijo=ArmijoRule(), fallback_step=1.0)
    residuals, values = [cg.r.clone()], [cg.report().value]
    assert values[0] == 0.0 and torch.equal(cg.r, -g)
    for _ in range(dim):
        if cg.run(1) == 0:
            break
        residuals.append(cg.r.clone())
        values.append(cg.report().value)
        # The tracked residual is the true one, −g − 𝓗d.
        torch.testing.assert_close(cg.r, -g - matrix @ cg.d, rtol=0.0,
                                   atol=1e-12 * float(g.norm()))
    assert cg.stopped == "converged"
    assert cg.steps == len(residuals) - 1 <= dim
    assert loss.products == cg.steps  # one 𝓗 product per CG step
    assert float((cg.r).norm()) <= 1e-10 * float(g.norm())
    solution = torch.linalg.solve(matrix, -g)
    torch.testing.assert_close(cg.d, solution, rtol=0.0, atol=1e-9 * float(solution.norm()))
    torch.testing.assert_close(cg.hd, matrix @ cg.d, rtol=0.0, atol=1e-10 * float(g.norm()))
    assert float((matrix @ cg.d + g).norm()) <= 1e-9 * float(g.norm())
    # The residuals are mutually orthogonal (the last one, at round-off level, in absolute terms).
    stacked = torch.stack(residuals)
    gram = stacked @ stacked.T
    off = gram - torch.diag(torch.diag(gram))
    assert float(off.abs().max()) <= 1e-12 * float(g @ g)
    norms = stacked.norm(dim=1)
    cosines = off / torch.outer(norms, norms)
    assert float(cosines[:-1, :-1].abs().max()) <= 1e-9
    # The model value falls at every step, and the report is L at the iterate.
    assert all(b < a for a, b in zip(values, values[1:]))
    assert cg.report().value == pytest.approx(exact_value(matrix, g, 0.0, cg.d), rel=1e-10)
    assert cg.run(5) == 0  # stopped: nothing more


@pytest.mark.parametrize("kind", ["stage", "dense"])
def test_cg_resumes_in_slices(kind: str) -> None:
    """run(3) then run(2) gives bit for bit the iterate of run(5) (and run(1) five times)."""
    def make() -> TruncatedCG:
        loss = stage_local_loss("linear")[0] if kind == "stage" else spd_dense_loss(10, seed=2)
        return TruncatedCG(loss, tol=0.0, armijo=ArmijoRule(), fallback_step=1.0)

    whole, sliced, single = make(), make(), make()
    assert whole.run(5) == 5
    assert sliced.run(3) == 3 and sliced.run(2) == 2
    for _ in range(5):
        assert single.run(1) == 1
    for other in (sliced, single):
        for name in ("d", "hd", "r", "p"):
            assert torch.equal(getattr(other, name), getattr(whole, name)), name
        assert other.rr == whole.rr and other.steps == whole.steps == 5
        assert other.loss.products == 5


def test_cg_negative_curvature_at_first_step_takes_one_armijo_gradient_step() -> None:
    matrix = torch.diag(torch.tensor([1.0, -3.0, 0.5], dtype=DTYPE))
    g = torch.tensor([1.0, 1.0, 0.0], dtype=DTYPE)
    assert float(g @ matrix @ g) < 0.0
    loss = DenseLocalLoss(matrix, g)
    cg = TruncatedCG(loss, tol=1e-10, armijo=ArmijoRule(), fallback_step=0.7)
    assert cg.run(4) == 1
    assert cg.stopped == "negative curvature" and cg.steps == 1 and loss.products == 1
    # On a concave direction any step passes Armijo: the first trial step is taken.
    torch.testing.assert_close(cg.d, -0.7 * g, rtol=0.0, atol=0.0)
    torch.testing.assert_close(cg.hd, matrix @ cg.d, rtol=1e-15, atol=0.0)
    assert cg.report().value < 0.0
    assert cg.run(4) == 0


def test_cg_stops_on_a_non_finite_curvature_and_keeps_its_iterate() -> None:
    """A NaN pᵀ𝓗p (the network overflowed) is not 'positive': CG stops instead of stepping
    with NaN, and CGBlock's products, which come from outside, stop counting."""
    matrix = torch.eye(2, dtype=DTYPE)
    cg = TruncatedCG(DenseLocalLoss(matrix, torch.tensor([1.0, 2.0], dtype=DTYPE)), tol=0.0,
                     armijo=ArmijoRule(), fallback_step=1.0)
    assert cg.advance(torch.full((2,), float("nan"), dtype=DTYPE)) == 0
    assert cg.stopped == "non-finite curvature" and cg.steps == 0
    assert torch.equal(cg.d, torch.zeros(2, dtype=DTYPE))


def test_cg_zero_curvature_counts_as_non_positive() -> None:
    matrix = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DTYPE)
    g = torch.tensor([1.0, 0.0], dtype=DTYPE)
    assert float(g @ matrix @ g) == 0.0
    cg = TruncatedCG(DenseLocalLoss(matrix, g), tol=1e-10, armijo=ArmijoRule(),
                     fallback_step=2.0)
    cg.run(3)
    assert cg.stopped == "negative curvature"
    torch.testing.assert_close(cg.d, -2.0 * g, rtol=0.0, atol=0.0)


def test_cg_negative_curvature_fallback_backtracks_on_the_cubic_model() -> None:
    """With ρ > 0 the line search along −g really backtracks: the largest Armijo step is taken."""
    matrix = torch.diag(torch.tensor([-1.0, 2.0], dtype=DTYPE))
    g = torch.tensor([2.0, 0.5], dtype=DTYPE)
    rho, rule, first = 1.0, ArmijoRule(c=0.1, beta=0.5), 8.0
    loss = DenseLocalLoss(matrix, g, rho=rho)
    cg = TruncatedCG(loss, tol=1e-10, armijo=rule, fallback_step=first)
    cg.run(1)
    step = first
    while exact_value(matrix, g, rho, -step * g) > -rule.c * step * float(g @ g):
        step *= rule.beta
    assert step < first  # the premise: at least one backtrack
    torch.testing.assert_close(cg.d, -step * g, rtol=1e-15, atol=0.0)
    assert cg.stopped == "negative curvature"


def test_cg_negative_curvature_later_keeps_the_iterate() -> None:
    matrix = torch.diag(torch.tensor([2.0, -1.0], dtype=DTYPE))
    g = torch.tensor([1.0, 0.5], dtype=DTYPE)
    loss = DenseLocalLoss(matrix, g)
    # The premise, by hand: the first CG direction has positive curvature, the second not.
    alpha = float(g @ g) / float(g @ matrix @ g)
    r1 = -g + alpha * (matrix @ g)
    p2 = r1 - (float(r1 @ r1) / float(g @ g)) * g
    assert float(g @ matrix @ g) > 0.0 and float(p2 @ matrix @ p2) <= 0.0
    cg = TruncatedCG(loss, tol=1e-12, armijo=ArmijoRule(), fallback_step=1.0)
    assert cg.run(10) == 1
    assert cg.stopped == "negative curvature" and cg.steps == 1 and loss.products == 2
    torch.testing.assert_close(cg.d, -alpha * g, rtol=1e-15, atol=0.0)
    assert cg.report().value == pytest.approx(-0.5 * alpha * float(g @ g), rel=1e-14)


def test_cg_zero_gradient_stops_at_once() -> None:
    loss = DenseLocalLoss(torch.eye(3, dtype=DTYPE), torch.zeros(3, dtype=DTYPE))
    cg = TruncatedCG(loss, tol=1e-10, armijo=ArmijoRule(), fallback_step=1.0)
    assert cg.run(3) == 0 and cg.stopped == "zero gradient" and loss.products == 0


# ------------------------------------------------------------------------ 8. GD+Armijo
@pytest.mark.parametrize("rho", [0.0, 0.5])
@pytest.mark.parametrize("kind", ["tanh", "linear"])
def test_gd_armijo_inner_steps(rho: float, kind: str) -> None:
    """Every accepted step satisfies Armijo and is the largest trial; one 𝓗 product per step."""
    loss, matrix = stage_local_loss(kind, rho=rho)
    g = loss.grad
    rule = ArmijoRule(c=0.1, beta=0.9)
    scale = float(torch.linalg.eigvalsh(matrix).abs().max())
    solver = GradientDescentArmijo(loss, armijo=rule, initial_step=10.0 / scale)
    backtracked = 0
    for _ in range(8):
        d_old = solver.d.clone()
        grad = g + matrix @ d_old + 2.0 * rho * d_old.norm() * d_old
        trial, products = solver.next_step, loss.products
        assert solver.run(1) == 1
        assert loss.products == products + 1
        step = solver.last_step
        assert solver.next_step == 2.0 * step
        k = round(math.log(step / trial) / math.log(rule.beta))
        assert step == pytest.approx(trial * rule.beta**k, rel=1e-12) and k >= 0
        backtracked += k > 0
        torch.testing.assert_close(solver.d, d_old - step * grad, rtol=0.0,
                                   atol=1e-12 * float(d_old.norm() + step * grad.norm()))
        grad_sq = float(grad @ grad)
        before = exact_value(matrix, g, rho, d_old)
        after = exact_value(matrix, g, rho, solver.d)
        assert after <= before - rule.c * step * grad_sq + 1e-15 * abs(before)
        if k > 0:  # the previous, larger trial failed the test
            larger = step / rule.beta
            assert (exact_value(matrix, g, rho, d_old - larger * grad)
                    > before - rule.c * larger * grad_sq - 1e-15 * abs(before))
        torch.testing.assert_close(solver.hd, matrix @ solver.d, rtol=0.0,
                                   atol=1e-10 * float((matrix @ solver.d).norm()))
    assert backtracked > 0
    assert solver.steps == 8 and loss.products == 8
    assert solver.report().value == pytest.approx(exact_value(matrix, g, rho, solver.d),
                                                  rel=1e-10)


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_line_value_and_gradient_equal_the_local_loss(rho: float) -> None:
    """φ(α) = L_s(d + αp) evaluated directly, ∇L_s from autograd of the dense definition."""
    loss, matrix = stage_local_loss("tanh", rho=rho)
    gen = seeded(9)
    d, p = randn(loss.dim, gen=gen), randn(loss.dim, gen=gen)
    hd, hp = loss.hvp(d), loss.hvp(p)
    products = loss.products
    phi = loss.line_value(d, hd, p, hp)
    for alpha in (-0.7, 0.0, 0.3, 1.0, 2.5):
        point = d + alpha * p
        direct = loss.value(point, loss.hvp(point))
        assert phi(alpha) == pytest.approx(direct, rel=1e-12)
        assert direct == pytest.approx(exact_value(matrix, loss.grad, rho, point), rel=1e-10)
    assert loss.products == products + 5  # φ itself took none
    d_var = d.clone().requires_grad_(True)
    value = loss.grad @ d_var + 0.5 * d_var @ matrix @ d_var + (2 * rho / 3) * d_var.norm() ** 3
    (reference,) = torch.autograd.grad(value, d_var)
    torch.testing.assert_close(loss.gradient(d, hd), reference, rtol=0.0,
                               atol=1e-10 * float(reference.norm()))


def test_gd_fixed_step_and_failed_search() -> None:
    loss, matrix = stage_local_loss("tanh")
    g = loss.grad
    fixed = GradientDescentArmijo(loss, armijo=ArmijoRule(), initial_step=1.0, fixed_step=0.25)
    fixed.run(2)
    first = -0.25 * g
    torch.testing.assert_close(fixed.d, first - 0.25 * (g + matrix @ first), rtol=0.0,
                               atol=1e-14 * float(g.norm()))
    assert fixed.last_step == 0.5 and fixed.next_step == 1.0  # untouched by fixed steps
    loss.products = 0
    failing = GradientDescentArmijo(loss, armijo=ArmijoRule(max_backtracks=2),
                                    initial_step=1e6)
    assert failing.run(3) == 0 and failing.stopped == "line search failed"
    assert torch.equal(failing.d, torch.zeros_like(g)) and loss.products == 1


def test_armijo_backtrack() -> None:
    rule = ArmijoRule(c=0.1, beta=0.5, max_backtracks=10)

    def phi(alpha: float) -> float:
        return (alpha - 1.0) ** 2 - 1.0  # f0 = 0, ‖∇‖² = 4 with ∇ = −2 along α

    result = armijo_backtrack(phi, 0.0, 4.0, 8.0, rule)
    # 8 and 4 fail (63, 8 > −3.2, −1.6); 2 gives 0 > −0.8 fails; 1 gives −1 ≤ −0.4: accepted.
    assert (result.step, result.value, result.trials, result.accepted) == (1.0, -1.0, 4, True)
    nan = armijo_backtrack(lambda a: math.nan if a > 0.5 else phi(a), 0.0, 4.0, 8.0, rule)
    assert nan.accepted and nan.step == 0.5
    failed = armijo_backtrack(lambda a: 1.0, 0.0, 4.0, 8.0, rule)
    assert not failed.accepted and failed.trials == 10 and failed.value == 0.0
