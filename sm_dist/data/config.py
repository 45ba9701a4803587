"""The job file's `data` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sm_dist.data.datasets import DATASETS, NORMALIZATIONS
from sm_dist.data.text import DEFAULT_TEXT_BYTES

FACTORY_PATTERN = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"


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
    dataset: str | None = field(default=None, metadata={"choices": DATASETS})
    # Your own data: 'package.module:function' returning tensors or torch Datasets
    # (sm_dist/data/custom.py); give it or `dataset`.
    factory: str | None = field(default=None, metadata={
        "pattern": FACTORY_PATTERN, "pattern_hint": "must look like 'package.module:function'"})
    root: str = "data/"
    train_subset: int | None = field(default=None, metadata={"min": 1})
    test_subset: int | None = field(default=None, metadata={"min": 1})
    normalize: str = field(default="standard", metadata={"choices": NORMALIZATIONS})
    flatten: bool = True
    batch: Literal["full"] | int = field(default="full", metadata={"min": 1})
    microbatches: int = field(default=1, metadata={"min": 1})
    # Minibatch runs: this many passes over the training set (the run's iterations follow
    # from it, and run.iterations is not used); null: run.iterations decides.
    epochs: int | None = field(default=None, metadata={"min": 1})
    shuffle: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # dataset: text — the file read byte by byte (null: the Python standard library's
    # sources), tokens per sample, and the most bytes read (null: all).
    path: str | None = None
    context: int = field(default=64, metadata={"min": 1})
    text_bytes: int | None = field(default=DEFAULT_TEXT_BYTES, metadata={"min": 1})

    def minibatches(self) -> bool:
        """Whether the batch changes every iteration, as far as the job file says (a batch of
        a set whose size it does not give counts as minibatches; training knows:
        BatchStream.full)."""
        return self.batch != "full" and (self.train_subset is None
                                         or self.batch < self.train_subset)
