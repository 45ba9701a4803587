"""Tests for sm_dist.models: MLP building, factories, stage splitting, init, flat parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sm_dist.math.local_loss import flatten
from sm_dist.models.build import (
    build_mlp,
    build_model_from_factory,
    check_samplewise,
    init_model,
    num_params,
    split_stages,
)


def test_build_mlp_structure() -> None:
    model = build_mlp([784, 64, 32, 10], activation="tanh")
    assert isinstance(model, nn.Sequential) and len(model) == 3
    for layer, (fan_in, fan_out) in zip(model[:2], [(784, 64), (64, 32)]):
        assert isinstance(layer, nn.Sequential) and len(layer) == 2
        assert isinstance(layer[0], nn.Linear) and isinstance(layer[1], nn.Tanh)
        assert (layer[0].in_features, layer[0].out_features) == (fan_in, fan_out)
    last = model[2]
    assert isinstance(last, nn.Sequential) and len(last) == 1
    assert isinstance(last[0], nn.Linear) and last[0].out_features == 10
    assert model(torch.randn(5, 784)).shape == (5, 10)
    assert num_params(model) == 784 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10


def test_build_mlp_options_and_errors() -> None:
    model = build_mlp([4, 3], activation="gelu", bias=False)
    assert len(model) == 1 and model[0][0].bias is None
    assert isinstance(build_mlp([4, 5, 3], activation="relu")[0][1], nn.ReLU)
    assert isinstance(build_mlp([4, 5, 3], activation="gelu")[0][1], nn.GELU)
    with pytest.raises(ValueError, match="relu, tanh, gelu"):
        build_mlp([4, 3], activation="sigmoid")
    with pytest.raises(ValueError, match="at least"):
        build_mlp([4])


def test_split_stages() -> None:
    model = build_mlp([8, 7, 6, 5, 4])
    stages = split_stages(model, [1, 2, 1])
    assert [len(s) for s in stages] == [1, 2, 1]
    assert stages[0][0] is model[0] and stages[1][0] is model[1] and stages[1][1] is model[2]
    assert stages[2][0] is model[3]
    # Stages share the model's parameters, and running them in turn is running the model.
    assert sum(num_params(s) for s in stages) == num_params(model)
    x = torch.randn(3, 8)
    out = x
    for stage in stages:
        out = stage(out)
    torch.testing.assert_close(out, model(x))
    assert [len(s) for s in split_stages(model, [4])] == [4]


def test_split_stages_errors() -> None:
    model = build_mlp([8, 7, 6, 5, 4])
    with pytest.raises(ValueError, match=r"sums to 3 .* 4 top-level"):
        split_stages(model, [1, 1, 1])
    with pytest.raises(ValueError, match=r"sums to 5 .* 4 top-level"):
        split_stages(model, [2, 2, 1])
    with pytest.raises(ValueError, match="at least 1"):
        split_stages(model, [0, 4])
    with pytest.raises(ValueError):
        split_stages(model, [])


FACTORY_SOURCE = """
from torch import nn


def make():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def not_sequential():
    return nn.Linear(3, 2)
"""


def test_factory_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sm_dist_test_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model_from_factory("sm_dist_test_factory:make")
    assert isinstance(model, nn.Sequential) and len(model) == 3
    with pytest.raises(TypeError, match="sm_dist_test_factory:not_sequential"):
        build_model_from_factory("sm_dist_test_factory:not_sequential")
    with pytest.raises(ValueError, match="sm_dist_test_factory:missing"):
        build_model_from_factory("sm_dist_test_factory:missing")
    with pytest.raises(ValueError, match="no_such_module_xyz:make"):
        build_model_from_factory("no_such_module_xyz:make")
    with pytest.raises(ValueError, match="package.module:function"):
        build_model_from_factory("sm_dist_test_factory.make")


def test_batchnorm_rejected() -> None:
    check_samplewise(build_mlp([4, 5, 3]))
    check_samplewise(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4)))
    for norm in (nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.SyncBatchNorm(4)):
        stage = nn.Sequential(nn.Linear(4, 4), nn.Sequential(norm))
        with pytest.raises(ValueError, match="GroupNorm"):
            check_samplewise(stage)


def test_init_model_deterministic() -> None:
    def builder() -> nn.Sequential:
        return build_mlp([6, 5, 3])

    a = init_model(builder, seed=11, dtype=torch.float64)
    b = init_model(builder, seed=11, dtype=torch.float64)
    c = init_model(builder, seed=12, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in a.parameters())
    assert torch.equal(flatten(list(a.parameters())), flatten(list(b.parameters())))
    assert not torch.equal(flatten(list(a.parameters())), flatten(list(c.parameters())))
    half = init_model(builder, seed=11, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
