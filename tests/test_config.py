"""Tests for the job schema: loading, overrides, validation messages and round trips."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from sm_dist.config.job import (
    ConfigError,
    JobConfig,
    RunConfig,
    apply_overrides,
    dump_job,
    job_from_dict,
    job_to_dict,
    load_job,
)
from sm_dist.data.config import DataConfig, SyntheticConfig
from sm_dist.models.config import MlpConfig, ModelConfig, num_layers
from sm_dist.optim.sm import SMOptions
from sm_dist.optim.torch_optimizers import AdamOptions

EXAMPLE_YAML = """\
name: fashion-mlp4-sm
model:
  mlp: {widths: [784, 128, 128, 128, 10], activation: relu}
  balance: [1, 1, 1, 1]
data:
  dataset: fashion_mnist
  root: data/
  train_subset: 2000
  normalize: standard
  flatten: true
  batch: full
  microbatches: 4
loss: cross_entropy
optimizer:
  name: sm
  inner_solver: cg
  inner_steps: 20
  curvature: sample
  delta_rel: 0.3
  delta_abs: 0.0
  rho: 0.0
  power_iterations: 10
run:
  iterations: 30
  seed: 0
  dtype: float64
  device: cpu
  eval_every: 10
"""


def example_raw() -> dict[str, Any]:
    """A fresh dict of the example job, for tests that tweak it."""
    return yaml.safe_load(EXAMPLE_YAML)


def synthetic_raw() -> dict[str, Any]:
    """A minimal valid synthetic job: two stages over a 3-layer MLP."""
    return {
        "name": "synth",
        "model": {"mlp": {"widths": [20, 16, 16, 10]}, "balance": [2, 1]},
        "data": {"dataset": "synthetic"},
    }


def errors_of(raw: dict[str, Any], overrides: tuple[str, ...] = ()) -> list[str]:
    """The error lines a job dict produces (failing the test if it is accepted)."""
    with pytest.raises(ConfigError) as caught:
        job_from_dict(raw, overrides)
    return caught.value.errors


@pytest.fixture
def example_file(tmp_path: Path) -> Path:
    path = tmp_path / "fashion.yaml"
    path.write_text(EXAMPLE_YAML)
    return path


def test_example_job_loads_with_types_and_defaults(example_file: Path) -> None:
    job = load_job(example_file)
    assert isinstance(job, JobConfig)
    assert job.name == "fashion-mlp4-sm"
    assert job.model.mlp == MlpConfig(widths=[784, 128, 128, 128, 10], activation="relu", bias=True)
    assert job.model.factory is None
    assert job.model.balance == [1, 1, 1, 1]
    assert num_layers(job.model) == 4
    assert job.data.dataset == "fashion_mnist"
    assert job.data.train_subset == 2000 and job.data.test_subset is None
    assert job.data.batch == "full" and job.data.microbatches == 4
    assert job.data.shuffle is True
    assert job.data.synthetic == SyntheticConfig()
    assert job.loss == "cross_entropy"
    # YAML wrote 0.0 and 0.3; ints given for float fields must also come back as floats.
    assert isinstance(job.optimizer.delta_abs, float) and job.optimizer.delta_abs == 0.0
    assert job.optimizer.inner_lr is None
    assert job.optimizer.delta_floor == 1e-12
    assert isinstance(job.optimizer, SMOptions) and not hasattr(job.optimizer, "betas")
    assert job.optimizer.armijo_c == 0.1 and job.optimizer.power_warm_start is True
    assert job.run == RunConfig(iterations=30, seed=0, dtype="float64", device="cpu",
                                eval_every=10, runs_dir="runs", threads=0)


def test_minimal_job_gets_defaults() -> None:
    job = job_from_dict(synthetic_raw())
    assert job.optimizer == SMOptions()
    assert job.run == RunConfig()
    assert job.data == DataConfig(dataset="synthetic")
    assert job.loss == "cross_entropy"
    assert num_layers(job.model) == 3


def test_int_is_accepted_as_float() -> None:
    job = job_from_dict(example_raw(), ["optimizer.inner_lr=1", "optimizer.delta_rel=2"])
    assert job.optimizer.inner_lr == 1.0 and isinstance(job.optimizer.inner_lr, float)
    assert isinstance(job.optimizer.delta_rel, float)


def test_exponent_without_dot_is_a_float() -> None:
    # YAML 1.1 reads `1e-3` as a string; a float field still takes it.
    job = job_from_dict(example_raw(), ["optimizer.inner_lr=1e-3", "optimizer.cg_tol=1E-8"])
    assert job.optimizer.inner_lr == pytest.approx(1e-3)
    assert job.optimizer.cg_tol == pytest.approx(1e-8)


def test_overrides_of_nested_keys_lists_and_null(example_file: Path) -> None:
    job = load_job(example_file, [
        "optimizer.inner_steps=5",
        "optimizer.inner_lr=0.5",
        "optimizer.inner_lr=null",  # later overrides win
        "data.train_subset=null",
        "data.batch=64",
        "model.mlp.widths=[784, 32, 10]",
        "model.balance=[1,1]",
        "run.device=cuda",
        "data.synthetic.seed=7",
    ])
    assert job.optimizer.inner_steps == 5
    assert job.optimizer.inner_lr is None
    assert job.data.train_subset is None
    assert job.data.batch == 64
    assert job.model.mlp is not None and job.model.mlp.widths == [784, 32, 10]
    assert job.model.balance == [1, 1]
    assert job.run.device == "cuda"
    assert job.data.synthetic.seed == 7


def test_apply_overrides_parses_yaml_and_creates_sections() -> None:
    raw = {"name": "x", "optimizer": {"lr": 0.1}}
    result = apply_overrides(raw, ["optimizer.lr=0.5", "run.seed=3", "a.b.c=true",
                                   "name=007", "data.root=some/dir", "model.balance=[1, 2]"])
    assert result["optimizer"]["lr"] == 0.5
    assert result["run"] == {"seed": 3}
    assert result["a"] == {"b": {"c": True}}
    assert result["name"] == 7  # YAML reads it as a number; validation rejects it later
    assert result["data"]["root"] == "some/dir"
    assert result["model"]["balance"] == [1, 2]
    assert raw == {"name": "x", "optimizer": {"lr": 0.1}}, "the input must not be modified"


def test_apply_overrides_value_may_contain_equals() -> None:
    assert apply_overrides({}, ["run.runs_dir=a=b"]) == {"run": {"runs_dir": "a=b"}}


@pytest.mark.parametrize("bad", ["optimizer.lr", "=3", "optimizer..lr=1", ".lr=1", "lr.=1"])
def test_malformed_override_is_named(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides({}, [bad])
    assert len(caught.value.errors) == 1
    assert repr(bad) in caught.value.errors[0]


def test_override_into_a_scalar_is_an_error() -> None:
    errors = errors_of(example_raw(), ("loss.kind=x",))
    assert any("loss is the string 'cross_entropy', not a section" in e for e in errors)


def test_unknown_key_suggests_close_match() -> None:
    errors = errors_of(example_raw(), ("optimizer.inner_step=3",))
    assert errors == [
        "optimizer.inner_step: unknown key 'optimizer.inner_step'; "
        "did you mean 'optimizer.inner_steps'?"
    ]


def test_unknown_key_in_wrong_section_points_to_the_right_one() -> None:
    raw = example_raw()
    raw["lr"] = 0.1
    assert errors_of(raw) == ["lr: unknown key 'lr'; did you mean 'optimizer.lr'?"]


def test_unknown_key_without_match_lists_valid_keys() -> None:
    raw = example_raw()
    raw["run"]["zzzz"] = 1
    (error,) = errors_of(raw)
    assert error.startswith("run.zzzz: unknown key 'run.zzzz'; valid keys in run: iterations, ")
    assert "threads" in error


def adam_if_needed(override: str) -> tuple[str, ...]:
    """Adam's options are checked with optimizer.name switched to adam (the example is SM)."""
    if override.startswith(("optimizer.lr", "optimizer.betas")):
        return ("optimizer.name=adam", override)
    return (override,)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr=fast", "optimizer.lr: expected a number, got the string 'fast'"),
        ("optimizer.lr='0.1'", "optimizer.lr: expected a number, got the string '0.1'; "
                               "remove the quotes"),
        ("run.iterations=true", "run.iterations: expected an integer, got the boolean true"),
        ("run.iterations=2.5", "run.iterations: expected an integer, got the number 2.5"),
        ("optimizer.lr=false", "optimizer.lr: expected a number, got the boolean false"),
        ("data.flatten=1", "data.flatten: expected true or false, got the integer 1"),
        ("run.runs_dir=5", "run.runs_dir: expected a string, got the integer 5"),
        ("data.batch=half", "data.batch: expected 'full' or an integer, got the string 'half'"),
        ("model.balance=2", "model.balance: expected a list of integers, got the integer 2"),
        ("model.balance=[1, x, 1, 1]", "model.balance[1]: expected an integer, got the string"),
        ("optimizer.lr=.inf", "optimizer.lr: expected a finite number"),
        ("run=3", "run: expected a section (a mapping of keys), got the integer 3"),
        ("data.train_subset=abc", "data.train_subset: expected an integer, got the string 'abc'"),
    ],
)
def test_wrong_types_are_reported(override: str, expected: str) -> None:
    errors = errors_of(example_raw(), adam_if_needed(override))
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]
    assert "; " in errors[0], "every error says how to fix it"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.microbatches=0", "data.microbatches: must be >= 1, got 0"),
        ("optimizer.lr=0", "optimizer.lr: must be > 0, got 0.0"),
        ("optimizer.armijo_c=1", "optimizer.armijo_c: must be < 1, got 1.0"),
        ("optimizer.betas=[0.9, 1.0]", "optimizer.betas[1]: must be < 1, got 1.0"),
        ("optimizer.betas=[0.9]", "optimizer.betas: needs exactly 2 entries, got 1"),
        ("model.balance=[2, 0, 2]", "model.balance[1]: must be >= 1, got 0"),
        ("run.eval_every=-1", "run.eval_every: must be >= 0, got -1"),
        ("name=runs/../x", "name: 'runs/../x' is not a valid run name"),
        ("name=..", "name: '..' is not a valid run name"),
        ("name=''", "name: '' is not a valid run name"),
    ],
)
def test_bounds_and_patterns_are_enforced(override: str, expected: str) -> None:
    errors = errors_of(example_raw(), adam_if_needed(override))
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]


def test_unknown_dataset_lists_choices_and_suggests() -> None:
    errors = errors_of(example_raw(), ("data.dataset=fashionmnist",))
    assert errors == [
        "data.dataset: unknown value 'fashionmnist'; choose one of mnist, fashion_mnist, "
        "synthetic, text (did you mean 'fashion_mnist'?)"
    ]


def test_choice_without_close_match_lists_choices() -> None:
    (error,) = errors_of(example_raw(), ("run.dtype=bfloat",))
    assert error.startswith("run.dtype: unknown value 'bfloat'; choose one of float32, float64")


def test_balance_must_sum_to_the_number_of_layers() -> None:
    errors = errors_of(example_raw(), ("model.balance=[1, 1, 1]",))
    assert errors == [
        "model.balance: balance [1, 1, 1] covers 3 layers but model.mlp.widths defines 4; "
        "make the entries sum to 4"
    ]


def test_more_stages_than_layers() -> None:
    errors = errors_of(example_raw(), ("model.balance=[1, 1, 1, 1, 1]",))
    assert len(errors) == 2
    assert "covers 5 layers but model.mlp.widths defines 4" in errors[0]
    assert errors[1].startswith("model.balance: 5 stages but the model has only 4 layers")


def test_missing_required_keys() -> None:
    raw = example_raw()
    del raw["name"], raw["data"]["dataset"], raw["model"]["balance"]
    errors = errors_of(raw)
    assert [e.split(":")[0] for e in errors] == ["name", "model.balance", "data"]
    assert all("missing required key" in e for e in errors[:2])
    assert errors[2].startswith("data: neither of data.dataset and data.factory given")
    assert errors_of({})[1:] == [
        "model: missing required section; add a `model:` block",
        "data: missing required section; add a `data:` block",
    ]


def test_section_that_is_not_a_mapping() -> None:
    raw = example_raw()
    raw["optimizer"] = ["sm"]
    (error,) = errors_of(raw)
    assert error.startswith("optimizer: expected a section (a mapping of keys), got a list")


def test_empty_section_means_defaults() -> None:
    raw = example_raw()
    raw["optimizer"] = None
    assert job_from_dict(raw).optimizer == SMOptions()


def test_mlp_and_factory_are_exclusive() -> None:
    raw = example_raw()
    raw["model"]["factory"] = "mypkg.models:build"
    (error,) = errors_of(raw)
    assert error.startswith("model: both of model.mlp and model.factory given")
    raw["model"] = {"balance": [1]}
    (error,) = errors_of(raw)
    assert error.startswith("model: none of model.mlp, model.cnn, model.transformer and "
                            "model.factory given")


def test_factory_model() -> None:
    raw = example_raw()
    raw["model"] = {"factory": "mypkg.models:build_cnn", "balance": [3, 2]}
    job = job_from_dict(raw, ["data.flatten=false"])
    assert job.model.factory == "mypkg.models:build_cnn"
    assert num_layers(job.model) is None
    (error,) = errors_of(raw, ("model.factory=mypkg.build_cnn",))
    assert error == "model.factory: 'mypkg.build_cnn' must look like 'package.module:function'"


def test_microbatch_limits() -> None:
    (error,) = errors_of(example_raw(), ("data.batch=2",))
    assert error.startswith("data.microbatches: 4 microbatches exceed the batch of 2 samples")
    (error,) = errors_of(example_raw(), ("data.train_subset=3",))
    assert "exceed the batch of 3 samples (data.train_subset)" in error
    (error,) = errors_of(synthetic_raw(), ("data.microbatches=600",))
    assert "exceed the batch of 512 samples (data.synthetic.train_size)" in error
    job_from_dict(example_raw(), ["data.train_subset=null", "data.microbatches=64"])


def test_optimizer_cross_checks() -> None:
    (error,) = errors_of(example_raw(), ("optimizer.delta_rel=0",))
    assert error.startswith("optimizer.delta_rel: delta_rel and delta_abs are both 0")
    job_from_dict(example_raw(), ["optimizer.delta_rel=0", "optimizer.delta_abs=0.1"])
    (error,) = errors_of(example_raw(), ("optimizer.rho=0.1",))
    assert error.startswith("optimizer.rho: rho = 0.1 needs inner_solver: gradient")
    job = job_from_dict(example_raw(), ["optimizer.rho=0.1", "optimizer.inner_solver=gradient"])
    assert job.optimizer.rho == 0.1
    for name in ("sso", "cgblock"):  # their inner steps are pipeline passes: nothing to fill
        (error,) = errors_of(example_raw(), (f"optimizer.name={name}",
                                             "optimizer.inner_steps={min: 2, max: 9}"))
        assert error.startswith(f"optimizer.inner_steps: {name} needs a fixed number")
        job_from_dict(example_raw(), [f"optimizer.name={name}", "optimizer.inner_steps=4"])


def test_mlp_must_fit_the_data() -> None:
    errors = errors_of(example_raw(), ("model.mlp.widths=[100, 128, 128, 128, 7]",))
    assert errors[0].startswith("model.mlp.widths: first width 100 does not match")
    assert "set model.mlp.widths[0] to 784" in errors[0]
    assert "set model.mlp.widths[-1] to 10" in errors[1]
    (error,) = errors_of(example_raw(), ("data.flatten=false",))
    assert error.startswith("data.flatten: false, but model.mlp needs vectors")
    errors = errors_of(synthetic_raw(), ("data.synthetic.features=8", "data.synthetic.classes=3"))
    assert "data.synthetic.features (8)" in errors[0]
    assert "data.synthetic.classes (3)" in errors[1]


def test_file_with_several_mistakes_reports_all(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(EXAMPLE_YAML.replace("inner_steps: 20", "inner_step: 20")
                    .replace("dataset: fashion_mnist", "dataset: fashionmnist")
                    .replace("balance: [1, 1, 1, 1]", "balance: [1, 1, 1]")
                    .replace("iterations: 30", "iterations: lots")
                    .replace("microbatches: 4", "microbatches: 0"))
    with pytest.raises(ConfigError) as caught:
        load_job(path, ["run.dtype=float16"])
    err = caught.value
    keys = sorted(error.split(":")[0] for error in err.errors)
    assert keys == ["data.dataset", "data.microbatches", "model.balance", "optimizer.inner_step",
                    "run.dtype", "run.iterations"]
    lines = str(err).splitlines()
    assert lines[0] == f"job file {path} has 6 errors:"
    assert all(line.startswith("  - ") for line in lines[1:]) and len(lines) == 7


def test_single_error_header() -> None:
    with pytest.raises(ConfigError) as caught:
        job_from_dict(example_raw(), ["run.seed=x"], source="test job")
    assert str(caught.value).splitlines()[0] == "job test job has 1 error:"


def test_job_to_dict_round_trip() -> None:
    job = job_from_dict(example_raw(), ["optimizer.inner_lr=0.25", "data.batch=128"])
    plain = job_to_dict(job)
    assert isinstance(plain, dict) and isinstance(plain["optimizer"], dict)
    assert plain["model"]["mlp"]["widths"] == [784, 128, 128, 128, 10]
    assert job_from_dict(plain) == job
    factory_job = dataclasses.replace(job, model=ModelConfig(factory="pkg.mod:fn", balance=[2]))
    assert job_from_dict(job_to_dict(factory_job)) == factory_job


def test_dump_and_load_round_trip(example_file: Path, tmp_path: Path) -> None:
    job = load_job(example_file, ["optimizer.delta_floor=1e-9", "run.threads=2"])
    out = tmp_path / "runs" / job.name / "job.yaml"
    dump_job(job, out)
    assert load_job(out) == job
    text = out.read_text()
    assert text.index("name:") < text.index("model:") < text.index("run:")  # schema order


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_job(tmp_path / "nope.yaml")
    (error,) = caught.value.errors
    assert "nope.yaml: cannot read the job file" in error


def test_yaml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {mlp: [1, 2\n")
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    (error,) = caught.value.errors
    assert "YAML syntax error at line" in error


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert caught.value.errors[0].startswith("(top level): expected a mapping of sections")


def test_config_error_pickles() -> None:
    err = ConfigError(["a: b; c"], "file x.yaml")
    copy = pickle.loads(pickle.dumps(err))
    assert copy.errors == err.errors and str(copy) == str(err)


def test_schema_rules_are_readable_as_data() -> None:
    rules = {f.name: dict(f.metadata) for f in dataclasses.fields(DataConfig)}
    assert rules["dataset"]["choices"] == ("mnist", "fashion_mnist", "synthetic", "text")
    assert rules["microbatches"]["min"] == 1
    betas = next(f for f in dataclasses.fields(AdamOptions) if f.name == "betas")
    assert betas.metadata["lt"] == 1 and betas.metadata["length"] == 2
