"""A full disk for tests that cannot mount a small file system (tests/test_faults.py): Python
loads this module at start-up when its directory is on PYTHONPATH. While the file named by
$SM_DIST_TEST_FULL_DISK exists, writes to files under $SM_DIST_TEST_FULL_DIR fail with ENOSPC
once the room that file gives (JSON: {"room": bytes, "statvfs": bool}) is used up, the write
that crosses it taking the bytes that fit first, as a real write does; with "statvfs" true,
os.statvfs reports no free space there. Nothing else is changed."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from typing import Any

_FLAG = os.environ.get("SM_DIST_TEST_FULL_DISK")
_DIR = os.path.realpath(os.environ.get("SM_DIST_TEST_FULL_DIR", "/nonexistent"))
_used = [0]  # bytes written under _DIR since the flag appeared


def _state() -> dict[str, Any] | None:
    if not _FLAG or not os.path.exists(_FLAG):
        return None
    with _real_open(_FLAG, encoding="utf-8") as handle:
        return json.load(handle)


def _under(path: Any) -> bool:
    if isinstance(path, int):
        return False
    try:
        return os.path.realpath(os.fspath(path)).startswith(_DIR + os.sep)
    except TypeError:
        return False


class _OnFullDisk:
    """A file whose writes fail as on a full disk once the room is used up."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def write(self, data: Any) -> int:
        state = _state()
        if state is None:
            return self._handle.write(data)
        room = int(state.get("room", 0)) - _used[0]
        if len(data) <= room:
            _used[0] += len(data)
            return self._handle.write(data)
        if room > 0:
            self._handle.write(data[:room])
            _used[0] += room
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> _OnFullDisk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.__exit__(*exc)

    def __iter__(self) -> Any:
        return iter(self._handle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


_real_open = builtins.open


def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    handle = _real_open(file, mode, *args, **kwargs)
    if _FLAG and any(c in mode for c in "wax+") and _under(file):
        return _OnFullDisk(handle)
    return handle


_real_statvfs = os.statvfs


def _statvfs(path: Any) -> Any:
    found = _real_statvfs(path)
    state = _state()
    if state is None or not state.get("statvfs") or not (_under(path) or
                                                         os.path.realpath(path) == _DIR):
        return found
    fields = list(found)
    fields[3] = fields[4] = 0  # f_bfree, f_bavail
    return os.statvfs_result(fields)


if _FLAG:
    builtins.open = _open
    io.open = _open
    os.statvfs = _statvfs
