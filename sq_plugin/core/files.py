"""Atomic file and directory writes: readers see the old version or the new one, never a partial one
(torch-free)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, flush it to disk, then move it into place with one
    `os.replace`; on any failure the temporary file is removed and `path` is untouched. Mode 0644
    (mkstemp creates 0600; these are shared data, not secrets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary directory beside `path` to fill. When the block succeeds, the files in it
    are flushed to disk and it takes `path`'s place by rename; when it raises, the temporary directory is
    removed and `path` is untouched. Readers never see a partially written `path`.

    An existing `path` is renamed aside first and removed afterwards (a non-empty directory cannot be
    replaced in one rename), so for that instant `path` is absent. The directory is made 0755 (mkdtemp
    creates 0700; as with `atomic_write`, these are shared data); files inside keep their writers' modes.

        with atomic_directory(out) as tmp:
            model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for root, _dirs, names in os.walk(tmp):
            for name in names:
                file = os.path.join(root, name)
                if os.path.isfile(file) and not os.path.islink(file):
                    with open(file, "rb") as f:
                        os.fsync(f.fileno())
        tmp.chmod(0o755)
        if not path.exists():
            os.replace(tmp, path)
        else:
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the old version back
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
