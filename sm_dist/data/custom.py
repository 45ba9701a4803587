"""Your own data: tensors or torch Datasets from a `data.factory` (or from the Python API),
checked, and turned into the in-memory Dataset the rest of sm-dist uses."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sm_dist.data.datasets import DataError, Dataset

# What a data factory returns (and what the API's `data=` takes): (train_x, train_y),
# (train_x, train_y, test_x, test_y), or (train, test) / train as torch Datasets of (x, y).
DataLike = Any
API_DATA_FACTORY = "sm_dist.api:provided_data"  # data.factory of data given to sm_dist.train


def source_of(factory: str) -> str:
    """How error messages name a data factory."""
    return "train(data=...)" if factory == API_DATA_FACTORY else f"data factory {factory!r}"


def import_factory(spec: str) -> Callable[[], Any]:
    """Import 'package.module:function' (user code: any failure is a DataError)."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise DataError(f"cannot import data factory {spec!r}: {type(exc).__name__}: {exc}; "
                        "check that its module is on the Python path") from exc
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise DataError(f"data factory {spec!r}: module {module_name!r} has no function "
                        f"{function_name!r}")
    return factory


def call_factory(spec: str) -> DataLike:
    try:
        return import_factory(spec)()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data factory {spec!r} raised {type(exc).__name__}: {exc}") from exc


def _materialise(dataset: torch.utils.data.Dataset, what: str) -> tuple[Tensor, Tensor]:
    """Every (x, y) of a map-style Dataset, stacked (sm-dist keeps its data in memory)."""
    try:
        items = [dataset[k] for k in range(len(dataset))]  # type: ignore[arg-type]
    except Exception as exc:
        raise DataError(f"{what}: reading the Dataset's items failed ({type(exc).__name__}: "
                        f"{exc}); it must be map-style, each item an (x, y) pair") from exc
    if not items:
        raise DataError(f"{what}: the Dataset is empty")
    try:
        xs = torch.stack([torch.as_tensor(x) for x, _ in items])
        ys = torch.as_tensor([int(y) for _, y in items])
    except Exception as exc:
        raise DataError(f"{what}: its items are not (tensor, integer label) pairs of one shape "
                        f"({type(exc).__name__}: {exc})") from exc
    return xs, ys


def _split(value: DataLike, source: str) -> list[tuple[Tensor, Tensor]]:
    if isinstance(value, torch.utils.data.Dataset):
        return [_materialise(value, f"{source}, the training set")]
    if isinstance(value, (tuple, list)):
        if all(isinstance(v, Tensor) for v in value) and len(value) in (2, 4):
            return [(value[k], value[k + 1]) for k in range(0, len(value), 2)]
        if len(value) == 2 and all(isinstance(v, torch.utils.data.Dataset) for v in value):
            return [_materialise(value[0], f"{source}, the training set"),
                    _materialise(value[1], f"{source}, the test set")]
    raise DataError(f"{source} gave {type(value).__name__}; give (train_x, train_y), "
                    "(train_x, train_y, test_x, test_y), or torch Datasets (train, test)")


def _checked(x: Tensor, y: Tensor, what: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if x.dim() < 1 or y.dim() != 1:
        raise DataError(f"{what}: labels must be one per sample (1-D), got shape "
                        f"{tuple(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} inputs but {len(y)} labels; give one label per input")
    if len(x) == 0:
        raise DataError(f"{what}: no samples")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"{what}: labels must be integer class indices, got {y.dtype}")
    if int(y.min()) < 0:
        raise DataError(f"{what}: labels must be >= 0, got {int(y.min())}")
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int64, torch.int32)):
        raise DataError(f"{what}: inputs must be numbers, got {x.dtype}")
    return x.to(dtype).contiguous(), y.to(torch.int64)


def dataset_from(value: DataLike, source: str, dtype: torch.dtype) -> Dataset:
    """Check what a factory (or the API) gave and make a Dataset of it. Without a test split,
    the test set is empty and no evaluation runs."""
    splits = _split(value, source)
    train_x, train_y = _checked(*splits[0], f"{source}, the training set", dtype)
    if len(splits) > 1:
        test_x, test_y = _checked(*splits[1], f"{source}, the test set", dtype)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise DataError(f"{source}: test inputs of shape {tuple(test_x.shape[1:])} but "
                            f"training inputs of shape {tuple(train_x.shape[1:])}")
    else:
        test_x, test_y = train_x[:0], train_y[:0]
    classes = int(max(train_y.max(), test_y.max() if len(test_y) else train_y.max())) + 1
    return Dataset(train_x, train_y, test_x, test_y, classes, source)


def take_subsets(data: Dataset, train_subset: int | None, test_subset: int | None) -> Dataset:
    """The first `train_subset` / `test_subset` samples (data.train_subset, data.test_subset)."""
    for subset, size, what in ((train_subset, len(data.train_x), "train_subset"),
                               (test_subset, len(data.test_x), "test_subset")):
        if subset is not None and subset > size:
            raise DataError(f"data.{what}={subset} is larger than the {size} samples of "
                            f"{data.name}; use at most {size}")
    return Dataset(data.train_x[:train_subset], data.train_y[:train_subset],
                   data.test_x[:test_subset], data.test_y[:test_subset], data.num_classes,
                   data.name)


def check_fits(stages: Sequence[nn.Module], data: Dataset, loss: str) -> None:
    """That the model takes the data's inputs and gives one score per class for every label:
    a forward pass of two samples, with the error said in terms of the data. Labels of shape
    (n,) need outputs (n, C); labels (n, T), as text's next tokens, need outputs (n, T, C)."""
    sample = data.train_x[:2]
    try:
        with torch.no_grad():
            out = sample
            for stage in stages:
                out = stage(out)
    except Exception as exc:
        raise DataError(f"the model cannot take the data's inputs of shape "
                        f"{tuple(sample.shape[1:])}: {type(exc).__name__}: {exc}") from exc
    labels = tuple(data.train_y.shape[1:])
    if out.shape[:-1] != (len(sample), *labels):
        shape = ", ".join(str(size) for size in labels)
        wanted = ("one score per class (a vector)" if not labels else
                  f"class scores for each of its labels, outputs of shape ({shape}, classes)")
        raise DataError(f"the model gives outputs of shape {tuple(out.shape[1:])} per sample; "
                        f"it must give {wanted}")
    width = out.shape[-1]
    if width < data.num_classes or (loss == "mse" and width != data.num_classes):
        raise DataError(f"the labels go up to {data.num_classes - 1} ({data.num_classes} "
                        f"classes) but the model has {width} outputs; give it "
                        f"{data.num_classes} outputs")
