"""Small file helpers for the dataset cache.

`atomic_writer` writes to a temporary file in the destination directory and moves it into
place with `os.replace`, so a reader never sees a half-written file (an interrupted decode
leaves at most a stray ``*.tmp`` file, never a truncated cache entry).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np

__all__ = ["atomic_writer", "atomic_save_npz", "default_cache_dir", "CACHE_ENV"]

CACHE_ENV = "PYDISTILL_CACHE"


def default_cache_dir() -> Path:
    """The cache directory: ``$PYDISTILL_CACHE`` when set, else ``~/.cache/pydistill_ext``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pydistill_ext"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a binary file for writing that appears at `path` only once complete.

    The data goes to a temporary file in the same directory (same file system, so the final
    `os.replace` is atomic); on an exception the temporary file is removed and `path` is left
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Save `arrays` as an uncompressed ``.npz`` at `path`, atomically. Returns the path."""
    path = Path(path)
    with atomic_writer(path) as f:
        np.savez(f, **arrays)
    return path
