"""The paper's baselines on the pipeline (spec §6) against direct single-process computations.

CGBlock's block-Hessian products and CG iterates against the dense Hessian of the whole
network (torch.func on the stages chained by hand), SSO's surrogate, its gradient and its
iterates against q written from the spec, and the pass and product counts of the records.
None of the references below calls sm_dist's math: they use only torch and the stage modules'
layout (copied before training, evaluated with torch.func.functional_call).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from sm_dist.config.build import build_local_pipeline, load_job_data
from sm_dist.config.job import job_from_dict
from sm_dist.data.batches import split_microbatches
from sm_dist.optim.cgblock import tangent_pass
from sm_dist.optim.sso import SURROGATE
from sm_dist.run.metrics import IterationRecord
from sm_dist.run.trainer import train
from tests.conftest import synthetic_job

CPU = torch.device("cpu")
L_CROSS_ENTROPY = 0.5  # largest eigenvalue bound of diag(p) − ppᵀ, per sample

MODELS: dict[str, dict[str, Any]] = {
    "tanh-1layer": {"mlp": {"widths": [6, 5, 4, 3], "activation": "tanh"}, "balance": [1, 1, 1]},
    "relu-1layer": {"mlp": {"widths": [6, 5, 4, 3], "activation": "relu"}, "balance": [1, 1, 1]},
    "tanh-2layer": {"mlp": {"widths": [6, 5, 5, 4, 3], "activation": "tanh"},
                    "balance": [2, 1, 1]},
    "relu-2layer": {"mlp": {"widths": [6, 5, 5, 4, 3], "activation": "relu"},
                    "balance": [2, 1, 1]},
}


# ------------------------------------------------------------------------ direct references
class DenseNet:
    """The pipeline's network as a function of one flat θ (stage 0's parameters first),
    evaluated with functional_call on copies of the stage modules chained in order."""

    def __init__(self, pipeline: Any) -> None:
        self.modules = [copy.deepcopy(stage.module) for stage in pipeline.stages]
        self.layout = [[(name, p.shape, p.numel()) for name, p in m.named_parameters()]
                       for m in self.modules]
        self.sizes = [sum(k for _, _, k in layout) for layout in self.layout]
        self.offsets = [sum(self.sizes[:s]) for s in range(len(self.sizes) + 1)]

    def block(self, s: int) -> slice:
        return slice(self.offsets[s], self.offsets[s + 1])

    def out(self, theta: Tensor, x: Tensor) -> Tensor:
        z, offset = x, 0
        for module, layout in zip(self.modules, self.layout):
            params = {}
            for name, shape, k in layout:
                params[name] = theta[offset:offset + k].view(shape)
                offset += k
            z = functional_call(module, params, (z,))
        return z

    def h(self, x: Tensor, y: Tensor):
        """h(θ) = mean cross-entropy over the batch."""
        return lambda theta: F.cross_entropy(self.out(theta, x), y)


def pipeline_theta(pipeline: Any) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for st in pipeline.stages for p in st.params])


def pipeline_grad(pipeline: Any) -> Tensor:
    return torch.cat([p.grad.detach().reshape(-1).clone()
                      for st in pipeline.stages for p in st.params])


def set_pipeline_theta(pipeline: Any, theta: Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for stage in pipeline.stages:
            for p in stage.params:
                p.copy_(theta[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


def surrogate_direct(net: DenseNet, theta_t: Tensor, x: Tensor, y: Tensor, scale: float = 1.0):
    """q(θ) = ⟨∇ℓ(z_p^t), f(θ) − z_p^t⟩ + (1/2η)‖f(θ) − z_p^t‖², 1/η = scale·L_loss/n, with
    ∇ℓ(z_p^t) the gradient of the mean loss with respect to the network output at θ_t."""
    z_t = net.out(theta_t, x).detach()
    g = torch.func.grad(lambda z: F.cross_entropy(z, y))(z_t)
    inv_eta = scale * L_CROSS_ENTROPY / len(x)

    def q(theta: Tensor) -> Tensor:
        r = net.out(theta, x) - z_t
        return (g * r).sum() + 0.5 * inv_eta * (r * r).sum()

    return q


def reference_cg(hess: Tensor, grad: Tensor, steps: int, tol: float) -> dict[str, Any]:
    """Textbook CG on H d = −g from d = 0: at most `steps` products; stops when ‖r‖ ≤ tol‖g‖
    or when pᵀHp ≤ 0 (keeping the iterate). `first_negative` flags pᵀHp ≤ 0 at the first step
    (where the implementation takes an Armijo gradient step instead)."""
    d = torch.zeros_like(grad)
    r = -grad.clone()
    p = r.clone()
    rr = float(r @ r)
    g_norm = math.sqrt(rr)
    products = taken = 0
    stopped, first_negative = None, False
    for i in range(steps):
        hp = hess @ p
        products += 1
        curvature = float(p @ hp)
        if curvature <= 0.0:
            first_negative = i == 0
            stopped = "negative curvature"
            break
        alpha = rr / curvature
        d = d + alpha * p
        r = r - alpha * hp
        rr_next = float(r @ r)
        taken += 1
        if math.sqrt(rr_next) <= tol * g_norm:
            stopped = "converged"
            break
        p = r + (rr_next / rr) * p
        rr = rr_next
    return {"d": d, "products": products, "steps": taken, "stopped": stopped,
            "first_negative": first_negative}


def make(model: str, optimizer: dict[str, Any], microbatches: int = 2, iterations: int = 1,
         **extra: Any):
    job = job_from_dict(synthetic_job(
        model=MODELS[model], optimizer=optimizer, data={"microbatches": microbatches},
        run={"iterations": iterations, "eval_every": 0}, **extra))
    data = load_job_data(job)
    return job, build_local_pipeline(job, CPU), data


def close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """‖actual − expected‖ ≤ rtol·‖expected‖ (plus a tiny absolute floor)."""
    err = float((actual - expected).norm())
    assert err <= rtol * float(expected.norm()) + 1e-14, (err, float(expected.norm()))


# ----------------------------------------------------------------------- 1. CGBlock products
@pytest.mark.parametrize(("model", "microbatches"), [
    ("tanh-1layer", 2), ("relu-1layer", 3), ("tanh-2layer", 3), ("relu-2layer", 2)])
def test_cgblock_tangent_pass_gives_each_stages_diagonal_hessian_block(
        model: str, microbatches: int) -> None:
    """Each stage's rule.take_block_product() after one tangent pass against H_ss v_s, H_ss the
    diagonal block of the dense Hessian of the whole network's mean loss (and not (H v)_s)."""
    _, pipeline, data = make(model, {"name": "cgblock", "inner_steps": 3}, microbatches)
    x, y, n = data.train_x, data.train_y, len(data.train_x)
    net = DenseNet(pipeline)
    theta = pipeline_theta(pipeline)
    hess = torch.func.hessian(net.h(x, y))(theta)
    pipeline.forward_backward(split_microbatches(x, y, microbatches), n, same_batch=False)
    close(pipeline_grad(pipeline), torch.func.grad(net.h(x, y))(theta), 1e-12)

    gen = torch.Generator().manual_seed(7)
    directions = [torch.randn(k, generator=gen, dtype=torch.float64) for k in net.sizes]
    for stage, v in zip(pipeline.stages, directions):
        stage.optimizer.begin()
        stage.optimizer.solver.p = v.clone()
    pipeline.perform([tangent_pass(microbatches)] * len(pipeline.stages))
    full = hess @ torch.cat(directions)
    for s, (stage, v) in enumerate(zip(pipeline.stages, directions)):
        product = stage.optimizer.take_block_product()
        block = hess[net.block(s), net.block(s)]
        close(product, block @ v, 1e-9)
        # The off-diagonal blocks H_{s,s'} v_{s'} are not in it: it is not (H v)_s.
        assert float((product - full[net.block(s)]).norm()) > 0.1 * float(product.norm())
    if MODELS[model]["balance"][0] == 2:  # the two-layer stage's block is indefinite
        eig = torch.linalg.eigvalsh(hess[net.block(0), net.block(0)])
        assert eig[0] < -1e-3 and eig[-1] > 1e-3, eig


# ----------------------------------------------------------------------- 2. CGBlock CG steps
@pytest.mark.parametrize(("model", "steps", "microbatches"), [
    ("tanh-1layer", 1, 2),
    ("tanh-1layer", 3, 3),  # stages 0 and 1 meet pᵀHp ≤ 0 at their second step
    ("relu-1layer", 4, 2),
    ("tanh-2layer", 2, 3),
    ("relu-2layer", 3, 2),
])
def test_cgblock_iteration_is_plain_cg_on_each_dense_block(
        model: str, steps: int, microbatches: int) -> None:
    """Parameters after one CGBlock iteration against θ_0 + d_s, d_s from `steps` steps of
    textbook CG on H_ss d = −g_s with the dense block; steps and stop reasons too."""
    job, pipeline, data = make(model, {"name": "cgblock", "inner_steps": steps}, microbatches)
    x, y = data.train_x, data.train_y
    net = DenseNet(pipeline)
    theta0 = pipeline_theta(pipeline)
    hess = torch.func.hessian(net.h(x, y))(theta0)
    grad = torch.func.grad(net.h(x, y))(theta0)
    refs = [reference_cg(hess[net.block(s), net.block(s)], grad[net.block(s)], steps,
                         job.optimizer.cg_tol) for s in range(len(net.sizes))]
    assert not any(ref["first_negative"] for ref in refs), "pick a case without the fallback"

    records = train(job, pipeline, data, lambda r: None)
    expected = torch.cat([theta0[net.block(s)] + ref["d"] for s, ref in enumerate(refs)])
    theta1 = pipeline_theta(pipeline)
    for s in range(len(net.sizes)):
        close(theta1[net.block(s)], expected[net.block(s)], 1e-8)
    assert records[0].metric("inner_steps") == [ref["steps"] for ref in refs]
    assert records[0].metric("inner_stopped") == [ref["stopped"] for ref in refs]
    for s, ref in enumerate(refs):  # local_loss: the block model m_s(d_s) = g_sᵀd + ½dᵀH_ss d
        g_s, h_ss, d = grad[net.block(s)], hess[net.block(s), net.block(s)], ref["d"]
        model_value = float(g_s @ d + 0.5 * d @ (h_ss @ d))
        assert records[0].metric("local_loss")[s] == pytest.approx(model_value, rel=1e-8, abs=1e-14)


def test_cgblock_first_step_negative_curvature_takes_one_armijo_gradient_step() -> None:
    """Second CGBlock iteration, where stage 0 meets pᵀH_00p ≤ 0 at once: θ_2 against
    θ_1 − armijo_init·g_0 on that stage (the first Armijo trial is accepted when the curvature
    along −g is ≤ 0) and θ_1 + d_s from dense CG on the others."""
    steps, tol, init = 6, 0.3, 0.7
    job, pipeline, data = make("tanh-1layer", {"name": "cgblock", "inner_steps": steps,
                                               "cg_tol": tol, "armijo_init": init}, 3, 2)
    x, y = data.train_x, data.train_y
    net = DenseNet(pipeline)
    theta = pipeline_theta(pipeline)
    fallbacks = []
    for _ in range(2):
        hess = torch.func.hessian(net.h(x, y))(theta)
        grad = torch.func.grad(net.h(x, y))(theta)
        steps_taken = []
        for s in range(len(net.sizes)):
            ref = reference_cg(hess[net.block(s), net.block(s)], grad[net.block(s)], steps, tol)
            d = -init * grad[net.block(s)] if ref["first_negative"] else ref["d"]
            steps_taken.append(d)
            fallbacks.append(ref["first_negative"])
        theta = theta + torch.cat(steps_taken)
    assert fallbacks == [False, False, False, True, False, False]
    records = train(job, pipeline, data, lambda r: None)
    close(pipeline_theta(pipeline), theta, 1e-8)
    assert records[1].metric("inner_steps")[0] == 1
    assert records[1].metric("inner_stopped")[0] == "negative curvature"


# ------------------------------------------------------------------- 3. SSO surrogate pass
@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize(("model", "microbatches"), [("tanh-1layer", 3), ("relu-2layer", 2)])
def test_sso_surrogate_pass_value_and_gradient_match_direct_q(
        model: str, microbatches: int, scale: float) -> None:
    """The surrogate pass's loss and every p.grad at a perturbed θ against q(θ) and ∇q(θ)
    written from the spec (anchor z_p^t, ∇ℓ(z_p^t) from θ_t, 1/η = sso_scale·L/n)."""
    _, pipeline, data = make(model, {"name": "sso", "inner_steps": 1, "sso_scale": scale},
                             microbatches)
    x, y, n = data.train_x, data.train_y, len(data.train_x)
    mbs = split_microbatches(x, y, microbatches)
    net = DenseNet(pipeline)
    theta_t = pipeline_theta(pipeline)
    pipeline.forward_backward(mbs, n, same_batch=False)  # stores the anchor on the last stage
    pipeline.end_iteration()  # clears p.grad; the anchor stays

    gen = torch.Generator().manual_seed(3)
    theta = theta_t + 0.3 * torch.randn(theta_t.shape, generator=gen, dtype=torch.float64)
    set_pipeline_theta(pipeline, theta)
    q = surrogate_direct(net, theta_t, x, y, scale)
    result = pipeline.forward_backward(mbs, n, top=SURROGATE, iteration=1)
    expected = float(q(theta))
    assert abs(expected) > 1e-3  # a real test: θ is far enough from θ_t
    assert result.loss == pytest.approx(expected, rel=1e-11, abs=1e-14)
    close(pipeline_grad(pipeline), torch.func.grad(q)(theta), 1e-10)


@pytest.mark.parametrize("model", ["tanh-1layer", "relu-2layer"])
def test_sso_surrogate_at_anchor_is_zero_with_the_loss_gradient(model: str) -> None:
    """The surrogate pass at θ_t against q(θ_t) = 0 and ∇q(θ_t) = ∇h(θ_t) (dense, and the
    iteration's own backward)."""
    _, pipeline, data = make(model, {"name": "sso", "inner_steps": 1, "sso_scale": 3.0}, 3)
    x, y, n = data.train_x, data.train_y, len(data.train_x)
    mbs = split_microbatches(x, y, 3)
    net = DenseNet(pipeline)
    theta_t = pipeline_theta(pipeline)
    pipeline.forward_backward(mbs, n, same_batch=False)
    backward_grad = pipeline_grad(pipeline)
    pipeline.end_iteration()
    result = pipeline.forward_backward(mbs, n, top=SURROGATE, iteration=1)
    assert abs(result.loss) <= 1e-15
    dense_grad = torch.func.grad(net.h(x, y))(theta_t)
    close(pipeline_grad(pipeline), dense_grad, 1e-12)
    close(backward_grad, dense_grad, 1e-12)
    assert float(surrogate_direct(net, theta_t, x, y, 3.0)(theta_t)) == 0.0


# ------------------------------------------------------------------------ 4. SSO iterates
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_sso_fixed_step_iterates_match_direct_gradient_steps_on_q(scale: float) -> None:
    """θ after each of 2 SSO iterations (inner_lr 0.5, 3 inner steps) against 3 steps
    θ ← θ − 0.5∇q_t(θ) on q_t built directly at θ_t."""
    lr, inner, iterations = 0.5, 3, 2
    job, pipeline, data = make("tanh-1layer", {"name": "sso", "inner_steps": inner,
                                               "inner_lr": lr, "sso_scale": scale},
                               3, iterations)
    x, y = data.train_x, data.train_y
    net = DenseNet(pipeline)
    theta = pipeline_theta(pipeline)
    snapshots: list[Tensor] = []  # θ_{t+1}, taken when iteration t's record is first out
    train(job, pipeline, data, lambda r: None,
          on_progress=lambda r: snapshots.append(pipeline_theta(pipeline)))
    assert len(snapshots) == iterations
    for t in range(iterations):
        q = surrogate_direct(net, theta.detach(), x, y, scale)
        for _ in range(inner):
            theta = theta - lr * torch.func.grad(q)(theta)
        close(snapshots[t], theta, 1e-10)


# -------------------------------------------------------------------- 5. SSO with Armijo
@pytest.mark.parametrize("model", ["tanh-1layer", "relu-2layer"])
def test_sso_armijo_predicted_decrease_is_q_and_bounds_the_actual_decrease(model: str) -> None:
    """Each record's predicted_decrease against q_t(θ_{t+1}) computed directly (≤ 0), and
    h(θ_{t+1}) − h(θ_t) ≤ q_t(θ_{t+1}) (q is an upper model with sso_scale 1, L = 1/2)."""
    iterations = 3
    job, pipeline, data = make(model, {"name": "sso", "inner_steps": 3}, 2, iterations)
    x, y = data.train_x, data.train_y
    net = DenseNet(pipeline)
    h = net.h(x, y)
    thetas = [pipeline_theta(pipeline)]
    records = train(job, pipeline, data, lambda r: None,
                    on_progress=lambda r: thetas.append(pipeline_theta(pipeline)))
    assert len(thetas) == iterations + 1
    for t, record in enumerate(records):
        q = surrogate_direct(net, thetas[t], x, y)
        predicted = float(q(thetas[t + 1]))
        assert record.predicted_decrease == pytest.approx(predicted, rel=1e-10, abs=1e-14)
        assert record.predicted_decrease < 0.0
        actual = float(h(thetas[t + 1]) - h(thetas[t]))
        assert actual <= predicted + 1e-12, (actual, predicted)
        assert record.train_loss == pytest.approx(float(h(thetas[t])), rel=1e-12)
        if t + 1 < len(records):
            assert records[t + 1].actual_decrease_prev == pytest.approx(actual, abs=1e-12)


# ------------------------------------------------------------------------ 6. cost accounting
def deltas(records: list[IterationRecord], key: str) -> list[Any]:
    """Per-iteration increase of a cumulative record field (a number or a per-stage list)."""
    out, previous = [], None
    for r in records:
        value = getattr(r, key)
        if isinstance(value, list):
            base = previous if previous is not None else [0] * len(value)
            out.append([a - b for a, b in zip(value, base)])
        else:
            out.append(value - (previous if previous is not None else 0))
        previous = value
    return out


@pytest.mark.parametrize("inner", [1, 3])
def test_sso_armijo_pass_counts(inner: int) -> None:
    """SSO with Armijo: backward passes per iteration against inner_steps (own backward plus
    inner_steps − 1 surrogate passes), forward passes against backward + line_search_trials."""
    job, pipeline, data = make("tanh-1layer", {"name": "sso", "inner_steps": inner}, 2, 3)
    records = train(job, pipeline, data, lambda r: None)
    for r, backward, forward in zip(records, deltas(records, "backward_passes"),
                                    deltas(records, "forward_passes")):
        assert r.metric("inner_stopped") == [None] * 3 and r.metric("inner_steps") == [inner] * 3
        assert backward == inner
        assert forward == backward + r.metric("line_search_trials")
        assert r.metric("line_search_trials") >= inner
        assert r.tangent_passes == 0 and r.hvp_products == [0, 0, 0]


def test_sso_fixed_step_pass_counts() -> None:
    """SSO with inner_lr: forward and backward passes per iteration both against inner_steps."""
    job, pipeline, data = make("tanh-1layer", {"name": "sso", "inner_steps": 3, "inner_lr": 0.5},
                               2, 2)
    records = train(job, pipeline, data, lambda r: None)
    assert deltas(records, "backward_passes") == [3, 3]
    assert deltas(records, "forward_passes") == [3, 3]
    assert all(r.metric("line_search_trials") == 0 for r in records)


@pytest.mark.parametrize(("model", "steps", "tol", "microbatches"), [
    ("tanh-1layer", 6, 0.3, 3),  # stages stop after different numbers of products
    ("tanh-2layer", 5, 1e-10, 2),
])
def test_cgblock_tangent_and_product_counts(model: str, steps: int, tol: float,
                                            microbatches: int) -> None:
    """CGBlock over 2 iterations: tangent_passes per iteration against the most products any
    stage's dense reference CG needs, hvp_products[s] against Σ_{s' ≤ s} products(s') × M."""
    job, pipeline, data = make(model, {"name": "cgblock", "inner_steps": steps, "cg_tol": tol},
                               microbatches, 2)
    x, y = data.train_x, data.train_y
    net = DenseNet(pipeline)
    theta = pipeline_theta(pipeline)
    expected_tangents, expected_hvp = [], []
    for t in range(2):
        hess = torch.func.hessian(net.h(x, y))(theta)
        grad = torch.func.grad(net.h(x, y))(theta)
        refs = [reference_cg(hess[net.block(s), net.block(s)], grad[net.block(s)], steps, tol)
                for s in range(len(net.sizes))]
        products = [ref["products"] for ref in refs]
        expected_tangents.append(max(products))
        expected_hvp.append([sum(products[:s + 1]) * microbatches for s in range(len(products))])
        if t == 0:  # θ_1 from the reference (only needed where no fallback step was taken)
            assert not any(ref["first_negative"] for ref in refs)
            theta = theta + torch.cat([ref["d"] for ref in refs])
    records = train(job, pipeline, data, lambda r: None)
    assert deltas(records, "tangent_passes") == expected_tangents
    assert deltas(records, "hvp_products") == expected_hvp
    # The case is informative: some stage stopped before another.
    assert any(len(set(row)) > 1 for row in deltas(records, "hvp_products"))
    assert deltas(records, "forward_passes") == [1, 1]
    assert deltas(records, "backward_passes") == [1, 1]


def test_sm_hvp_products_are_the_cumulative_psi_products() -> None:
    """SM: hvp_products of each record against the running sum of psi_products."""
    job, pipeline, data = make("tanh-2layer", {"name": "sm", "inner_steps": 3}, 2, 3)
    records = train(job, pipeline, data, lambda r: None)
    total = [0, 0, 0]
    for r in records:
        total = [a + b for a, b in zip(total, r.metric("psi_products"))]
        assert r.hvp_products == total
        assert r.tangent_passes == 0
    assert all(v > 0 for v in total)


@pytest.mark.parametrize("optimizer", [
    {"name": "adam", "lr": 0.01}, {"name": "gd_armijo"}, {"name": "ddg", "lr": 0.3}])
def test_first_order_baselines_count_no_second_order_products(optimizer: dict) -> None:
    """adam, gd_armijo, ddg: hvp_products against all zeros and tangent_passes against 0."""
    job, pipeline, data = make("tanh-1layer", optimizer, 2, 3)
    records = train(job, pipeline, data, lambda r: None)
    assert len(records) == 3
    for r in records:
        assert r.hvp_products == [0, 0, 0]
        assert r.tangent_passes == 0
    assert deltas(records, "backward_passes") == [1, 1, 1]
