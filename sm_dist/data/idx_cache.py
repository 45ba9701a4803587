"""The MNIST-family arrays torchvision decoded, kept beside its files: a later process (every
rank 0, every run of a grid) reads them back instead of importing torchvision (about 1.8 s,
most of it torchvision.models) and decoding the IDX files again."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

CACHE_NAME = "sm_dist-decoded.pt"
_VERSION = 1

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]  # train images, labels, test images, labels
Stamp = list[list[object]]  # [relative path, size, mtime_ns] of each file torchvision reads


def source_stamp(class_dir: Path) -> Stamp:
    """What the cache was made from: every file under the class's raw/ and processed/."""
    files = sorted(p for sub in ("raw", "processed") if (class_dir / sub).is_dir()
                   for p in (class_dir / sub).iterdir() if p.is_file() and p.name[0] != ".")
    stamps = [(p, p.stat()) for p in files]
    return [[str(p.relative_to(class_dir)), st.st_size, st.st_mtime_ns] for p, st in stamps]


def read_cached(class_dir: Path) -> Arrays | None:
    """The arrays saved for these very files, or None (no cache, other files, unreadable)."""
    path = class_dir / CACHE_NAME
    stamp = source_stamp(class_dir)
    if not stamp or not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # a cut-off or foreign file: decode again, and replace it
        return None
    if (not isinstance(saved, dict) or saved.get("version") != _VERSION
            or saved.get("sources") != stamp):
        return None
    arrays = saved.get("arrays")
    if not (isinstance(arrays, (list, tuple)) and len(arrays) == 4
            and all(isinstance(a, Tensor) for a in arrays)):
        return None
    return tuple(arrays)  # type: ignore[return-value]


def write_cached(class_dir: Path, arrays: Arrays) -> None:
    """Save the arrays with the stamp of the files they came from; a root that cannot be
    written only goes without (the next process decodes again)."""
    stamp = source_stamp(class_dir)
    if not stamp:
        return
    tmp_name = None
    try:
        # A unique temp file renamed into place: ranks writing at once never see half a file.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{CACHE_NAME}.", suffix=".tmp", dir=class_dir)
        with os.fdopen(fd, "wb") as out:
            torch.save({"version": _VERSION, "sources": stamp, "arrays": list(arrays)}, out)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; other users may share the root
        os.replace(tmp_name, class_dir / CACHE_NAME)
    except OSError:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
