"""data.dataset text: byte tokens, next-token labels, the deterministic held-out split, the
default corpus, and bad paths (a DataError naming the file; exit code 2 from the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sm_dist.config.build import build_stage_modules, load_job_data
from sm_dist.config.job import job_from_dict
from sm_dist.data.custom import check_fits
from sm_dist.data.datasets import DataError, load_dataset
from sm_dist.data.text import (
    TEST_EVERY,
    VOCAB,
    default_corpus_files,
    read_corpus,
    windows,
)
from tests.conftest import run_cli, write_job


def load(path: Path | str | None, context: int = 8, text_bytes: int | None = None,
         **subsets: int | None) -> Any:
    return load_dataset("text", "data/", train_subset=subsets.get("train"),
                        test_subset=subsets.get("test"), normalize="standard", flatten=True,
                        dtype=torch.float32, path=None if path is None else str(path),
                        context=context, text_bytes=text_bytes)


def test_a_file_becomes_next_byte_contexts(tmp_path: Path) -> None:
    corpus = bytes(range(256)) * 4 + b"tail"  # 1028 bytes: 128 contexts of 8 (+ 1 label byte)
    (tmp_path / "corpus.txt").write_bytes(corpus)
    data = load(tmp_path / "corpus.txt")
    assert data.num_classes == VOCAB == 256 and data.name == "text"
    assert data.train_x.dtype == data.train_y.dtype == torch.int64  # tokens, whatever dtype
    assert len(data.train_x) + len(data.test_x) == (len(corpus) - 1) // 8
    # Window w covers corpus[8w : 8w + 8]; its labels are the bytes one further on.
    x, y = windows(corpus, 8)
    for w in range(len(x)):
        assert bytes(x[w].tolist()) == corpus[8 * w:8 * w + 8]
        assert bytes(y[w].tolist()) == corpus[8 * w + 1:8 * w + 9]
    # Every TEST_EVERY-th window is held out, in order; the rest train.
    held = [w for w in range(len(x)) if w % TEST_EVERY == TEST_EVERY - 1]
    kept = [w for w in range(len(x)) if w % TEST_EVERY != TEST_EVERY - 1]
    assert torch.equal(data.test_x, x[held]) and torch.equal(data.test_y, y[held])
    assert torch.equal(data.train_x, x[kept]) and torch.equal(data.train_y, y[kept])


def test_split_is_deterministic_and_independent_of_the_cut(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(torch.randint(256, (5000,), generator=torch.Generator()
                                         .manual_seed(0)).tolist()))
    whole = load(path)
    again = load(path)
    cut = load(path, text_bytes=2001, train=20, test=5)
    assert torch.equal(whole.train_x, again.train_x) and torch.equal(whole.test_y, again.test_y)
    assert torch.equal(cut.train_x, whole.train_x[:20]) and torch.equal(cut.test_y,
                                                                      whole.test_y[:5])
    assert len(cut.train_x) == 20 and len(cut.test_x) == 5


def test_default_corpus_is_the_standard_library_sorted() -> None:
    files = default_corpus_files()
    assert len(files) > 20 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    corpus = read_corpus(None, 30000)
    assert len(corpus) == 30000
    assert corpus.startswith(files[0].read_bytes()[:1000])
    data = load(None, context=16, text_bytes=30000, train=50, test=10)
    assert data.train_x.shape == (50, 16) and data.test_y.shape == (10, 16)
    assert int(data.train_x.max()) < 256 and int(data.train_x.min()) >= 0
    assert torch.equal(data.train_y[:, :-1], data.train_x[:, 1:])  # labels: the next bytes


def test_bad_paths_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"data.path: {missing} does not exist"):
        load(missing)
    with pytest.raises(DataError, match=f"data.path: {tmp_path} is not a file"):
        load(tmp_path)
    short = tmp_path / "short.txt"
    short.write_bytes(b"abc")
    with pytest.raises(DataError, match=f"data.path: {short} has 3 bytes, fewer than the 9"):
        load(short)
    with pytest.raises(DataError, match="data.train_subset=999 is more than the"):
        load(None, text_bytes=2000, train=999)


TEXT_JOB: dict[str, Any] = {
    "name": "text-job",
    "model": {"transformer": {"context": 8, "width": 8, "blocks": 1, "heads": 2},
              "balance": [1, 1, 1]},
    "data": {"dataset": "text", "context": 8, "text_bytes": 3000, "train_subset": 8,
             "test_subset": 4, "microbatches": 2},
    "optimizer": {"name": "sm", "inner_steps": 2},
    "run": {"iterations": 2, "eval_every": 0, "dtype": "float64", "threads": 1},
}


def test_the_job_reads_its_text_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"0123456789" * 50)  # 62 contexts, 6 held out
    job = job_from_dict({**TEXT_JOB, "data": {**TEXT_JOB["data"], "path": str(path)}})
    data = load_job_data(job)
    assert data.train_x.shape == (8, 8) and data.test_x.shape == (4, 8)
    assert bytes(data.train_x[0].tolist()) == b"01234567"


def test_cli_bad_path_exits_2_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing-corpus.txt"
    job = write_job(tmp_path / "job.yaml",
                    {**TEXT_JOB, "data": {**TEXT_JOB["data"], "path": str(missing)}})
    result = run_cli("train", str(job), "--single-process", "--no-live", "--out", "run",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"data.path: {missing} does not exist" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_check_fits_takes_sequence_outputs() -> None:
    """Labels (n, T) need outputs (n, T, classes): the transformer fits, a flattening or too
    narrow model is told what it must give."""
    data = load(None, context=6, text_bytes=2000, train=4, test=2)
    job = job_from_dict({**TEXT_JOB, "data": {**TEXT_JOB["data"], "context": 6}})
    check_fits(build_stage_modules(job), data, "cross_entropy")
    flattening = torch.nn.Sequential(torch.nn.Embedding(256, 4), torch.nn.Flatten(),
                                     torch.nn.Linear(24, 256))
    with pytest.raises(DataError, match=r"outputs of shape \(256,\) per sample; it must give "
                                        r"class scores for each of its labels, outputs of "
                                        r"shape \(6, classes\)"):
        check_fits([flattening], data, "cross_entropy")
    narrow = torch.nn.Sequential(torch.nn.Embedding(256, 4), torch.nn.Linear(4, 100))
    with pytest.raises(DataError, match="256 classes.*has 100 outputs"):
        check_fits([narrow], data, "cross_entropy")
