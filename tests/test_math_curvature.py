"""Curvature sent down a stage: power iteration, damping, granularity, L_loss (spec §2, §4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sm_dist.config.build import build_local_pipeline, load_job_data
from sm_dist.data.batches import split_microbatches
from sm_dist.math import curvature
from sm_dist.math.curvature import (
    damped_curvature,
    initial_vectors,
    normalize_rows,
    power_iteration,
    reduce_eigenvalues,
)
from sm_dist.math.losses import get_loss, top_of_pipeline
from sm_dist.math.stage_function import StageFunction
from sm_dist.pipeline.local import LocalPipeline
from tests.helpers_math import (
    ACTIVATIONS,
    DTYPE,
    make_job,
    per_sample_blocks,
    psi_hessian,
    randn,
    seeded,
    tiny_mlp,
)


def dense_stage_eigenvalues(activation: str, seed: int = 0, samples: int = 6):
    """A tanh/relu/gelu stage 3 → 5 with g small next to c (H_zz dominated by c·JᵀJ ⪰ 0)."""
    module = tiny_mlp([3, 5, 1], activation, seed)[0]
    gen = seeded(seed + 100)
    z_in = randn(samples, 3, gen=gen)
    g = 0.1 * randn(samples, 5, gen=gen) / samples
    c = (0.5 + torch.rand(samples, generator=gen, dtype=DTYPE)) / samples
    hzz = psi_hessian(module, z_in, g, c)[:z_in.numel(), :z_in.numel()]
    eigs = [torch.linalg.eigvalsh(b) for b in per_sample_blocks(hzz, samples)]
    fn = StageFunction.build(module, z_in, g, c)
    return fn, z_in, eigs


def block_stack_operator(blocks: Tensor):
    """H_zz for per-sample dense blocks (samples, w, w), with a product counter."""
    calls = [0]

    def hzz(u: Tensor) -> Tensor:
        calls[0] += 1
        return torch.einsum("kij,kj->ki", blocks, u)

    return hzz, calls


# ------------------------------------------------------------------ 4. power iteration
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_power_iteration_converges_to_dense_eigenvalues(activation: str) -> None:
    fn, z_in, eigs = dense_stage_eigenvalues(activation)
    magnitudes = [e.abs().sort(descending=True).values for e in eigs]
    exact = torch.stack([m[0] for m in magnitudes])
    gaps = torch.stack([m[1] / m[0] for m in magnitudes])
    assert float(gaps.max()) < 0.9  # a clear dominant eigenvalue per sample: 100 rounds suffice
    assert all(float(e[-1]) == float(e.abs().max()) for e in eigs)  # PSD-dominant: λ_max > 0

    start = initial_vectors(z_in, seeded(1))
    torch.testing.assert_close(start.norm(dim=1), torch.ones(len(z_in), dtype=DTYPE))
    before = fn.products
    lam, vectors = power_iteration(fn.hvp_zz, start, rounds=100)
    assert fn.products - before == 100  # one Ψ product per round for all samples together
    torch.testing.assert_close(lam, exact, rtol=1e-10, atol=0.0)
    # The vectors reached are unit eigenvectors of each sample's block.
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(z_in), dtype=DTYPE))
    hv = fn.hvp_zz(vectors)
    torch.testing.assert_close(hv, exact[:, None] * vectors, rtol=0.0,
                               atol=1e-6 * float(exact.max()))

    # Warm start from those vectors: one round is already exact; a cold start is far off.
    warm, _ = power_iteration(fn.hvp_zz, vectors, rounds=1)
    torch.testing.assert_close(warm, exact, rtol=1e-10, atol=0.0)

    def rounds_to_converge(begin: Tensor) -> int:
        for rounds in range(1, 101):
            got, _ = power_iteration(fn.hvp_zz, begin, rounds)
            if torch.allclose(got, exact, rtol=1e-8, atol=0.0):
                return rounds
        return 101

    cold_rounds = rounds_to_converge(start)
    assert rounds_to_converge(vectors) == 1 < cold_rounds <= 100
    # Rayleigh quotients never exceed the spectral radius (up to round-off).
    cold, _ = power_iteration(fn.hvp_zz, start, rounds=1)
    assert bool((cold <= exact * (1 + 1e-12)).all())
    assert float(((exact - cold) / exact).max()) > 1e-6


def test_power_iteration_absolute_value_and_dead_rows() -> None:
    """Dominant negative eigenvalue: λ = |λ_min| ≥ λ_max; a zero block keeps λ = 0, its vector."""
    gen = seeded(2)
    q, _ = torch.linalg.qr(randn(3, 3, gen=gen))
    negative = q @ torch.diag(torch.tensor([-4.0, 1.0, 0.5], dtype=DTYPE)) @ q.T
    positive = q @ torch.diag(torch.tensor([3.0, -1.0, 0.25], dtype=DTYPE)) @ q.T
    blocks = torch.stack([negative, positive, torch.zeros(3, 3, dtype=DTYPE)])
    hzz, calls = block_stack_operator(blocks)
    start = normalize_rows(randn(3, 3, gen=gen))
    lam, vectors = power_iteration(hzz, start, rounds=200)
    assert calls[0] == 200
    torch.testing.assert_close(lam, torch.tensor([4.0, 3.0, 0.0], dtype=DTYPE), rtol=1e-12,
                               atol=0.0)
    assert torch.equal(vectors[2], start[2])  # a dead row keeps its start vector
    # normalize_rows leaves zero rows at zero instead of dividing by zero.
    assert torch.equal(normalize_rows(torch.zeros(2, 3, dtype=DTYPE)),
                       torch.zeros(2, 3, dtype=DTYPE))


def test_power_iteration_overwrites_only_its_own_products() -> None:
    """It normalises each product in place: a product that is its input (an identity) or a
    broadcast view must come out right, and the caller's start must stay as it was."""
    start = randn(4, 3, gen=seeded(3))
    kept = start.clone()
    lam, vectors = power_iteration(lambda u: u, start, rounds=3)  # H_zz = I
    assert torch.equal(start, kept)
    torch.testing.assert_close(lam, torch.ones(4, dtype=DTYPE), rtol=1e-15, atol=0.0)
    torch.testing.assert_close(vectors, normalize_rows(start), rtol=1e-15, atol=0.0)
    row = randn(1, 3, gen=seeded(4))
    lam, vectors = power_iteration(lambda u: row.expand_as(u), start, rounds=2)
    torch.testing.assert_close(vectors, normalize_rows(row).expand(4, 3), rtol=1e-15, atol=0.0)
    # Handed over, the start's buffer holds the result: the same values as a copy's.
    copy_result = power_iteration(lambda u: 2.0 * u, start, rounds=2)
    handed = start.clone()
    reused = power_iteration(lambda u: 2.0 * u, handed, rounds=2, reuse_start=True)
    assert reused[1].data_ptr() == handed.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(copy_result, reused))


def _top_stage_reference(pipeline: LocalPipeline, x: Tensor, y: Tensor,
                         microbatches: int) -> list[Tensor]:
    """Exact per-sample spectral radius of the top stage's H_zz, per microbatch."""
    first, top = pipeline.stages
    z1 = first.module(x).detach()
    n = len(x)
    with torch.no_grad():
        g = (F.softmax(top.module(z1), dim=1) - F.one_hot(y, 3).to(DTYPE)) / n
    out = []
    for zj, gj in zip(torch.tensor_split(z1, microbatches), torch.tensor_split(g, microbatches)):
        c = torch.full((len(zj),), 0.5 / n, dtype=DTYPE)
        hzz = psi_hessian(top.module, zj, gj, c)[:zj.numel(), :zj.numel()]
        blocks = per_sample_blocks(hzz, len(zj))
        out.append(torch.stack([torch.linalg.eigvalsh(b).abs().max() for b in blocks]))
    return out


@pytest.mark.parametrize("warm", [True, False])
def test_stage_warm_start_accumulates_rounds_on_the_same_batch(warm: bool) -> None:
    """Two rounds per backward: with warm starts repeated backwards on the same batch converge.

    delta_rel = 1, delta_abs = 0 makes the stage's δ equal its λ.
    """
    job = make_job(model={"mlp": {"widths": [4, 5, 4, 3]}, "balance": [1, 2]},
                   optimizer={"power_iterations": 2, "power_warm_start": warm,
                              "delta_rel": 1.0, "delta_abs": 0.0})
    pipeline = build_local_pipeline(job, torch.device("cpu"))
    data = load_job_data(job)
    x, y = data.train_x, data.train_y
    exact = _top_stage_reference(pipeline, x, y, 2)
    mbs = split_microbatches(x, y, 2)
    errors = []
    for _ in range(15):
        pipeline.forward_backward(mbs, len(x), True)
        deltas = pipeline.stages[-1].optimizer.deltas
        errors.append(max(float(((deltas[j] - exact[j]).abs() / exact[j]).max())
                          for j in range(2)))
        pipeline.end_iteration()  # no update: the same Ψ every time
    # One Ψ product per power round and microbatch; the first stage sends no curvature.
    assert pipeline.stages[-1].optimizer.psi_products == 15 * 2 * 2
    assert pipeline.stages[0].optimizer.psi_products == 0
    assert all(bool((deltas[j] <= exact[j] * (1 + 1e-12)).all()) for j in range(2))
    assert errors[0] > 1e-6  # two cold rounds are not enough here
    if warm:
        assert errors[-1] < 1e-10
    else:  # a fresh random start every time: two rounds never get there
        assert min(errors) > 1e-6


@pytest.mark.parametrize("granularity", ["microbatch", "batch"])
def test_pipeline_granularity_reduces_sample_eigenvalues(granularity: str) -> None:
    """The top stage's δ per microbatch / per batch is the max of the per-sample ones."""
    deltas = {}
    for mode in ("sample", granularity):
        job = make_job(data={"microbatches": 3}, optimizer={"curvature": mode})
        pipeline = build_local_pipeline(job, torch.device("cpu"))
        data = load_job_data(job)
        pipeline.forward_backward(split_microbatches(data.train_x, data.train_y, 3),
                                  len(data.train_x), False)
        deltas[mode] = [pipeline.stages[-1].optimizer.deltas[j] for j in range(3)]
    every = torch.cat(deltas["sample"])
    assert len(set(every.tolist())) == len(every)  # distinct per sample
    for j in range(3):
        top = every.max() if granularity == "batch" else deltas["sample"][j].max()
        assert torch.equal(deltas[granularity][j], top.expand_as(deltas["sample"][j]))


# ------------------------------------------------------------- top of the pipeline (CE)
@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0, 30.0])
def test_cross_entropy_curvature_bounds_per_sample_hessian(scale: float) -> None:
    """λ_max of the per-sample Hessian of h = (1/n)Σℓ in the logits is ≤ 1/(2n) = c_{p+1}."""
    n, classes = 200, 10
    gen = seeded(int(scale * 10))
    z = scale * randn(n, classes, gen=gen)
    y = torch.randint(classes, (n,), generator=gen)
    spec = get_loss("cross_entropy")
    top = top_of_pipeline(spec, z, y, n)
    torch.testing.assert_close(top.curvature, torch.full((n,), 0.5 / n, dtype=DTYPE),
                               rtol=0.0, atol=0.0)
    torch.testing.assert_close(top.grad, (F.softmax(z, 1) - F.one_hot(y, classes)) / n,
                               rtol=1e-12, atol=1e-17)
    assert float(top.loss) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-13)

    def one(zk: Tensor, yk: Tensor) -> Tensor:
        return spec.per_sample(zk[None], yk[None]).sum() / n

    hessians = torch.vmap(torch.func.hessian(one))(z, y)
    lam_max = torch.linalg.eigvalsh(hessians)[:, -1]
    assert bool((lam_max <= top.curvature * (1 + 1e-12)).all())


def test_cross_entropy_bound_is_tight() -> None:
    """Two equally likely classes give diag(p) − ppᵀ the eigenvalue 1/2: L_loss cannot be lower."""
    n = 4
    z = torch.full((n, 10), -60.0, dtype=DTYPE)
    z[:, :2] = 0.0
    y = torch.zeros(n, dtype=torch.int64)
    spec = get_loss("cross_entropy")
    hessian = torch.func.hessian(lambda zz: spec.per_sample(zz[None], y[:1]).sum() / n)(z[0])
    assert float(torch.linalg.eigvalsh(hessian)[-1]) == pytest.approx(0.5 / n, rel=1e-12)


def test_mse_curvature_is_its_exact_hessian() -> None:
    n, width = 5, 3
    gen = seeded(3)
    z = randn(n, width, gen=gen)
    y = torch.randint(width, (n,), generator=gen)
    spec = get_loss("mse")
    top = top_of_pipeline(spec, z, y, n)
    hessian = torch.func.hessian(lambda zz: spec.per_sample(zz, y).sum() / n)(z)
    expected = torch.eye(n * width, dtype=DTYPE).reshape(n, width, n, width) * top.curvature[0]
    torch.testing.assert_close(hessian, expected, rtol=1e-13, atol=0.0)
    assert float(top.curvature[0]) == pytest.approx(2.0 / (width * n), rel=1e-15)


# ------------------------------------------------------------- damping and granularity
def test_damped_curvature_formula_and_floor() -> None:
    lam = torch.tensor([0.0, 0.5, 2.0], dtype=DTYPE)
    c, delta = damped_curvature(lam, delta_rel=0.3, delta_abs=0.0, delta_floor=1e-12)
    torch.testing.assert_close(delta, torch.tensor([1e-12, 0.15, 0.6], dtype=DTYPE),
                               rtol=1e-15, atol=0.0)
    torch.testing.assert_close(c, lam + delta, rtol=0.0, atol=0.0)
    assert float(delta.min()) > 0.0
    c, delta = damped_curvature(lam, delta_rel=0.0, delta_abs=0.01, delta_floor=1e-12)
    torch.testing.assert_close(delta, torch.full((3,), 0.01, dtype=DTYPE), rtol=0.0, atol=0.0)
    torch.testing.assert_close(c, lam + 0.01, rtol=0.0, atol=0.0)
    c, delta = damped_curvature(torch.zeros(2, dtype=DTYPE), delta_rel=0.0, delta_abs=0.0,
                                delta_floor=1e-9)
    assert delta.tolist() == [1e-9, 1e-9] and c.tolist() == [1e-9, 1e-9]


def test_reduce_eigenvalues() -> None:
    lam = torch.tensor([0.2, 0.7, 0.1], dtype=DTYPE)
    assert torch.equal(reduce_eigenvalues(lam, "sample"), lam)
    for granularity in ("microbatch", "batch"):
        reduced = reduce_eigenvalues(lam, granularity)
        assert reduced.tolist() == [0.7, 0.7, 0.7]
        reduced[0] = 5.0  # an independent tensor, not a broadcast view of lam
        assert reduced.tolist() == [5.0, 0.7, 0.7] and lam.tolist() == [0.2, 0.7, 0.1]
    assert reduce_eigenvalues(torch.zeros(0, dtype=DTYPE), "microbatch").numel() == 0
    with pytest.raises(ValueError):
        reduce_eigenvalues(lam, "layer")



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(10, 20), (7, 3, 4, 4), (3, 100), (1, 5), (40, 6)])
def test_power_iteration_takes_row_dots_in_chunks_to_the_bit(monkeypatch: pytest.MonkeyPatch,
                                                             shape: tuple[int, ...],
                                                             dtype: torch.dtype) -> None:
    """The Rayleigh quotients' products taken a few rows at a time (in 8 pieces, and in
    pieces of one row) give each row's sum to the bit, so λ and the vectors do not change."""
    gen = torch.Generator().manual_seed(3)
    features = math.prod(shape[1:])
    blocks = torch.randn(shape[0], features, features, generator=gen, dtype=dtype)
    blocks = blocks + blocks.transpose(1, 2)

    def hzz(u: Tensor) -> Tensor:  # block-diagonal over samples
        return torch.bmm(blocks, u.reshape(shape[0], features, 1)).reshape(shape)

    start = torch.randn(shape, generator=gen, dtype=dtype)
    monkeypatch.setattr(curvature, "_DOT_PIECES", 1)
    whole = power_iteration(hzz, start, 4)
    for pieces in (8, shape[0]):
        monkeypatch.setattr(curvature, "_DOT_PIECES", pieces)
        chunked = power_iteration(hzz, start, 4)
        assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
