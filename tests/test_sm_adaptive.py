"""sm_adaptive: the scale rules on scripted measurements, Steihaug-Toint CG against dense
references, step acceptance leaving every stage exactly where it was (one process and the
engine), a loss that never rises, and the costs of the retries."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sm_dist.config.build import build_local_pipeline, build_stage_modules, load_job_data
from sm_dist.config.job import ConfigError, job_from_dict
from sm_dist.math.line_search import ArmijoRule
from sm_dist.math.solvers import TruncatedCG
from sm_dist.optim.step_scale import line_minimum, next_scale, retry_scale
from sm_dist.run.trainer import train
from tests.conftest import metric_rows, run_cli, run_here, synthetic_job, write_job
from tests.helpers_math import DTYPE, DenseLocalLoss, randn, seeded

CPU = torch.device("cpu")


# ------------------------------------------------------------------------- the scale rules
def test_line_minimum_of_a_measured_parabola() -> None:
    # h(α) = −α + α²/4 along d: slope −1; measured at α = 2: −1. Its minimum is at α = 2.
    assert line_minimum(2.0, -1.0, -1.0) == 2.0
    assert line_minimum(1.0, -1.0, -1.0) is None  # exactly linear: no minimum ahead
    assert line_minimum(1.0, -0.5, 0.3) is None  # d goes uphill


def test_the_ratio_rule_on_a_scripted_sequence() -> None:
    """Levenberg-Marquardt (Martens 2010 §4.1): ×3/2 above 3/4, ×2/3 below 1/4."""
    scale, seen = 1.0, []
    for ratio in (2.0, 1.9, 0.5, 0.1, 0.8, None):
        scale = next_scale("ratio", scale, -1.0, -1.0, ratio, start=1.0, growth=2.0,
                           largest=1e3)
        seen.append(scale)
    assert seen == [1.5, 2.25, 2.25, 1.5, 2.25, 2.25]


def test_the_secant_rule_on_a_scripted_sequence() -> None:
    """The line minimum the measurement implies, within ×/÷ growth, never above the largest."""
    common = {"start": 1.0, "growth": 2.0, "largest": 5.0}
    # Linear along d (the measured change is slope·α): no curvature seen, so grow.
    assert next_scale("secant", 1.0, -3.0, -3.0, 2.0, **common) == 2.0
    # h = −α + α²/4 measured at α = 3 (−0.75): minimum at 2.
    assert next_scale("secant", 3.0, -0.75, -1.0, None, **common) == 2.0
    # A step that did not raise h puts the minimum at α/2 or beyond: here 8/3.99.
    assert next_scale("secant", 4.0, -0.01, -1.0, None, **common) == 8 / 3.99
    # A minimum far above is clipped to ×2, then to the largest scale.
    assert next_scale("secant", 4.0, -3.99, -1.0, None, **common) == 5.0
    assert next_scale("secant", 4.0, 1.0, -1.0, None, **common) == 2.0  # a tolerated rise
    assert next_scale("fixed", 4.0, -1.0, -1.0, 1.0, **common) == 1.0


def test_retry_scale_after_a_rise() -> None:
    assert retry_scale(4.0, 1.0, -1.0) == 1.6  # h = −α + 0.3125α²: minimum at 1.6
    assert retry_scale(4.0, 100.0, -1.0) == 0.4  # the minimum (≈0.08) is below α/10: α/10
    assert retry_scale(4.0, 0.0, -1.0) == 2.0  # h(4) = h(0): minimum at 2 = α/2
    assert retry_scale(4.0, -0.5, -1.0) == 2.0  # would be above α/2: α/2
    assert retry_scale(4.0, None, -1.0) == 2.0  # non-finite loss: halve


# --------------------------------------------------------------------- trust-region CG
def indefinite_loss(dim: int = 6, seed: int = 3) -> DenseLocalLoss:
    gen = seeded(seed)
    q, _ = torch.linalg.qr(randn(dim, dim, gen=gen))
    spectrum = torch.tensor([-2.0, -0.5, 0.3, 1.0, 2.0, 4.0], dtype=DTYPE)[:dim]
    return DenseLocalLoss(q @ torch.diag(spectrum) @ q.T, randn(dim, gen=gen))


def steihaug(loss: DenseLocalLoss, radius: float, steps: int = 50) -> TruncatedCG:
    solver = TruncatedCG(loss, tol=1e-12, armijo=ArmijoRule(), fallback_step=1.0,  # type: ignore[arg-type]
                         radius=radius)
    values = [0.0]
    while solver.stopped is None and solver.steps < steps:
        solver.run(1)
        values.append(loss.exact_value(solver.d))
        assert values[-1] < values[-2] + 1e-15  # the model falls at every step
    return solver


def exact_tr_minimum(loss: DenseLocalLoss, radius: float) -> float:
    """min of the model over ‖d‖ ≤ radius, by bisection on the secular equation (dense)."""
    eigenvalues, vectors = torch.linalg.eigh(loss.matrix)
    gq = vectors.T @ loss.grad

    def step(shift: float) -> torch.Tensor:
        return -vectors @ (gq / (eigenvalues + shift))

    lo = max(0.0, -float(eigenvalues[0])) + 1e-12
    hi = lo + 1e6
    for _ in range(200):  # ‖d(shift)‖ = radius, shift > −λ_min
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(step(mid).norm()) > radius else (lo, mid)
    return loss.exact_value(step(hi))


@pytest.mark.parametrize("radius", [0.05, 0.3, 2.0])
def test_steihaug_cg_stays_inside_follows_negative_curvature_and_reduces_the_model(
        radius: float) -> None:
    loss = indefinite_loss()
    solver = steihaug(loss, radius)
    norm = float(solver.d.norm())
    assert norm <= radius * (1 + 1e-12)
    # On an indefinite model CG always ends on the boundary: at the radius, or along a
    # direction of negative curvature, which it follows out instead of stopping.
    assert solver.stopped in ("trust radius", "negative curvature")
    assert norm == pytest.approx(radius, rel=1e-12)
    value = loss.exact_value(solver.d)
    assert value < 0.0
    # No better than the exact trust-region minimum, and no worse than the Cauchy point
    # (the model's minimum along −g within the radius).
    assert value >= exact_tr_minimum(loss, radius) - 1e-12
    g = loss.grad
    curvature = float(g @ loss.matrix @ g)
    tau = radius / float(g.norm())
    if curvature > 0:
        tau = min(tau, float(g @ g) / curvature)
    assert value <= loss.exact_value(-tau * g) + 1e-12
    torch.testing.assert_close(solver.hd, loss.matrix @ solver.d, rtol=1e-10, atol=1e-12)


def test_steihaug_cg_inside_a_large_region_is_plain_cg() -> None:
    gen = seeded(5)
    q, _ = torch.linalg.qr(randn(5, 5, gen=gen))
    loss = DenseLocalLoss(q @ torch.diag(torch.logspace(-0.5, 0.5, 5, dtype=DTYPE)) @ q.T,
                          randn(5, gen=gen))
    exact = -torch.linalg.solve(loss.matrix, loss.grad)
    solver = steihaug(loss, 10 * float(exact.norm()))
    assert solver.stopped == "converged"
    torch.testing.assert_close(solver.d, exact, rtol=1e-9, atol=1e-12)


def test_a_warm_start_outside_the_region_is_pulled_in() -> None:
    loss = indefinite_loss()
    start = 5.0 * randn(6, gen=seeded(9))
    solver = TruncatedCG(loss, tol=1e-12, armijo=ArmijoRule(), fallback_step=1.0,  # type: ignore[arg-type]
                         radius=1.0, start=start)
    assert float(solver.d.norm()) == pytest.approx(0.5, rel=1e-12)  # half the radius
    torch.testing.assert_close(solver.r, -loss.grad - loss.matrix @ solver.d)
    assert loss.products == 1


# ------------------------------------------------------------------- step acceptance
def eager_job(iterations: int, **optimizer: object) -> dict:
    """A scale far too large for the first step: its loss rises, so it is rejected."""
    return synthetic_job(optimizer={"name": "sm_adaptive", "inner_steps": 4, "step_scale": 40.0,
                                    "scale_rule": "fixed", **optimizer},
                         run={"iterations": iterations, "eval_every": 0})


def test_a_rejected_step_leaves_every_stage_exactly_at_its_iterate(tmp_path: Path) -> None:
    """Two iterations: the first applies a step of α = 40, the second's forward pass measures
    a rise, and, being the last, goes back: the model is θ_1 bit for bit, in one process and
    on the engine."""
    for records in trained_in_both_runtimes_ending_at_the_start(tmp_path, eager_job(2)):
        assert [r["step_rejected"] for r in records] == [False, True]
        assert records[1]["rejected_loss"] > records[0]["train_loss"]
        assert records[1]["train_loss"] == records[0]["train_loss"]


def trained_in_both_runtimes_ending_at_the_start(tmp_path: Path, raw: dict) -> list[list[dict]]:
    """Train `raw` in one process and on the engine; assert that each ends with the model it
    started from, bit for bit; each run's records."""
    start = [{k: v.clone() for k, v in m.state_dict().items()}
             for m in build_stage_modules(job_from_dict(raw))]
    path = write_job(tmp_path / "job.yaml", raw)
    runs = []
    for run, how, out in ((run_here, "--single-process", "single"),
                          (run_cli, "--no-live", "multi")):
        result = run("train", str(path), how, "--out", out, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        runs.append(metric_rows(tmp_path / out))
        final = torch.load(tmp_path / out / "model.pt")["stages"]
        for mine, theirs in zip(final, start, strict=True):
            for name in theirs:
                assert torch.equal(mine[name], theirs[name]), (out, name)
    return runs


def test_the_loss_never_rises_and_retries_cost_forward_passes() -> None:
    job = job_from_dict(eager_job(12))
    records = train(job, build_local_pipeline(job, CPU), load_job_data(job), lambda r: None)
    losses = [r.train_loss for r in records]
    assert all(b <= a for a, b in zip(losses, losses[1:])), losses
    rejected = [r.iteration for r in records if r.metric("step_rejected")]
    assert rejected and losses[-1] < losses[0]
    for r in records:
        assert r.forward_passes - r.backward_passes == sum(1 for k in rejected
                                                           if k <= r.iteration)
        assert r.metric("rejected_loss") is None or r.metric("rejected_loss") > r.train_loss
        assert math.isfinite(r.metric("step_scale"))


@pytest.mark.parametrize("warm_start", [0.0, 0.5])
def test_an_accepted_step_frees_what_would_undo_it_before_the_drain(warm_start: float) -> None:
    """θ before a step and its direction are held until a forward pass judges the step:
    through the backwards of a rejected one (the retry needs them), not of an accepted one,
    whose direction stays only as CG's warm start."""
    job = job_from_dict(eager_job(8, warm_start=warm_start))
    pipeline = build_local_pipeline(job, CPU)
    seen: list[tuple[bool, bool, bool]] = []
    for stage in pipeline.stages:
        part = stage.optimizer
        backward = part.backward

        def watched(*args: object, part: object = part, backward: object = backward) -> object:
            seen.append((part.rejected, part.base is None, part.last_d is None))
            return backward(*args)

        part.backward = watched  # type: ignore[method-assign]
    records = train(job, pipeline, load_job_data(job), lambda r: None)
    assert any(r.metric("step_rejected") for r in records)
    first = len(pipeline.stages) * job.data.microbatches  # iteration 1's: no step yet
    accepted = [held for held in seen[first:] if not held[0]]
    rejected = [held for held in seen[first:] if held[0]]
    assert accepted and rejected
    assert all(freed_base and freed_d == (warm_start == 0.0)
               for _, freed_base, freed_d in accepted)
    assert not any(freed_base or freed_d for _, freed_base, freed_d in rejected)


def test_without_acceptance_the_eager_step_is_kept() -> None:
    job = job_from_dict(eager_job(3, accept_steps=False))
    records = train(job, build_local_pipeline(job, CPU), load_job_data(job), lambda r: None)
    assert not any(r.metric("step_rejected") for r in records)
    assert records[1].train_loss > records[0].train_loss  # the rise the rule would stop


def test_a_trust_radius_needs_cg() -> None:
    with pytest.raises(ConfigError, match="optimizer.trust_radius: a trust radius needs"):
        job_from_dict(synthetic_job(optimizer={"name": "sm_adaptive", "trust_radius": 0.1,
                                               "inner_solver": "gradient"}))


# ---------------------------------------------------------------- minibatch trials
def minibatch_job(iterations: int, **optimizer: object) -> dict:
    """Minibatches of 8 of the 24 samples, an eager first scale."""
    return synthetic_job(data={"batch": 8},
                         optimizer={"name": "sm_adaptive", "inner_steps": 4, "step_scale": 40.0,
                                    **optimizer},
                         run={"iterations": iterations, "eval_every": 0})


def test_on_minibatches_every_kept_step_lowers_its_own_minibatchs_loss() -> None:
    job = job_from_dict(minibatch_job(9))
    records = train(job, build_local_pipeline(job, CPU), load_job_data(job), lambda r: None)
    trials = 0
    for r in records:
        assert 1 <= r.metric("line_search_trials") <= 3
        trials += r.metric("line_search_trials")
        assert r.forward_passes == r.backward_passes + trials  # one pass per trial
        if r.metric("trial_loss") is not None:  # a step was kept: measured on its own minibatch
            assert r.metric("trial_loss") <= r.train_loss and r.metric("step_scale") > 0
            assert r.metric("step_rejected") == (r.metric("line_search_trials") > 1)
        else:  # every trial rose: back to the iterate
            assert r.metric("step_rejected") and r.metric("step_scale") == 0.0
            assert r.metric("line_search_trials") == 3
        assert r.metric("rejected_loss") is None or r.metric("rejected_loss") > r.train_loss
    assert any(r.metric("step_rejected") for r in records)  # the eager scale is caught
    assert any(r.metric("trial_loss") is not None for r in records)


def test_a_minibatch_step_no_trial_keeps_leaves_the_model_exactly_where_it_was(
        tmp_path: Path) -> None:
    """One iteration whose step of α = 10⁴ rises on its minibatch in its one trial: the model
    is the initial one bit for bit, in one process and on the engine."""
    raw = minibatch_job(1, step_scale=1e4, scale_max=1e4, minibatch_trials=1,
                        trust_radius=None)
    for [record] in trained_in_both_runtimes_ending_at_the_start(tmp_path, raw):
        assert record["step_rejected"] and record["step_scale"] == 0.0
        assert record["rejected_loss"] > record["train_loss"]


def test_without_minibatch_trials_minibatch_steps_go_unjudged() -> None:
    job = job_from_dict(minibatch_job(3, minibatch_trials=0))
    records = train(job, build_local_pipeline(job, CPU), load_job_data(job), lambda r: None)
    assert all(r.forward_passes == r.backward_passes for r in records)
    assert all(r.metric("trial_loss") is None and not r.metric("step_rejected") for r in records)
