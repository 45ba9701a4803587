"""In-memory datasets: MNIST, Fashion-MNIST (torchvision, Debian package), synthetic data and
byte-level text."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sm_dist.data.idx_cache import read_cached, write_cached
from sm_dist.data.text import DEFAULT_TEXT_BYTES, VOCAB, TextError, load_text

DATASETS = ("mnist", "fashion_mnist", "synthetic", "text")
NORMALIZATIONS = ("standard", "none")
DISPLAY_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
# torchvision's dataset classes, whose names are also their directories under data.root.
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

# Where Debian's `dataset-fashion-mnist` package installs the gzipped IDX files.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "SM_DIST_FASHION_MNIST_DIR"

# The four IDX files torchvision's MNIST-family datasets read from <root>/<Class>/raw/.
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

SYNTHETIC_KEYS = ("features", "classes", "train_size", "test_size", "seed")


class DataError(Exception):
    """A dataset could not be loaded or an argument is invalid; the message says how to fix it."""


@dataclass
class Dataset:
    """A whole dataset held in memory: inputs, int64 labels, and the number of classes.

    A sample of `text` is a sequence: inputs (n, T) of int64 tokens, labels (n, T) the next
    tokens, and num_classes the vocabulary.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    name: str


def fashion_mnist_system_dir() -> Path:
    """The directory holding the Debian package's Fashion-MNIST files (env var overrides)."""
    return Path(os.environ.get(FASHION_MNIST_DIR_ENV, DEFAULT_FASHION_MNIST_DIR))


def load_dataset(
    dataset: str,
    root: str,
    *,
    train_subset: int | None,
    test_subset: int | None,
    normalize: str,
    flatten: bool,
    dtype: torch.dtype,
    synthetic: dict[str, Any] | None = None,
    path: str | None = None,
    context: int = 64,
    text_bytes: int | None = DEFAULT_TEXT_BYTES,
) -> Dataset:
    """Load `dataset` fully into memory, normalised, optionally flattened, cut to the subsets.

    `path`, `context` and `text_bytes` are text's (its file, tokens per sample, bytes read);
    normalisation and flattening do not apply to it.
    """
    if normalize not in NORMALIZATIONS:
        raise DataError(
            f"unknown normalize {normalize!r}: choose one of {', '.join(NORMALIZATIONS)}"
        )
    if dataset == "text":
        return _load_text(path, context, text_bytes, train_subset, test_subset)
    if dataset == "synthetic":
        return _load_synthetic(synthetic, normalize, train_subset, test_subset, dtype)
    if dataset not in ("mnist", "fashion_mnist"):
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")

    train_images, train_labels, test_images, test_labels = _load_idx_dataset(dataset, root)
    # Statistics come from the FULL training set, whatever subset is taken afterwards.
    mean, std = _pixel_mean_std(train_images) if normalize == "standard" else (0.0, 1.0)
    train_images, train_labels = _take_subset(
        train_images, train_labels, train_subset, "train_subset", dataset
    )
    test_images, test_labels = _take_subset(
        test_images, test_labels, test_subset, "test_subset", dataset
    )
    return Dataset(
        train_x=_images_to_inputs(train_images, mean, std, flatten, dtype),
        train_y=train_labels.to(torch.int64),
        test_x=_images_to_inputs(test_images, mean, std, flatten, dtype),
        test_y=test_labels.to(torch.int64),
        num_classes=10,
        name=dataset,
    )


def _load_text(path: str | None, context: int, text_bytes: int | None,
               train_subset: int | None, test_subset: int | None) -> Dataset:
    """Byte-level next-token contexts of a text (data/text.py), cut to the subsets."""
    try:
        train_x, train_y, test_x, test_y = load_text(path, context, text_bytes)
    except TextError as exc:
        raise DataError(str(exc)) from exc
    for subset, have, what in ((train_subset, len(train_x), "train_subset"),
                               (test_subset, len(test_x), "test_subset")):
        if isinstance(subset, int) and subset > have:
            raise DataError(f"data.{what}={subset} is more than the {have} contexts the "
                            f"text holds (data.text_bytes={text_bytes}, data.context="
                            f"{context}); use at most {have}, or raise data.text_bytes")
    train_x, train_y = _take_subset(train_x, train_y, train_subset, "train_subset", "text")
    test_x, test_y = _take_subset(test_x, test_y, test_subset, "test_subset", "text")
    return Dataset(train_x, train_y, test_x, test_y, num_classes=VOCAB, name="text")


def _load_synthetic(synthetic: dict[str, Any] | None, normalize: str,
                    train_subset: int | None, test_subset: int | None,
                    dtype: torch.dtype) -> Dataset:
    """The seeded synthetic classification set, normalised, cut to the subsets."""
    if synthetic is None:
        raise DataError(
            "dataset 'synthetic' needs its parameters: pass synthetic="
            f"{{{', '.join(repr(k) + ': ...' for k in SYNTHETIC_KEYS)}}}"
        )
    train_x, train_y, test_x, test_y, num_classes = _make_synthetic(synthetic)
    if normalize == "standard":
        # Per-feature statistics of the training set, applied to both splits.
        mean = train_x.mean(dim=0, keepdim=True)
        std = train_x.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-12)
        train_x = (train_x - mean) / std
        test_x = (test_x - mean) / std
    train_x, train_y = _take_subset(train_x, train_y, train_subset, "train_subset", "synthetic")
    test_x, test_y = _take_subset(test_x, test_y, test_subset, "test_subset", "synthetic")
    return Dataset(
        train_x=train_x.to(dtype).contiguous(),
        train_y=train_y,
        test_x=test_x.to(dtype).contiguous(),
        test_y=test_y,
        num_classes=num_classes,
        name="synthetic",
    )


def _take_subset(
    x: Tensor, y: Tensor, subset: int | None, what: str, dataset: str
) -> tuple[Tensor, Tensor]:
    """The first `subset` samples (all of them when None)."""
    if subset is None:
        return x, y
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 1:
        raise DataError(f"{what} must be a positive integer or None, got {subset!r}")
    if subset > len(x):
        raise DataError(
            f"{what}={subset} is larger than the {len(x)} samples of {dataset}: "
            f"use at most {len(x)}, or None for all of them"
        )
    return x[:subset], y[:subset]


def _pixel_mean_std(images: Tensor) -> tuple[float, float]:
    """Exact scalar mean and (population) std of uint8 pixels / 255, from a 256-bin histogram."""
    counts = torch.bincount(images.reshape(-1).to(torch.int64), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum()
    mean = (counts * values).sum() / total
    var = (counts * (values - mean) ** 2).sum() / total
    return float(mean), float(var.sqrt().clamp_min(1e-12))


def _images_to_inputs(
    images: Tensor, mean: float, std: float, flatten: bool, dtype: torch.dtype
) -> Tensor:
    """uint8 (n, 28, 28) images to normalised float inputs of shape (n, 784) or (n, 1, 28, 28)."""
    # Half-precision targets are computed in float32 first so the rounding happens once.
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = images.to(work_dtype).div_(255.0)
    if mean != 0.0 or std != 1.0:
        x.sub_(mean).div_(std)
    x = x.reshape(len(x), -1) if flatten else x.reshape(len(x), 1, *images.shape[1:])
    return x.to(dtype).contiguous()


def _layout_present(raw_dir: Path, processed_dir: Path) -> bool:
    """Whether torchvision's raw (four IDX files) or legacy processed layout is complete."""
    raw_ok = all((raw_dir / name).is_file() for name in IDX_FILES)
    legacy_ok = all((processed_dir / name).is_file() for name in ("training.pt", "test.pt"))
    return raw_ok or legacy_ok


def _copy_system_fashion_mnist(system_dir: Path, raw_dir: Path) -> bool:
    """Decompress the Debian package's .gz IDX files into `raw_dir`; False if any is missing."""
    sources = [system_dir / f"{name}.gz" for name in IDX_FILES]
    if not all(src.is_file() for src in sources):
        return False
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, src in zip(IDX_FILES, sources):
        dest = raw_dir / name
        if dest.is_file():
            continue
        # A unique temp file renamed into place: an interrupted copy never looks complete,
        # and concurrent ranks decompressing at once cannot corrupt each other's output.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=raw_dir)
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, length=1 << 20)
            os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; other users may share the root
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return True


def _missing_dataset_message(dataset: str, root: str, raw_dir: Path, error: Exception) -> str:
    """What went wrong and the ways to get the files, for a dataset that is nowhere to be found."""
    files = ", ".join(IDX_FILES)
    looked = [f"{raw_dir} (torchvision's layout under root={root!r})"]
    if dataset == "fashion_mnist":
        looked.append(f"{fashion_mnist_system_dir()} (Debian package; env {FASHION_MNIST_DIR_ENV})")
        install = (
            "  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
            f"  - or place the four IDX files ({files}) in {raw_dir}/\n"
            "  - or run once with network access so torchvision can download them"
        )
    else:
        install = (
            f"  - place the four MNIST IDX files ({files}) in {raw_dir}/\n"
            "  - or run once with network access so torchvision can download them"
        )
    # torchvision's error starts with the file and ends with the network's cause.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["no detail"]
    detail = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return (
        f"{DISPLAY_NAMES[dataset]} ({dataset}) is not available: looked in "
        f"{' and '.join(looked)}, and the torchvision download failed "
        f"({type(error).__name__}: {detail}).\nTo get it:\n{install}"
    )


def _load_idx_dataset(dataset: str, root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """uint8 images and labels of both splits, from local files, the Debian package, or network
    (decoded by torchvision once, then read back from beside its files: idx_cache)."""
    class_dir = Path(root) / TORCHVISION_CLASSES[dataset]
    cached = read_cached(class_dir)
    if cached is not None:
        return cached
    # Imported here: torchvision is slow to import and only these two datasets need it.
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION_CLASSES[dataset])
    raw_dir, processed_dir = class_dir / "raw", class_dir / "processed"

    download = False
    if not _layout_present(raw_dir, processed_dir):
        try:
            copied = dataset == "fashion_mnist" and _copy_system_fashion_mnist(
                fashion_mnist_system_dir(), raw_dir
            )
        except OSError as exc:  # data.root is not writable, or the disk is full
            raise DataError(
                f"cannot write the {DISPLAY_NAMES[dataset]} files into {raw_dir} "
                f"({exc.strerror or exc}); set data.root to a writable directory"
            ) from exc
        download = not copied
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=False)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
        if download:
            raise DataError(_missing_dataset_message(dataset, root, raw_dir, exc)) from exc
        raise DataError(
            f"{dataset} files under {class_dir} could not be read ({type(exc).__name__}: {exc}): "
            f"delete {raw_dir} and {processed_dir} so they are fetched again"
        ) from exc
    arrays = (train.data, train.targets, test.data, test.targets)
    write_cached(class_dir, arrays)
    return arrays


def _make_synthetic(params: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """A learnable, deterministic set: Gaussian inputs labelled by a fixed random tanh teacher."""
    unknown = sorted(set(params) - set(SYNTHETIC_KEYS))
    missing = [k for k in SYNTHETIC_KEYS if k not in params]
    if unknown or missing:
        raise DataError(
            f"synthetic parameters must be exactly {', '.join(SYNTHETIC_KEYS)}; "
            f"missing: {missing or 'none'}, unknown: {unknown or 'none'}"
        )
    for key in SYNTHETIC_KEYS:
        value = params[key]
        low = 0 if key == "seed" else (2 if key == "classes" else 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"synthetic.{key} must be an integer >= {low}, got {value!r}")
    features, classes = params["features"], params["classes"]
    hidden = max(32, 4 * classes)

    # Everything is drawn on the CPU in float64 from seeded generators, so equal arguments
    # give the same data on every machine; the splits use their own generators so that
    # changing test_size never changes the training set.
    teacher_gen = torch.Generator().manual_seed(params["seed"])
    w1 = torch.randn(features, hidden, generator=teacher_gen, dtype=torch.float64)
    b1 = torch.randn(hidden, generator=teacher_gen, dtype=torch.float64)
    w2 = torch.randn(hidden, classes, generator=teacher_gen, dtype=torch.float64)
    train_seed, test_seed = (int(s) for s in torch.randint(0, 2**62, (2,), generator=teacher_gen))
    # Pre-activations of scale ~2 keep tanh in its nonlinear but unsaturated range.
    w1 *= 2.0 / features**0.5
    w2 /= hidden**0.5

    # A random teacher favours some classes heavily. Standardising each logit over a
    # calibration sample and fitting an output bias with damped frequency corrections makes
    # the classes close to balanced (within a few percent) for any sizes.
    calibration = (
        torch.tanh(
            torch.randn(4096, features, generator=teacher_gen, dtype=torch.float64) @ w1 + b1
        )
        @ w2
    )
    logit_mean, logit_std = calibration.mean(dim=0), calibration.std(dim=0).clamp_min(1e-12)

    def teacher_logits(x: Tensor) -> Tensor:
        return (torch.tanh(x @ w1 + b1) @ w2 - logit_mean) / logit_std

    calibration = (calibration - logit_mean) / logit_std
    b2 = torch.zeros(classes, dtype=torch.float64)
    for step in range(40):
        counts = torch.bincount((calibration + b2).argmax(dim=1), minlength=classes)
        freq = (counts.to(torch.float64) + 1.0) / (len(calibration) + classes)
        b2 -= 0.5 / (1 + step / 5) * torch.log(freq * classes).clamp(-2.0, 2.0)

    def draw(size: int, seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(size, features, generator=gen, dtype=torch.float64)
        return x, (teacher_logits(x) + b2).argmax(dim=1).to(torch.int64)

    train_x, train_y = draw(params["train_size"], train_seed)
    test_x, test_y = draw(params["test_size"], test_seed)
    return train_x, train_y, test_x, test_y, classes
