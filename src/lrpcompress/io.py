"""Atomic file writes: a temporary file in the target folder, fsync, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import LrpcError


def check_output_path(path: str | Path, force: bool = False) -> Path:
    """Fail early, before any work, if ``path`` cannot be written or already exists without ``force``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise LrpcError(f"output folder does not exist: {path.parent}")
    if path.is_dir():
        raise LrpcError(f"output path is a folder: {path}")
    if path.exists() and not force:
        raise LrpcError(f"output file exists: {path}; pass --force to overwrite it")
    if not os.access(path.parent, os.W_OK):
        raise LrpcError(f"output folder is not writable: {path.parent}")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    if not path.parent.is_dir():
        raise LrpcError(f"output folder does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

