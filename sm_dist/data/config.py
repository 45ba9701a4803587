"""The job file's `data` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sm_dist.data.datasets import DATASETS, NORMALIZATIONS


@dataclass(kw_only=True)
class SyntheticConfig:
    """Shape and seed of the generated classification data used by `dataset: synthetic`."""
    features: int = field(default=20, metadata={"min": 1})
    classes: int = field(default=10, metadata={"min": 2})
    train_size: int = field(default=512, metadata={"min": 1})
    test_size: int = field(default=256, metadata={"min": 1})
    seed: int = 0


@dataclass(kw_only=True)
class DataConfig:
    """Which data set to load, how to preprocess it and how to cut it into (micro)batches."""
    dataset: str = field(metadata={"choices": DATASETS})
    root: str = "data/"
    train_subset: int | None = field(default=None, metadata={"min": 1})
    test_subset: int | None = field(default=None, metadata={"min": 1})
    normalize: str = field(default="standard", metadata={"choices": NORMALIZATIONS})
    flatten: bool = True
    batch: Literal["full"] | int = field(default="full", metadata={"min": 1})
    microbatches: int = field(default=1, metadata={"min": 1})
    shuffle: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
