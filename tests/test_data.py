"""Tests for sm_dist.data: real Fashion-MNIST loading, synthetic data, microbatches, streams."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from sm_dist.data import datasets as data
from sm_dist.data import idx_cache
from sm_dist.data.batches import BatchStream, split_microbatches
from sm_dist.data.datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_DIR_ENV,
    IDX_FILES,
    DataError,
    Dataset,
    load_dataset,
)
from sm_dist.data.idx_cache import CACHE_NAME, read_cached
from tests.conftest import REPO

# Decompressed sizes of the IDX files: a 16-byte header for images, 8 for labels.
IDX_SIZES = {
    "train-images-idx3-ubyte": 16 + 60000 * 784,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}


def _fail_download(self: object) -> None:
    """Stand-in for torchvision's download: behave as if offline, whatever the machine has."""
    raise RuntimeError("Error downloading: no network (test)")


@pytest.fixture(autouse=True)
def _default_fashion_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's environment may override the directory; the tests decide it themselves.
    monkeypatch.delenv(FASHION_MNIST_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root into which the Debian package's Fashion-MNIST has been loaded once."""
    system_dir = Path(DEFAULT_FASHION_MNIST_DIR)
    missing = [n for n in IDX_FILES if not (system_dir / f"{n}.gz").is_file()]
    if missing:
        pytest.fail(
            f"Fashion-MNIST files {missing} are missing from {system_dir}: install them with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
        )
    return tmp_path_factory.mktemp("fashion_root")


@pytest.fixture(scope="module")
def fashion_full(fashion_root: Path) -> Dataset:
    """Full Fashion-MNIST, standard-normalised and flattened, loaded from the Debian files."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchvision.datasets.MNIST, "download", _fail_download)
        return load_dataset(
            "fashion_mnist",
            str(fashion_root),
            train_subset=None,
            test_subset=None,
            normalize="standard",
            flatten=True,
            dtype=torch.float32,
        )


def test_fashion_mnist_full_load(fashion_full: Dataset) -> None:
    d = fashion_full
    assert d.name == "fashion_mnist" and d.num_classes == 10
    assert d.train_x.shape == (60000, 784) and d.test_x.shape == (10000, 784)
    assert d.train_y.shape == (60000,) and d.test_y.shape == (10000,)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert d.test_y.dtype == torch.int64
    assert torch.equal(d.train_y.unique(), torch.arange(10))
    assert torch.equal(d.test_y.unique(), torch.arange(10))
    assert abs(d.train_x.mean().item()) < 1e-4
    assert abs(d.train_x.std().item() - 1.0) < 1e-3
    # The test split uses the training statistics, so it is close to but not exactly standard.
    assert abs(d.test_x.mean().item()) < 0.05


def test_fashion_mnist_raw_files_written(fashion_full: Dataset, fashion_root: Path) -> None:
    raw_dir = fashion_root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted(IDX_FILES)  # no temp files left
    for name, size in IDX_SIZES.items():
        assert (raw_dir / name).stat().st_size == size


def test_fashion_mnist_reuses_copy_and_subsets(
    fashion_full: Dataset, fashion_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The package directory now points nowhere and downloads fail: only the copy can serve.
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", _fail_download)
    sub = load_dataset(
        "fashion_mnist",
        str(fashion_root),
        train_subset=1000,
        test_subset=200,
        normalize="standard",
        flatten=False,
        dtype=torch.float64,
    )
    assert sub.train_x.shape == (1000, 1, 28, 28) and sub.test_x.shape == (200, 1, 28, 28)
    assert sub.train_x.dtype == torch.float64
    # First N samples, normalised with the FULL training set's statistics.
    assert torch.equal(sub.train_y, fashion_full.train_y[:1000])
    assert torch.equal(sub.test_y, fashion_full.test_y[:200])
    torch.testing.assert_close(
        sub.train_x.reshape(1000, -1).float(), fashion_full.train_x[:1000], atol=1e-5, rtol=0
    )

    raw = load_dataset(
        "fashion_mnist",
        str(fashion_root),
        train_subset=10,
        test_subset=None,
        normalize="none",
        flatten=True,
        dtype=torch.bfloat16,
    )
    assert raw.train_x.dtype == torch.bfloat16 and raw.test_x.shape == (10000, 784)
    assert raw.train_x.min().item() == 0.0 and raw.train_x.max().item() == 1.0


def test_a_later_process_reads_the_decoded_arrays_without_torchvision(
    fashion_full: Dataset, fashion_root: Path
) -> None:
    """The first load leaves torchvision's arrays beside its files; a fresh process loads the
    same dataset from them without importing torchvision (about 1.8 s per process)."""
    assert (fashion_root / "FashionMNIST" / CACHE_NAME).is_file()
    script = (
        "import sys, torch\n"
        "from sm_dist.data.datasets import load_dataset\n"
        f"d = load_dataset('fashion_mnist', {str(fashion_root)!r}, train_subset=None, "
        "test_subset=None, normalize='standard', flatten=True, dtype=torch.float32)\n"
        "print(any(m.startswith('torchvision') for m in sys.modules))\n"
        "print(repr(float(d.train_x.double().sum())), int(d.test_y.sum()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, check=True)
    imported, sums = done.stdout.splitlines()
    assert imported == "False"
    expected = float(fashion_full.train_x.double().sum()), int(fashion_full.test_y.sum())
    assert sums == f"{expected[0]!r} {expected[1]}"


def test_the_decoded_arrays_follow_their_files(
    fashion_full: Dataset, fashion_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cut-off cache, or one made from other files, is decoded again and replaced; a root
    that cannot take one still loads."""
    class_dir = tmp_path / "FashionMNIST"
    shutil.copytree(fashion_root / "FashionMNIST" / "raw", class_dir / "raw")
    cache = class_dir / CACHE_NAME

    def labels() -> torch.Tensor:
        return load_dataset("fashion_mnist", str(tmp_path), train_subset=None,
                            test_subset=None, normalize="none", flatten=True,
                            dtype=torch.float32).train_y

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", _fail_download)
    assert torch.equal(labels(), fashion_full.train_y) and read_cached(class_dir) is not None
    cache.write_bytes(b"cut off")
    assert read_cached(class_dir) is None
    assert torch.equal(labels(), fashion_full.train_y) and read_cached(class_dir) is not None
    image = class_dir / "raw" / IDX_FILES[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert read_cached(class_dir) is None  # the files changed since
    assert torch.equal(labels(), fashion_full.train_y) and read_cached(class_dir) is not None
    cache.unlink()

    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(idx_cache.tempfile, "mkstemp", read_only)
    assert torch.equal(labels(), fashion_full.train_y)
    assert not cache.exists() and not list(class_dir.glob(".*"))


def test_subset_larger_than_set(fashion_full: Dataset, fashion_root: Path) -> None:
    with pytest.raises(DataError, match="train_subset=60001"):
        load_dataset(
            "fashion_mnist",
            str(fashion_root),
            train_subset=60001,
            test_subset=None,
            normalize="none",
            flatten=True,
            dtype=torch.float32,
        )


def test_interrupted_copy_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system_dir = tmp_path / "system"
    system_dir.mkdir()
    for name in IDX_FILES:
        with gzip.open(system_dir / f"{name}.gz", "wb") as f:
            f.write(b"\0" * 64)

    def interrupted_copy(src: object, dst: object, length: int = 0) -> None:
        raise KeyboardInterrupt

    raw_dir = tmp_path / "root" / "FashionMNIST" / "raw"
    monkeypatch.setattr(data.shutil, "copyfileobj", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        data._copy_system_fashion_mnist(system_dir, raw_dir)
    assert list(raw_dir.iterdir()) == []


def test_fashion_mnist_offline_without_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_system = tmp_path / "no_package"
    empty_system.mkdir()
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(empty_system))
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", _fail_download)
    root = tmp_path / "root"
    with pytest.raises(DataError) as info:
        load_dataset(
            "fashion_mnist",
            str(root),
            train_subset=None,
            test_subset=None,
            normalize="standard",
            flatten=True,
            dtype=torch.float32,
        )
    message = str(info.value)
    assert "dataset-fashion-mnist" in message
    assert str(root / "FashionMNIST" / "raw") in message
    assert str(empty_system) in message


def test_mnist_offline_without_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", _fail_download)
    with pytest.raises(DataError) as info:
        load_dataset(
            "mnist",
            str(tmp_path),
            train_subset=None,
            test_subset=None,
            normalize="none",
            flatten=True,
            dtype=torch.float32,
        )
    message = str(info.value)
    assert message.startswith("MNIST") and str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message


def test_bad_arguments(tmp_path: Path) -> None:
    common = {"train_subset": None, "test_subset": None, "flatten": True, "dtype": torch.float32}
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar", str(tmp_path), normalize="none", **common)
    with pytest.raises(DataError, match="unknown normalize"):
        load_dataset("mnist", str(tmp_path), normalize="minmax", **common)
    with pytest.raises(DataError, match="synthetic"):
        load_dataset("synthetic", str(tmp_path), normalize="none", **common)


SYNTH = {"features": 12, "classes": 4, "train_size": 600, "test_size": 200, "seed": 3}


def _synthetic(params: dict[str, int], **overrides: object) -> Dataset:
    kwargs: dict[str, object] = {
        "train_subset": None,
        "test_subset": None,
        "normalize": "none",
        "flatten": False,
        "dtype": torch.float32,
    }
    kwargs.update(overrides)
    return load_dataset("synthetic", "", synthetic=params, **kwargs)  # type: ignore[arg-type]


def test_synthetic_deterministic_and_shaped() -> None:
    a, b = _synthetic(SYNTH), _synthetic(dict(SYNTH))
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.train_x.shape == (600, 12) and a.test_x.shape == (200, 12)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert a.num_classes == 4 and a.name == "synthetic"
    counts = torch.bincount(a.train_y, minlength=4)
    assert counts.min().item() > 600 / 4 / 2  # every class present, roughly balanced
    assert torch.equal(a.test_y.unique(), torch.arange(4))
    assert not torch.equal(a.train_x[:200], a.test_x)


def test_synthetic_seeds_and_sizes() -> None:
    a = _synthetic(SYNTH)
    other = _synthetic({**SYNTH, "seed": 4})
    assert not torch.equal(a.train_x, other.train_x)
    # The training set does not depend on the test size.
    bigger_test = _synthetic({**SYNTH, "test_size": 500})
    assert torch.equal(a.train_x, bigger_test.train_x)
    assert torch.equal(a.train_y, bigger_test.train_y)


def test_synthetic_standardised_and_subset() -> None:
    d = _synthetic(SYNTH, normalize="standard", dtype=torch.float64, train_subset=100)
    full = _synthetic(SYNTH, normalize="standard", dtype=torch.float64)
    assert d.train_x.dtype == torch.float64 and d.train_x.shape == (100, 12)
    torch.testing.assert_close(full.train_x.mean(0), torch.zeros(12, dtype=torch.float64))
    torch.testing.assert_close(
        full.train_x.std(0, unbiased=False), torch.ones(12, dtype=torch.float64)
    )
    assert torch.equal(d.train_x, full.train_x[:100])


def test_synthetic_bad_parameters() -> None:
    with pytest.raises(DataError, match="missing"):
        _synthetic({k: v for k, v in SYNTH.items() if k != "seed"})
    with pytest.raises(DataError, match="classes"):
        _synthetic({**SYNTH, "classes": 1})


def test_split_microbatches() -> None:
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    parts = split_microbatches(x, y, 3)
    assert [len(px) for px, _ in parts] == [4, 3, 3]
    assert torch.equal(torch.cat([py for _, py in parts]), y)
    assert all(torch.equal(px.squeeze(1).long(), py) for px, py in parts)
    assert len(split_microbatches(x, y, 10)) == 10
    with pytest.raises(ValueError, match="11 microbatches"):
        split_microbatches(x, y, 11)
    with pytest.raises(ValueError):
        split_microbatches(x, y, 0)


def _stream_data(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n).float().unsqueeze(1) * 10, torch.arange(n)


def test_batch_stream_full() -> None:
    x, y = _stream_data()
    stream = BatchStream(x, y, "full", shuffle=True, seed=0)
    bx, by, same = stream.next_batch()
    assert bx is x and by is y and same is False
    for _ in range(3):
        bx, by, same = stream.next_batch()
        assert bx is x and same is True


def test_batch_stream_in_order_with_epoch_wrap() -> None:
    x, y = _stream_data()
    stream = BatchStream(x, y, 4, shuffle=False, seed=0)
    assert stream.batches_per_epoch == 3
    labels = [stream.next_batch()[1].tolist() for _ in range(4)]
    assert labels == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    assert stream.epoch == 1


def test_batch_stream_shuffle_deterministic() -> None:
    x, y = _stream_data()
    a = BatchStream(x, y, 3, shuffle=True, seed=7)
    b = BatchStream(x, y, 3, shuffle=True, seed=7)
    c = BatchStream(x, y, 3, shuffle=True, seed=8)
    seq_a = [a.next_batch()[1] for _ in range(8)]
    seq_b = [b.next_batch()[1] for _ in range(8)]
    seq_c = [c.next_batch()[1] for _ in range(8)]
    assert all(torch.equal(p, q) for p, q in zip(seq_a, seq_b))
    assert not all(torch.equal(p, q) for p, q in zip(seq_a, seq_c))
    # Each epoch (4 batches: 3+3+3+1) covers every sample once, in a fresh order.
    epoch0, epoch1 = torch.cat(seq_a[:4]), torch.cat(seq_a[4:8])
    assert torch.equal(epoch0.sort().values, y) and torch.equal(epoch1.sort().values, y)
    assert not torch.equal(epoch0, epoch1)
    # Inputs follow their labels.
    bx, by, same = BatchStream(x, y, 3, shuffle=True, seed=1).next_batch()
    assert torch.equal(bx.squeeze(1), by.float() * 10) and same is False


def test_batch_stream_large_batch_is_full() -> None:
    x, y = _stream_data()
    stream = BatchStream(x, y, 50, shuffle=True, seed=0)
    assert stream.next_batch()[2] is False
    bx, _, same = stream.next_batch()
    assert bx is x and same is True


def test_batch_stream_resume() -> None:
    x, y = _stream_data(11)
    stream = BatchStream(x, y, 4, shuffle=True, seed=5)
    for _ in range(5):  # into the second epoch
        stream.next_batch()
    state = stream.state_dict()
    expected = [stream.next_batch() for _ in range(7)]

    resumed = BatchStream(x, y, 4, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(7)]
    for (ex, ey, es), (gx, gy, gs) in zip(expected, got):
        assert torch.equal(ex, gx) and torch.equal(ey, gy) and es == gs
    assert resumed.epoch == stream.epoch and resumed.position == stream.position

    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(x, y, 3, shuffle=True, seed=5).load_state_dict(state)


def test_batch_stream_bad_batch() -> None:
    x, y = _stream_data()
    with pytest.raises(ValueError, match="batch"):
        BatchStream(x, y, 0, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="batch"):
        BatchStream(x, y, "half", shuffle=False, seed=0)
