"""sm_kron on the product: its layers found per stage, the engine and one process agreeing, the
factors of microbatches summing to the batch's, exact resume, a loss that never rises, the
input layer's Gram factor in stage 0's bubble, and the jobs it refuses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sm_dist.cli import main
from sm_dist.config.build import build_local_pipeline, build_optimizer, load_job_data
from sm_dist.config.job import ConfigError, job_from_dict, job_to_dict
from sm_dist.math.kronecker import linear_samples, terms_root
from sm_dist.models.cnn import build_cnn
from sm_dist.optim.kron_layers import Damping, KronLayer, stage_layers
from sm_dist.optim.sm_kron import INPUT_GRAM
from sm_dist.pipeline.actions import BACKWARD, FORWARD
from sm_dist.pipeline.schedule import gpipe_schedule, validate_schedule
from sm_dist.report.run_data import load_run
from sm_dist.report.simulate import read_events
from sm_dist.run.trainer import train
from tests.conftest import run_cli, synthetic_job, write_job
from tests.test_checkpoints import assert_resume_continues_exactly, checkpointed_job
from tests.test_cnn import cnn_job
from tests.test_engine import assert_same_training, train_both
from tests.test_transformer import text_job

CPU = torch.device("cpu")


def kron_job(iterations: int = 4, **optimizer: Any) -> dict[str, Any]:
    return synthetic_job(optimizer={"name": "sm_kron", **optimizer},
                         run={"iterations": iterations, "eval_every": 0})


def trained(raw: dict[str, Any]) -> list[Any]:
    job = job_from_dict(raw)
    return train(job, build_local_pipeline(job, CPU), load_job_data(job), lambda r: None)


# ---------------------------------------------------------------------- layers of a stage
def test_stage_layers_group_each_affine_layer_with_what_follows() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(),
                        nn.Linear(4, 2))
    layers = stage_layers(mlp, first_stage=True, input_gram_bound=True)
    assert layers is not None
    assert [(type(x.affine).__name__, type(x.activation).__name__, x.data_input, x.gram)
            for x in layers] == [("Linear", "ReLU", True, True), ("Linear", "Tanh", False, False),
                                 ("Linear", "NoneType", False, False)]
    assert isinstance(layers[0].first, nn.Flatten)
    cnn = build_cnn([1, 8, 8], [2, 3], classes=3)
    conv = stage_layers(cnn[0], first_stage=False)
    assert conv is not None and conv[0].pool is not None and not conv[0].data_input
    # No Kronecker bound: such a stage takes sm_adaptive's step.
    assert stage_layers(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), True) is None
    assert stage_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh()), True) is None
    assert stage_layers(nn.Sequential(nn.Linear(4, 4), nn.AvgPool1d(2)), True) is None


def test_stage_0_factors_its_gram_matrix_between_forwards_and_backwards() -> None:
    optimizer = build_optimizer(job_from_dict(kron_job()))
    schedule = gpipe_schedule(3, 2, optimizer.update_actions(2, last=False),
                              prepare=optimizer.prepare_actions(2))
    validate_schedule(schedule, 2)
    kinds = [a.kind for a in schedule[0]]
    assert kinds[:4] == [FORWARD, FORWARD, INPUT_GRAM, BACKWARD]
    assert all(INPUT_GRAM not in [a.kind for a in lane] for lane in schedule[1:])
    exact = build_optimizer(job_from_dict(kron_job(input_bound="exact")))
    assert exact.prepare_actions(2)(0) == []


def test_minibatches_settle_a_damping() -> None:
    """Left null, sm_kron's damping and scale rule follow the data: none and secant on a full
    batch; 0.5 and secant on minibatches, where the damping overfits one minibatch less. The
    top curvature γ is 0.1 on both. Given, they stay; config.yaml records what was chosen."""
    def settled(raw: dict) -> tuple:
        cfg = job_from_dict(raw).optimizer
        return cfg.damping, cfg.scale_rule, cfg.loss_curvature_scale

    assert settled(kron_job()) == (0.0, "secant", 0.1)
    minibatch = kron_job()
    minibatch["data"]["batch"] = 8
    assert settled(minibatch) == (0.5, "secant", 0.1)
    given = {**minibatch, "optimizer": {"name": "sm_kron", "damping": 0.05,
                                        "scale_rule": "ratio", "loss_curvature_scale": 0.5}}
    assert settled(given) == (0.05, "ratio", 0.5)
    assert job_to_dict(job_from_dict(minibatch))["optimizer"]["damping"] == 0.5


# ------------------------------------------------------------------------- the numbers
# exact's engine run is slow-marked: the default run keeps the suite near 10 minutes, and
# the gram bound's run already carries stage 0's action K over RPC.
@pytest.mark.parametrize("input_bound", ["gram", pytest.param("exact", marks=pytest.mark.slow)])
def test_engine_and_single_process_agree(tmp_path: Path, input_bound: str) -> None:
    assert_same_training(*train_both(tmp_path, kron_job(3, input_bound=input_bound)))


@pytest.mark.parametrize("input_bound,gram_block", [("gram", 0), ("gram", 3), ("exact", 0)])
def test_microbatch_factors_sum_to_the_batchs(input_bound: str, gram_block: int) -> None:
    """λ by its certified bound (no random start): one microbatch or four, the same steps;
    stage 0's Gram matrix summed a microbatch or 3 samples at a time."""
    def losses(microbatches: int) -> list[float]:
        raw = kron_job(4, lambda_rounds=0, input_bound=input_bound, step_scale=2.0,
                       scale_rule="fixed", accept_steps=False, gram_block=gram_block)
        raw["data"]["microbatches"] = microbatches
        return [r.train_loss for r in trained(raw)]

    one, four = losses(1), losses(4)
    assert one[-1] < one[0]
    assert four == pytest.approx(one, rel=1e-10, abs=0)


@pytest.mark.parametrize("activation", [None, nn.ReLU(), nn.Tanh(), nn.GELU()])
def test_a_linear_layers_factors_formed_in_the_update_are_the_backwards(
        activation: nn.Module | None) -> None:
    """A Linear layer below another keeps LinearSamples in its backward and forms its weights
    of A and U in the update: the same c sent down and the same A and U, to the bit, as the
    terms formed in the backward (what a first layer still does)."""
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(5, 4).double()
    damping = Damping(0.3, 1e-4, 1e-12, 0.0, 1.0, 0.0)
    deferred, direct = KronLayer(linear, activation), KronLayer(linear, activation)
    for j in range(2):
        z = torch.randn(6, 5, generator=gen, dtype=torch.float64)
        g = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        c = torch.rand(6, generator=gen, dtype=torch.float64)
        c[0] = 0.0  # a sample with no curvature from above
        pre = linear(z).detach()
        out = pre if activation is None else activation(pre)
        sent = deferred.backward(j, z, pre, out, g, c, 2, damping, torch.float64,
                                 torch.Generator().manual_seed(j))
        terms = direct.terms(z, pre, g, c)
        assert torch.equal(linear_samples(pre, g, c, activation).root(), terms_root(terms))
        expected, delta = direct.curvature_below(j, z, terms, 2, damping,
                                                 torch.Generator().manual_seed(j))
        direct.accumulate(terms, delta, damping.eta)
        assert sent is not None and torch.equal(sent, expected)
    assert deferred.samples and not direct.samples
    for mine, theirs in zip(deferred.factors(torch.float64, 1.0),
                            direct.factors(torch.float64, 1.0)):
        assert mine is not None and theirs is not None and torch.equal(mine, theirs)


def test_stage_0_summing_its_gram_matrix_in_blocks_trains_as_the_whole_sum() -> None:
    """gram_block rounds the sum differently and nothing else: the same losses to rounding
    (and not to the bit: the option reaches stage 0's K)."""
    whole = [r.train_loss for r in trained(kron_job(6, gram_block=0))]
    blocked = [r.train_loss for r in trained(kron_job(6, gram_block=5))]
    assert blocked == pytest.approx(whole, rel=1e-6)
    assert blocked != whole
    assert blocked[-1] < blocked[0]


@pytest.mark.parametrize("make,block", [(kron_job, 128), (cnn_job, 0)])
def test_gram_block_by_default_blocks_a_linear_input_layer_only(
        make: Callable, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """null: 128 samples at a time on a Linear input layer, whole microbatches on a
    convolution; training then gives to the bit what that setting gives."""
    blocks: list[int] = []
    prepare = KronLayer.prepare_gram

    def spied(self: KronLayer, inputs: list, damping: Damping, block: int = 0) -> None:
        blocks.append(block)
        prepare(self, inputs, damping, block)

    monkeypatch.setattr(KronLayer, "prepare_gram", spied)

    def losses(**options: Any) -> list[float]:
        raw = make()
        raw["optimizer"] = {"name": "sm_kron", **options}
        raw["run"] = {**raw.get("run", {}), "iterations": 3, "eval_every": 0}
        return [r.train_loss for r in trained(raw)]

    default = losses()
    assert blocks and set(blocks) == {block}
    assert default == losses(gram_block=block)


def test_stage_0_frees_the_held_step_when_the_decision_is_delivered() -> None:
    """An accepted step's θ before it and direction go as soon as the first gradient (with the
    top's decision) reaches stage 0's mailbox, not when stage 0's first backward runs, after
    every gradient has arrived (one process runs stage 1's backwards first)."""
    job = job_from_dict(kron_job(4))
    pipeline = build_local_pipeline(job, CPU)
    optimizer = pipeline.stages[0].optimizer
    seen: list[tuple[bool, bool, int]] = []  # held before, held after, gradients waiting
    arrived = pipeline.channels[1].arrivals[0]

    def watched(key: Any, payload: Any) -> None:
        before = optimizer.base is not None  # type: ignore[attr-defined]
        arrived(key, payload)
        waiting = sum(k[1] == BACKWARD.letter for k in pipeline.channels[0].mailbox)
        seen.append((before, optimizer.base is not None, waiting))  # type: ignore[attr-defined]

    pipeline.channels[1].arrivals[0] = watched
    records = train(job, pipeline, load_job_data(job), lambda r: None)
    assert not any(r.metric("step_rejected") for r in records)
    firsts = [entry for entry in seen if entry[2] == 1]
    assert len(firsts) == len(records)
    # from the second iteration on a step is held when the first gradient comes, freed by it
    assert [entry[:2] for entry in firsts[1:]] == [(True, False)] * (len(records) - 1)


def test_the_loss_never_rises_on_a_full_batch() -> None:
    records = trained(kron_job(12))
    accepted = [r.train_loss for r in records]
    assert all(b <= a for a, b in zip(accepted, accepted[1:])), accepted
    assert accepted[-1] < 0.5 * accepted[0]
    # Closed form on every stage: no inner steps, no Ψ products.
    assert all(steps == 0 for r in records for steps in r.metric("inner_steps"))
    assert all(products == 0 for r in records for products in r.metric("psi_products"))


@pytest.mark.parametrize("input_bound", ["gram", "exact"])
def test_resume_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  input_bound: str) -> None:
    """Eigenbases, λ's warm starts, the scale and the held step survive a checkpoint; the
    input layer's Gram factor is made again from the batch."""
    job = checkpointed_job({"name": "sm_kron", "input_bound": input_bound, "refresh_every": 3})
    assert_resume_continues_exactly(tmp_path, monkeypatch, job)


@pytest.mark.parametrize("activation", ["relu", pytest.param("tanh", marks=pytest.mark.slow)])
def test_resume_continues_exactly_on_a_cnn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           activation: str) -> None:
    """The convolutions' state survives a checkpoint too: their eigenbases between refreshes
    and λ's warm starts, kept in half precision (ReLU with max pooling reads the pooling's
    saved indices and forms its terms in place; tanh takes the general path)."""
    job = cnn_job()
    job["model"]["cnn"]["activation"] = activation
    job["optimizer"] = {"name": "sm_kron", "refresh_every": 3}
    job["run"].update(iterations=5, checkpoint_every=2, keep_last=2, eval_every=0)
    assert_resume_continues_exactly(tmp_path, monkeypatch, job)


@pytest.mark.parametrize("batch", [None, 8])
def test_the_gram_factor_is_made_once_per_batch(tmp_path: Path, batch: int | None) -> None:
    """Full batch: K factors Z̃ᵀZ̃ in the first iteration and is free after it; minibatches:
    every iteration."""
    raw = kron_job(4)
    if batch is not None:
        raw["data"]["batch"] = batch
    path = write_job(tmp_path / "job.yaml", raw)
    out = tmp_path / "run"
    assert main(["train", str(path), "--single-process", "--no-live", "--out", str(out)]) == 0
    events, _ = read_events(load_run(out))
    made = [e.iteration for e in events if e.kind == INPUT_GRAM and e.detail != "skipped"]
    assert made == ([1] if batch is None else [1, 2, 3, 4])
    assert sum(e.kind == INPUT_GRAM for e in events) == 4


# ------------------------------------------------------------------- other workloads
def test_a_cnn_job_trains_with_either_conv_factor() -> None:
    """The whole patches' A and the looser one per kernel offset both train, differently."""
    losses = {}
    for conv_factor in ("patches", "offsets"):
        records = trained({**cnn_job(), "optimizer": {"name": "sm_kron",
                                                      "conv_factor": conv_factor}})
        assert records[-1].train_loss < records[0].train_loss
        losses[conv_factor] = [r.train_loss for r in records]
    assert losses["patches"][0] == losses["offsets"][0]  # the same start
    assert losses["patches"][1:] != losses["offsets"][1:]


def test_a_transformer_job_is_sm_adaptive_on_its_attention_stages() -> None:
    """Every stage of the tiny transformer holds an embedding, attention or LayerNorm: each
    takes sm_adaptive's step, with sm_kron's scale and acceptance options."""
    shared = {"inner_steps": 3, "loss_curvature_scale": 1.0, "scale_max": 1e8,
              "scale_rule": "secant", "scale_growth": 10.0, "recompute": False}
    kron = trained({**text_job(), "optimizer": {"name": "sm_kron", **shared}})
    adaptive = trained({**text_job(), "optimizer": {"name": "sm_adaptive", **shared}})
    assert kron[-1].train_loss < kron[0].train_loss
    assert all(steps > 0 for steps in kron[0].metric("inner_steps"))
    assert [r.train_loss for r in kron] == [r.train_loss for r in adaptive]


def test_recompute_rebuilds_the_graphs_of_the_stages_without_a_bound_only() -> None:
    """recompute, sm_kron's default: the transformer's stages (sm_adaptive's update) rebuild
    their graphs, with sm_adaptive's recompute numbers; the MLP's Kronecker stages record their
    forwards as without it, the same numbers to the bit."""
    assert job_from_dict(kron_job()).optimizer.recompute
    shared = {"inner_steps": 3, "loss_curvature_scale": 1.0, "scale_max": 1e8,
              "scale_rule": "secant", "scale_growth": 10.0, "recompute": True,
              "power_warm_start": True}
    kron = trained({**text_job(), "optimizer": {"name": "sm_kron", **shared}})
    adaptive = trained({**text_job(), "optimizer": {"name": "sm_adaptive", **shared}})
    assert [r.train_loss for r in kron] == [r.train_loss for r in adaptive]
    job = job_from_dict({**text_job(), "optimizer": {"name": "sm_kron", **shared}})
    pipeline = build_local_pipeline(job, CPU)
    assert not any(stage.optimizer.keeps_forward_graph() for stage in pipeline.stages)
    mlp = [r.train_loss for r in trained(kron_job(3, recompute=True))]
    assert mlp == [r.train_loss for r in trained(kron_job(3, recompute=False))]
    job = job_from_dict(kron_job(3, recompute=True))
    assert all(stage.optimizer.keeps_forward_graph()
               for stage in build_local_pipeline(job, CPU).stages)


@pytest.mark.slow
@pytest.mark.parametrize("make", [cnn_job, text_job])
def test_engine_and_single_process_agree_on_cnn_and_transformer(tmp_path: Path,
                                                                make: Any) -> None:
    raw = {**make(), "optimizer": {"name": "sm_kron", "inner_steps": 3}}
    assert_same_training(*train_both(tmp_path, raw))


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("option,message", [
    ({"curvature": "batch"}, "optimizer.curvature: sm_kron's bound is per sample"),
    ({"input_bound": "both"}, "optimizer.input_bound"),
    ({"lambda_rounds": -1}, "optimizer.lambda_rounds"),
    ({"eta": 0}, "optimizer.eta"),
    ({"gram_block": -1}, "optimizer.gram_block"),
])
def test_bad_options_are_named(option: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        job_from_dict(kron_job(**option))


def test_a_bad_option_exits_2(tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", kron_job(curvature="batch"))
    result = run_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "set optimizer.curvature: sample" in result.stderr
