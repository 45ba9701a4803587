"""The peers (optimizer.name: shampoo, soap, muon, psgd; pytorch-optimizer's code on each stage):
engine = one process, the loss goes down, resume is exact (PSGD's random streams included),
each stage steps its own parameters only, bad options are exit 2, and Muon's groups."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sm_dist.cli import main
from sm_dist.config.build import build_local_pipeline
from sm_dist.config.job import job_from_dict
from sm_dist.optim.peers import PeerStageOptimizer, StageRandomStreams
from sm_dist.run.checkpoints import complete_checkpoints
from tests.conftest import metric_rows, run_cli, synthetic_job, write_job
from tests.test_cnn import cnn_job
from tests.test_engine import assert_same_training, train_both
from tests.test_transformer import text_job

pytest.importorskip("pytorch_optimizer")

CPU = torch.device("cpu")
# Steps long enough that 5 updates of the tiny job lower its loss by several per cent (SOAP
# refreshes its eigenbasis every 2 steps so that a 3-step checkpoint falls between two).
PEERS: dict[str, dict[str, Any]] = {
    "shampoo": {"name": "shampoo", "lr": 0.1},
    "soap": {"name": "soap", "lr": 0.05, "precondition_every": 2},
    "muon": {"name": "muon", "lr": 0.05, "adamw_lr": 0.02},
    "psgd": {"name": "psgd", "lr": 0.1},
}
ITERATIONS = 6  # 2K: the straight run; K = 3 is where the resumed run stops first
MLP = {"mlp": {"widths": [6, 5, 5, 4, 3], "activation": "tanh"}, "balance": [2, 2]}

CPU_DEVICE = torch.device("cpu")


def peer_job(name: str, **model: Any) -> dict[str, Any]:
    """The tiny float64 synthetic MLP (2 stages unless `model` says otherwise) under peer
    `name`, checkpointed every 3 iterations."""
    return synthetic_job(name=f"peer-{name}", model={**MLP, **model}, optimizer=PEERS[name],
                         run={"iterations": ITERATIONS, "eval_every": 3, "checkpoint_every": 3,
                              "keep_last": 0, "rpc_timeout": 60})


def train_here(job: Path, out: Path, *extra: str) -> None:
    """`sm-dist train JOB --single-process` in this process (the stages' numbers are the
    same as in a process of their own; the imports are paid once)."""
    assert main(["train", str(job), "--single-process", "--no-live", "--out", str(out),
                 *extra]) == 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each peer's job file and its uninterrupted single-process run of ITERATIONS: the
    reference of the parity, loss and resume tests (one run each for the whole module)."""
    root = tmp_path_factory.mktemp("peers")
    runs = {}
    for name in PEERS:
        job = write_job(root / f"{name}.yaml", peer_job(name))
        train_here(job, root / name)
        runs[name] = root / name
    return runs


def job_of(run: Path) -> Path:
    return run.parent / f"{run.name}.yaml"


# ------------------------------------------------------------------------------ engine parity
def assert_peer_parity(single: Path, multi: Path) -> None:
    """The engine's records and final model are the single process's (assert_same_training),
    and so is the gradient norm every record carries."""
    assert_same_training(single, multi)
    for a, b in zip(metric_rows(single), metric_rows(multi), strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-9, abs=0)


def engine_run(tmp_path: Path, straight: dict[str, Path], name: str) -> Path:
    result = run_cli("train", str(job_of(straight[name])), "--no-live", "--out", "multi",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "multi"


def test_psgd_engine_matches_single_process(tmp_path: Path, straight: dict[str, Path]) -> None:
    """PSGD draws random probes: the engine's stage processes draw the single process's."""
    assert_peer_parity(straight["psgd"], engine_run(tmp_path, straight, "psgd"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shampoo", "soap", "muon"])
def test_engine_matches_single_process(tmp_path: Path, straight: dict[str, Path],
                                       name: str) -> None:
    """Shampoo, SOAP and Muon on two stage processes give the single process's numbers."""
    assert_peer_parity(straight[name], engine_run(tmp_path, straight, name))


def small_cnn(name: str) -> dict[str, Any]:
    """tests.test_cnn's CNN on 2 stages under peer `name`."""
    job = cnn_job()
    job["optimizer"] = PEERS[name]
    job["model"]["balance"] = [2, 2]
    return job


def small_transformer(name: str) -> dict[str, Any]:
    """tests.test_transformer's transformer on 2 stages under peer `name`."""
    job = text_job()
    job["optimizer"] = PEERS[name]
    job["model"]["balance"] = [3, 2]
    return job


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PEERS))
@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_cnn_and_transformer_engine_match_single_process(tmp_path: Path, model: str,
                                                         name: str) -> None:
    """Conv weights (4-D) and a transformer's blocks under each peer: engine = one process."""
    job = small_cnn(name) if model == "cnn" else small_transformer(name)
    single, multi = train_both(tmp_path, job)
    assert_peer_parity(single, multi)
    losses = [r["train_loss"] for r in metric_rows(single)]
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("name", list(PEERS))
def test_loss_goes_down(straight: dict[str, Path], name: str) -> None:
    """Five steps of each peer never raise the training loss and lower it by at least 3 %
    (SOAP's first step only sets up its preconditioner: the loss stays, exactly)."""
    rows = metric_rows(straight[name])
    losses = [r["train_loss"] for r in rows]
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))
    assert all(b <= a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.97 * losses[0], losses
    assert all(r["grad_norm"] > 0 for r in rows)
    tested = [r["test_loss"] for r in rows if "test_loss" in r]
    assert len(tested) == 2 and tested[-1] < tested[0]


# ------------------------------------------------------------------------------ resume
def resume_from_half_way(straight: Path, out: Path) -> None:
    """Train the straight run's job to iteration 3 into `out`, then resume it to the end."""
    job = job_of(straight)
    train_here(job, out, "--set", f"run.iterations={ITERATIONS // 2}")
    assert [p.name for p in complete_checkpoints(out)] == ["step-3"]
    assert main(["train", str(job), "--single-process", "--no-live", "--resume", str(out),
                 "--set", f"run.iterations={ITERATIONS}"]) == 0


def differences(straight: Path, resumed: Path) -> list[str]:
    """What differs, bit for bit, between two runs' records and final models."""
    found = []
    a, b = metric_rows(straight), metric_rows(resumed)
    if [r["iteration"] for r in a] != [r["iteration"] for r in b]:
        return ["iterations"]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "test_loss", "grad_norm"):
            if ra.get(key) != rb.get(key):
                found.append(f"{key} of iteration {ra['iteration']}")
    model_a = torch.load(straight / "model.pt", weights_only=True)["stages"]
    model_b = torch.load(resumed / "model.pt", weights_only=True)["stages"]
    for s, (sa, sb) in enumerate(zip(model_a, model_b, strict=True)):
        found.extend(f"stage {s} {key}" for key in sa if not torch.equal(sa[key], sb[key]))
    return found


@pytest.mark.parametrize("name", list(PEERS))
def test_resume_continues_exactly(tmp_path: Path, straight: dict[str, Path],
                                  name: str) -> None:
    """3 iterations, resumed from their checkpoint to 6: the straight 6-iteration run, bit for
    bit; each stage's checkpoint holds the optimizer's state and its random streams."""
    resume_from_half_way(straight[name], tmp_path / "resumed")
    assert differences(straight[name], tmp_path / "resumed") == []
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-3" / "stage-1.pt",
                       weights_only=True)["optimizer"]
    assert state["optimizer"]["state"] and set(state["streams"]) == {"torch", "numpy", "cuda"}
    assert state["streams"]["cuda"] is None  # a CPU stage has no device generator to keep


def test_psgd_resume_needs_the_checkpointed_streams(tmp_path: Path, straight: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The control of the resume test: PSGD resumed with its streams back at their seed (their
    saved state ignored) draws other probes, and the run after the checkpoint differs."""
    monkeypatch.setattr(StageRandomStreams, "load_state_dict", lambda self, state: None)
    resume_from_half_way(straight["psgd"], tmp_path / "resumed")
    found = differences(straight["psgd"], tmp_path / "resumed")
    assert "train_loss of iteration 5" in found and "train_loss of iteration 4" not in found


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_psgd_resume_continues_exactly_on_a_gpu(tmp_path: Path) -> None:
    """On a GPU, PSGD's probes come from the device's generator: resume is still exact."""
    job = peer_job("psgd")
    job["run"]["device"] = "cuda"
    path = write_job(tmp_path / "psgd.yaml", job)
    train_here(path, tmp_path / "psgd")
    resume_from_half_way(tmp_path / "psgd", tmp_path / "resumed")
    assert differences(tmp_path / "psgd", tmp_path / "resumed") == []


def test_stage_streams_reload_bit_for_bit_and_leave_the_global_ones() -> None:
    """A stage's streams through a weights_only checkpoint draw what they would have drawn,
    and a step on them leaves torch's and numpy's global generators where they were."""
    def draw() -> tuple[torch.Tensor, float]:
        return torch.randn(4, dtype=torch.float64), float(np.random.random())

    streams = StageRandomStreams(1001, CPU_DEVICE)
    streams.run(draw)
    buffer = io.BytesIO()
    torch.save(streams.state_dict(), buffer)
    buffer.seek(0)
    again = StageRandomStreams(0, CPU_DEVICE)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    global_torch, global_numpy = torch.get_rng_state(), np.random.get_state()
    expected, got = streams.run(draw), again.run(draw)
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1]
    assert torch.equal(torch.get_rng_state(), global_torch)
    assert np.random.get_state()[1].tolist() == global_numpy[1].tolist()
    assert not torch.equal(StageRandomStreams(1000, CPU_DEVICE).run(draw)[0], expected[0])


# ------------------------------------------------------------------------------ own parameters
def random_gradients(tensors: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in tensors:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("name", list(PEERS))
def test_each_stage_steps_only_its_own_parameters(name: str) -> None:
    """Three stages, every parameter with a gradient: two steps of one stage's optimizer move
    each of that stage's parameters and no other stage's, and draw on no other stage's
    streams nor the global ones; its torch optimizer holds exactly the stage's parameters."""
    job = job_from_dict(peer_job(name, balance=[2, 1, 1]))
    stages = build_local_pipeline(job, CPU).stages
    everything = [p for stage in stages for p in stage.params]
    for stage in stages:
        held = [p for group in stage.optimizer.torch_optimizer.param_groups
                for p in group["params"]]
        assert sorted(map(id, held)) == sorted(map(id, stage.params))
    random_gradients(everything, seed=3)
    global_torch = torch.get_rng_state()
    for s, stage in enumerate(stages):
        part = stage.optimizer
        assert isinstance(part, PeerStageOptimizer)
        before = [p.detach().clone() for p in everything]
        streams = [other.optimizer.streams.state_dict()["torch"] for other in stages]
        for _ in range(2):  # SOAP's first step only sets up its preconditioner
            part.step()
        for p, old in zip(everything, before, strict=True):
            mine = any(p is q for q in stage.params)
            assert torch.equal(p, old) is not mine, (s, tuple(p.shape), mine)
        for t, other in enumerate(stages):
            if t != s:
                assert torch.equal(other.optimizer.streams.state_dict()["torch"], streams[t])
    assert torch.equal(torch.get_rng_state(), global_torch)


# ------------------------------------------------------------------------------ bad options
BAD_OPTIONS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "negative lr": ({"name": "shampoo", "lr": -0.1}, ("optimizer.lr:", "> 0")),
    "zero lr": ({"name": "psgd", "lr": 0.0}, ("optimizer.lr:", "> 0")),
    "beta of 1": ({"name": "soap", "betas": [0.9, 1.0]}, ("optimizer.betas[1]:", "< 1")),
    "negative beta": ({"name": "muon", "adamw_betas": [-0.1, 0.95]},
                      ("optimizer.adamw_betas[0]:", ">= 0")),
    "one beta": ({"name": "soap", "betas": [0.9]}, ("optimizer.betas:",)),
    "momentum of 1": ({"name": "shampoo", "momentum": 1.0}, ("optimizer.momentum:", "< 1")),
    "precondition_every 0": ({"name": "soap", "precondition_every": 0},
                             ("optimizer.precondition_every:", ">= 1")),
    "shampoo precondition_every 0": ({"name": "shampoo", "precondition_every": 0},
                                     ("optimizer.precondition_every:", ">= 1")),
    "update_probability above 1": ({"name": "psgd", "update_probability": 1.5},
                                   ("optimizer.update_probability:", "<= 1")),
    "unknown memory mode": ({"name": "psgd", "memory_save_mode": "none"},
                            ("optimizer.memory_save_mode:", "one_diag")),
    "misspelt key": ({"name": "muon", "momentm": 0.9},
                     ("optimizer.momentm", "did you mean 'optimizer.momentum'")),
    "another peer's key": ({"name": "muon", "precondition_every": 3},
                           ("optimizer.precondition_every:", "not of muon")),
}


@pytest.mark.parametrize("command", ["train", "validate"])
@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_a_bad_option_is_one_clear_line_and_exit_2(tmp_path: Path, case: str, command: str,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A bad peer option: exit code 2 before anything runs, one error line naming the key and
    what it must be, no traceback, no run directory."""
    optimizer, expected = BAD_OPTIONS[case]
    path = write_job(tmp_path / "job.yaml", synthetic_job(optimizer=optimizer))
    monkeypatch.chdir(tmp_path)
    args = [command, str(path)] + (["--single-process", "--no-live"] if command == "train"
                                   else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(errors) == 1, err
    assert all(text in errors[0] for text in expected), err
    assert "Traceback" not in err and "has 1 error" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


@pytest.mark.slow  # the in-process test above has every case; this one pays a process
def test_a_bad_option_in_a_real_process_exits_2(tmp_path: Path) -> None:
    """The same through `python -m sm_dist train`: the process's exit status is 2."""
    path = write_job(tmp_path / "job.yaml", synthetic_job(optimizer={"name": "soap",
                                                                     "betas": [0.9, 1.0]}))
    result = run_cli("train", str(path), "--no-live", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "optimizer.betas[1]" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ Muon's groups
def muon_groups_of(raw: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(Muon's, AdamW's) parameters over every stage of the job, by their names in the whole
    network ('child.rest', the child counted over the stages), as peers.py built them."""
    balance = raw["model"]["balance"]
    stages = build_local_pipeline(job_from_dict(raw), CPU).stages
    muon: set[str] = set()
    adamw: set[str] = set()
    offset = 0
    for stage, count in zip(stages, balance, strict=True):
        names = {id(p): n for n, p in stage.module.named_parameters()}
        groups = stage.optimizer.torch_optimizer.param_groups
        assert [g["use_muon"] for g in groups] == [True, False]
        for group, into in zip(groups, (muon, adamw), strict=True):
            for p in group["params"]:
                child, _, rest = names[id(p)].partition(".")
                into.add(f"{offset + int(child)}.{rest}")
        offset += count
    return muon, adamw


def test_muon_steps_hidden_linear_weights_and_adamw_the_rest() -> None:
    """The MLP 6-5-5-4-3 on 2 stages: Muon gets the two hidden Linear weights; AdamW the first
    and last layers' weights and every bias, each with its own lr and betas."""
    raw = synthetic_job(model=MLP, optimizer={"name": "muon", "lr": 0.04, "adamw_lr": 0.007,
                                              "adamw_betas": [0.8, 0.9]})
    stages = build_local_pipeline(job_from_dict(raw), CPU).stages
    first, second = stages
    expected = [([first.module[1][0].weight],
                 [first.module[0][0].weight, first.module[0][0].bias, first.module[1][0].bias]),
                ([second.module[0][0].weight],
                 [second.module[0][0].bias, second.module[1][0].weight,
                  second.module[1][0].bias])]
    for stage, (muon, adamw) in zip(stages, expected, strict=True):
        groups = stage.optimizer.torch_optimizer.param_groups
        assert [p is q for p, q in zip(groups[0]["params"], muon, strict=True)] == [True]
        assert sorted(map(id, groups[1]["params"])) == sorted(map(id, adamw))
        assert groups[0]["use_muon"] and groups[0]["lr"] == 0.04
        assert not groups[1]["use_muon"] and groups[1]["lr"] == 0.007
        assert tuple(groups[1]["betas"]) == (0.8, 0.9)
    assert all(p.dim() == 2 for p in (first.module[1][0].weight, second.module[0][0].weight))


def mlp_muon(balance: list[int]) -> dict[str, Any]:
    return synthetic_job(model={**MLP, "balance": balance}, optimizer={"name": "muon"})


def cnn_muon(balance: list[int]) -> dict[str, Any]:
    job = cnn_job()
    job["optimizer"] = {"name": "muon"}
    job["model"]["balance"] = balance
    return job


def transformer_muon(balance: list[int]) -> dict[str, Any]:
    job = text_job()
    job["optimizer"] = {"name": "muon"}
    job["model"]["balance"] = balance
    return job


# The hidden weights of each network (what Muon is for); the rest is AdamW's.
BLOCK_WEIGHTS = {f"{b}.{layer}.weight" for b in (1, 2, 3)
                 for layer in ("qkv", "proj", "mlp.0", "mlp.2")}
MUON_CASES = {
    "mlp": (mlp_muon, [[2, 2], [1, 1, 1, 1], [4], [3, 1]], {"1.0.weight", "2.0.weight"}),
    "cnn": (cnn_muon, [[1, 1, 1, 1], [2, 2], [4]], {"1.0.weight", "2.0.weight"}),
    # Embedding, 3 blocks, head: every block's Linear weights are hidden matrices.
    "transformer": (transformer_muon, [[2, 1, 1, 1], [1, 1, 1, 1, 1], [1, 3, 1]],
                    BLOCK_WEIGHTS),
}


@pytest.mark.parametrize("model", [
    "mlp", "cnn",
    "transformer",
])
def test_muon_groups_are_the_hidden_matrices_however_the_network_is_split(model: str) -> None:
    """Muon steps the same weights (the hidden matrices) on every split of the network, and
    AdamW every other parameter: the groups do not depend on model.balance."""
    make, balances, hidden = MUON_CASES[model]
    for balance in balances:
        muon, adamw = muon_groups_of(make(balance))
        assert muon == hidden, balance
        assert not muon & adamw and all("weight" in name for name in muon)
        assert any(name.endswith("bias") for name in adamw)


def test_psgd_keeps_float64_factors(straight: dict[str, Path]) -> None:
    """PSGD on float64 parameters keeps float64 preconditioner factors (float32 ones would not
    reload bit for bit), as the checkpoint shows."""
    state = torch.load(straight["psgd"] / "checkpoints" / "step-6" / "stage-0.pt",
                       weights_only=True)["optimizer"]["optimizer"]
    factors = [q for entry in state["state"].values() for q in entry["Q"]]
    assert factors and all(q.dtype == torch.float64 for q in factors)
