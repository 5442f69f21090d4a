"""Atomic file writes: readers see the old content or the new, never a torn file; the shared cache root."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Root of the project's caches (demo tokenizers): ``$MEGATRON_AMIR_CACHE``, default
    ``~/.cache/megatron_amir``."""
    return Path(os.environ.get("MEGATRON_AMIR_CACHE", Path.home() / ".cache" / "megatron_amir"))


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # reading it does not change it (os.umask would, process-wide)
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def publish_mode(path: str | os.PathLike, *, directory: bool) -> None:
    """Give a file or directory made by ``tempfile`` (private: 0600 / 0700) the mode a plain ``open`` /
    ``mkdir`` would give it, so jobs of other users or groups on a shared cluster can read what we publish."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to a temp file beside ``path`` (fsynced), then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        publish_mode(tmp, directory=False)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or directory (a directory's fsync makes the renames and creations inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)
