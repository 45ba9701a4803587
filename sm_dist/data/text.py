"""Byte-level text for next-token prediction: a local file or the Python standard library's own
sources, cut into contexts of T tokens, with a deterministic held-out split."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import Tensor

VOCAB = 256  # one token per byte value
TEST_EVERY = 10  # window w is held out when w % TEST_EVERY == TEST_EVERY - 1
DEFAULT_TEXT_BYTES = 1_000_000


class TextError(Exception):
    """The corpus cannot be read or is too short; the message names the file and the fix."""


def default_corpus_files() -> list[Path]:
    """The standard library's top-level modules, sorted by name: on every machine, offline."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def default_corpus_name() -> str:
    return f"the Python standard library's sources ({sysconfig.get_paths()['stdlib']}/*.py)"


def read_corpus(path: str | None, limit: int | None) -> bytes:
    """The first `limit` bytes (None: all) of the file `path`, or of the default corpus."""
    if path is not None:
        return _read_file(Path(path), limit)
    chunks, size = [], 0
    for file in default_corpus_files():
        if limit is not None and size >= limit:
            break
        chunk = _read_file(file, None if limit is None else limit - size)
        chunks.append(chunk)
        size += len(chunk)
    if not chunks:
        raise TextError(f"no default corpus: {default_corpus_name()} has no files; set "
                        "data.path to a text file")
    return b"".join(chunks)


def _read_file(file: Path, limit: int | None) -> bytes:
    if not file.exists():
        raise TextError(f"data.path: {file} does not exist; set data.path to a text file "
                        "(or null for the default corpus)")
    if not file.is_file():
        raise TextError(f"data.path: {file} is not a file; set data.path to a text file")
    try:
        with file.open("rb") as stream:
            return stream.read() if limit is None else stream.read(limit)
    except OSError as exc:
        raise TextError(f"data.path: cannot read {file} ({exc.strerror or exc}); check its "
                        "permissions or set data.path to another file") from exc


def windows(corpus: bytes, context: int) -> tuple[Tensor, Tensor]:
    """Consecutive non-overlapping contexts: inputs (W, T) and their next bytes (W, T), int64."""
    count = (len(corpus) - 1) // context
    tokens = torch.frombuffer(bytearray(corpus[:count * context + 1]), dtype=torch.uint8)
    tokens = tokens.to(torch.int64)
    return (tokens[:count * context].reshape(count, context),
            tokens[1:count * context + 1].reshape(count, context))


def load_text(path: str | None, context: int,
              limit: int | None = DEFAULT_TEXT_BYTES) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x, train_y, test_x, test_y): every TEST_EVERY-th context held out, in order.

    The split depends only on a window's index, so the first k training (or test) contexts
    are the same whatever `limit` is, as long as it covers them.
    """
    if context < 1:
        raise TextError(f"data.context must be at least 1, got {context}")
    corpus = read_corpus(path, limit)
    where = path if path is not None else default_corpus_name()
    if len(corpus) < context + 1:
        raise TextError(f"data.path: {where} has {len(corpus)} bytes, fewer than the "
                        f"{context + 1} one context of data.context={context} needs; use a "
                        "longer file or a smaller data.context")
    x, y = windows(corpus, context)
    held_out = torch.arange(len(x)) % TEST_EVERY == TEST_EVERY - 1
    return x[~held_out], y[~held_out], x[held_out], y[held_out]
