"""Files written whole or not at all: a file replaced through a temporary name (removed when the
write fails), records appended whole (a failed write is cut back to the last whole record), and
a JSON document that stays whole while it grows (trace.json). What a full disk, a failed write
or a stopped process leaves is then always readable."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

TEMPORARY_SUFFIX = ".tmp"  # a file being written; renamed over its real name once whole


@dataclass(frozen=True)
class Written:
    """What a whole file holds: its size in bytes and the SHA-256 of its content."""

    size: int
    sha256: str


class _Hashing:
    """A binary file that also hashes and counts what is written to it. A write that fails
    (a full disk) is kept as `error` and the writer is told every byte went, and later writes
    are dropped: a serializer that cannot take an error in the middle of its output (torch's
    zip writer aborts the process) finishes in order, and the error is raised after it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                self.handle.write(data)
            except OSError as err:
                self.error = err
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.handle.flush()
            except OSError as err:
                self.error = err


def replace_whole(path: Path, write: Callable[[Any], object]) -> Written:
    """Call `write(handle)` on a temporary file beside `path`, flush it to disk and rename it
    to `path`: the file is the old one or the new one, never part of one. On any failure the
    temporary file is removed (a full disk keeps no half-written file) and the error raised."""
    path = Path(path)
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        with open(temporary, "wb") as handle:
            hashing = _Hashing(handle)
            write(hashing)
            if hashing.error is not None:
                raise hashing.error
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        remove_quietly(temporary)
        _name_file(err, path)
        raise
    return Written(hashing.size, hashing.digest.hexdigest())


def write_text_whole(path: Path, text: str) -> Written:
    """`text` as the whole content of `path` (UTF-8), through a temporary name."""
    return replace_whole(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json_whole(path: Path, data: Any, indent: int | None = None) -> Written:
    """`data` as a JSON file (one line unless `indent`), through a temporary name."""
    return write_text_whole(path, json.dumps(data, indent=indent) + "\n")


def _name_file(err: BaseException, path: Path) -> None:
    """Let the error name the file it happened to when it does not (a write to an open file
    names none), so that the message says what could not be written."""
    if isinstance(err, OSError) and err.filename is None:
        err.filename = str(path)


def remove_quietly(path: Path) -> None:
    """Remove a file if it is there; a failure to remove it is not worth a second error."""
    try:
        os.unlink(path)
    except OSError:
        pass


def sha256_of(path: Path, chunk: int = 1 << 20) -> Written:
    """The size and SHA-256 of a file as it is on disk."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            size += len(block)
    return Written(size, digest.hexdigest())


def _write_all(handle: IO[bytes], data: bytes) -> None:
    """Write every byte through an unbuffered file (a write may take only part of them)."""
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:  # a regular file takes at least one byte or raises
            raise OSError(errno.EIO, "the file took none of the bytes written to it")
        view = view[written:]


class RecordFile:
    """Appends records (lines) to a file, each whole: a write that fails (a full disk) is cut
    back to the end of the last whole record before the error is raised, so that the file
    never ends in part of one. `mode` "a" appends (a torn last line, left by a killed process,
    is cut off first), "w" starts the file empty."""

    def __init__(self, path: Path, mode: str = "a") -> None:
        self.path = Path(path)
        self._file: IO[bytes] = open(self.path, "ab" if mode == "a" else "wb", buffering=0)
        self._whole = self._file.seek(0, os.SEEK_END)
        if self._whole and mode == "a":
            self._whole = self._last_newline_end()
            self._cut_back()

    def _last_newline_end(self) -> int:
        """The size of the file up to and including its last newline."""
        with open(self.path, "rb") as reader:
            step, end = 1 << 16, self._whole
            while end > 0:
                start = max(0, end - step)
                reader.seek(start)
                block = reader.read(end - start)
                if (at := block.rfind(b"\n")) >= 0:
                    return start + at + 1
                end = start
        return 0

    def append(self, record: str) -> None:
        """One whole record (its text ends in a newline)."""
        data = record.encode("utf-8")
        try:
            _write_all(self._file, data)
        except BaseException as err:
            self._cut_back()
            _name_file(err, self.path)
            raise
        self._whole += len(data)

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._file.fileno(), self._whole)
        except OSError:
            pass  # the record's bytes stay; a reader skips a torn last line

    def close(self) -> None:
        self._file.close()


class JsonListFile:
    """A JSON document `{head..., "key": [items]}` that is whole after every write: each batch
    of items is written over the document's closing bracket, followed by the bracket again. A
    write that fails is cut back and the closing bracket put back in the bytes the document
    held before (no new disk space needed), so a full disk leaves the document as it was."""

    def __init__(self, path: Path, head: str, closing: str = "\n]}\n") -> None:
        self.path, self._closing = Path(path), closing.encode("utf-8")
        self._file: IO[bytes] = open(self.path, "wb", buffering=0)
        self._end = 0  # where the closing bracket starts: the end of the last whole item
        self._first = True
        try:
            self._write_at_end(head.encode("utf-8"))
        except BaseException:
            self._file.close()
            remove_quietly(self.path)  # not even its head: absent
            raise

    def add(self, items: list[str]) -> None:
        """Items (each one JSON value's text) appended to the list."""
        if not items:
            return
        text = ("" if self._first else ",\n") + ",\n".join(items)
        self._write_at_end(text.encode("utf-8"))
        self._first = False

    def _write_at_end(self, data: bytes) -> None:
        self._file.seek(self._end)
        try:
            _write_all(self._file, data + self._closing)
        except BaseException as err:
            self._restore()
            _name_file(err, self.path)
            raise
        self._end += len(data)

    def _restore(self) -> None:
        """The document as it was: its old size, the closing bracket written back over the
        bytes a failed write changed (blocks the file held before: no new space needed)."""
        try:
            os.ftruncate(self._file.fileno(), self._end + len(self._closing) if self._end else 0)
            if self._end:
                self._file.seek(self._end)
                _write_all(self._file, self._closing)
        except OSError:
            pass  # cut short: `read_trace` still reads every whole item

    def close(self) -> None:
        self._file.close()
