"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this directory
is on sys.path)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory: readers see the old
    file or the new one, never a partial one; a failure leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
