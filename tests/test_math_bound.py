"""Σ_s L_s bounds h to second order on tanh networks (spec §3, property 5)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from sm_dist.config.build import build_local_pipeline, load_job_data
from sm_dist.data.batches import split_microbatches
from sm_dist.models.build import split_stages
from sm_dist.optim.sm import SMStageOptimizer
from tests.helpers_math import (
    DTYPE,
    as_matrix,
    flat,
    make_job,
    mean_loss_of_theta,
    randn,
    seeded,
    tiny_mlp,
)
from tests.helpers_stages import exact_local_losses

SAMPLES = 6


def scale_weights(modules: list[nn.Module], norm: float) -> None:
    """Every Linear weight rescaled to spectral norm `norm` (tanh in its nonlinear range)."""
    with torch.no_grad():
        for module in modules:
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    layer.weight.mul_(norm / torch.linalg.matrix_norm(layer.weight, 2))


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("damping", [(0.3, 0.0), (0.0, 0.01)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blockdiag_local_hessians_dominate_network_hessian(granularity: str,
                                                           damping: tuple[float, float],
                                                           seed: int) -> None:
    """blockdiag(𝓗_1..𝓗_p) − ∇²h(θ_t) ⪰ 0 and Σ_s ∇L_s(0) = ∇h, on a 3-stage tanh network."""
    model = tiny_mlp([3, 4, 4, 3], "tanh", seed, weight_norm=2.0)
    stages = split_stages(model, [1, 1, 1])
    gen = seeded(seed + 7)
    x = randn(SAMPLES, 3, gen=gen)
    y = torch.randint(3, (SAMPLES,), generator=gen)
    h = mean_loss_of_theta(model, x, y)
    theta = flat(list(model.parameters()))
    grad_h = torch.func.jacrev(h)(theta)
    hess_h = torch.func.hessian(h)(theta)

    rel, absolute = damping
    losses = exact_local_losses(stages, x, y, granularity=granularity, delta_rel=rel,
                                delta_abs=absolute)
    torch.testing.assert_close(torch.cat([loss.grad for loss in losses]), grad_h,
                               rtol=1e-12, atol=1e-15)
    blocks = torch.block_diag(*[as_matrix(loss) for loss in losses])
    gap = blocks - hess_h
    asymmetry = float((gap - gap.T).abs().max())
    assert asymmetry <= 1e-12 * float(blocks.abs().max())
    assert float(torch.linalg.eigvalsh(0.5 * (gap + gap.T)).min()) >= -1e-10
    # The coupling term is what makes it a bound: without it the test above fails.
    control = torch.block_diag(*[as_matrix(loss) for loss in exact_local_losses(
        stages, x, y, coupling=False, granularity=granularity, delta_rel=rel,
        delta_abs=absolute)])
    assert float(torch.linalg.eigvalsh(control - hess_h).min()) < -0.05


def third_derivative_along(h, theta: Tensor, r: Tensor) -> float:
    """d³/dε³ h(θ + εr) at ε = 0."""
    def along(eps: Tensor) -> Tensor:
        return h(theta + eps * r)

    third = torch.func.grad(torch.func.grad(torch.func.grad(along)))
    return float(third(torch.zeros((), dtype=DTYPE)))


@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_local_losses_bound_the_loss_change(granularity: str) -> None:
    """h(θ_t + εr) − h(θ_t) ≤ Σ_s L_s(εr_s) + O(ε³), with the pipeline's own local losses.

    gap(ε) = h(θ_t + εr) − h(θ_t) − Σ_s L_s(εr_s) must expand as a₂ε² + a₃ε³ + O(ε⁴) with
    a₂ = −½ rᵀ(blockdiag 𝓗 − ∇²h) r ≤ 0 and a₃ = h'''/6: the first-order terms cancel exactly
    and the quadratic ones leave a non-positive remainder.
    """
    job = make_job(model={"mlp": {"widths": [3, 4, 4, 3]}},
                   data={"microbatches": 2, "synthetic": {"features": 3, "train_size": SAMPLES}},
                   optimizer={"curvature": granularity, "power_iterations": 300})
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    modules = [stage.module for stage in pipeline.stages]
    scale_weights(modules, 2.0)
    data = load_job_data(job)
    x, y = data.train_x, data.train_y
    pipeline.forward_backward(split_microbatches(x, y, 2), len(x), False)
    losses = []
    for stage in pipeline.stages:
        assert isinstance(stage.optimizer, SMStageOptimizer)
        stage.optimizer.begin()
        assert stage.optimizer.solver is not None
        losses.append(stage.optimizer.solver.loss)
    sizes = [loss.dim for loss in losses]

    model = nn.Sequential(*modules)
    h = mean_loss_of_theta(model, x, y)
    theta = flat(list(model.parameters()))
    h0 = float(h(theta))
    blocks = torch.block_diag(*[as_matrix(loss) for loss in losses])
    gap_matrix = blocks - torch.func.hessian(h)(theta)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (gap_matrix + gap_matrix.T))
    assert float(eigenvalues.min()) >= -1e-10  # power iteration converged: still a bound

    worst = eigenvectors[:, 0]  # the direction where the bound is tightest
    random = randn(theta.numel(), gen=seeded(5))
    for r in (worst, random / random.norm()):
        a2 = -0.5 * float(r @ gap_matrix @ r)
        a3 = third_derivative_along(h, theta, r) / 6.0
        assert a2 <= 1e-12
        remainders = []
        for k in range(3, 10):
            eps = 2.0 ** -k
            model_change = 0.0
            for loss, part in zip(losses, (eps * r).split(sizes)):
                model_change += loss.value(part, loss.hvp(part))
            gap = float(h(theta + eps * r)) - h0 - model_change
            assert gap <= a2 * eps**2 + (abs(a3) + 1.0) * eps**3
            remainders.append((eps, abs(gap - a2 * eps**2 - a3 * eps**3)))
        # The remainder after the cubic term is O(ε⁴) (down to float64 round-off of h).
        eps0, first = remainders[0]
        for eps, remainder in remainders[1:]:
            assert remainder <= 2.0 * first * (eps / eps0) ** 4 + 1e-14
