"""Checksums and durable, atomic file writes, without TensorFlow (a sweep's check of a
finished job reads runs before TensorFlow loads: trainer/runinfo.py)."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str) -> None:
    """Flush a file's data, or a directory's entries (names created or renamed in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str, durable: bool = True) -> None:
    """Write `text` to `path` via a temporary file, fsync and rename: never a torn file.
    `durable`: the directory is fsynced after the rename, so the new name survives a power loss."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(os.path.dirname(path) or ".")
