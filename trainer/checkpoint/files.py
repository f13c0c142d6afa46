"""The one copy of each file primitive: checksums, fsync, durable appends, atomic writes and
the varint and masked CRC32C of the formats written and read here.
Every caller uses these (checkpoints, manifests, the state file, metrics.jsonl, sweep records).
Without TensorFlow: a sweep's check of a finished job reads runs before TensorFlow loads
(trainer/sweep/runinfo.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os

import google_crc32c


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint(n) for n in range(1 << 11)]  # (a checkpoint's index holds hundreds)


def varint(n: int) -> bytes:
    """Protobuf's and LevelDB's varint (LEB128) of `n` >= 0: TFRecord examples
    (trainer/data/make_records.py) and checkpoint indexes (trainer/checkpoint/bundle.py)."""
    if 0 <= n < 2048:
        return _SMALL[n]
    if n < 0:
        raise ValueError(f"varint of {n}: only n >= 0")
    return _varint(n)


def mask(crc: int) -> int:
    """The masked CRC32C of TensorFlow's (and LevelDB's) formats, from a plain one."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data) -> int:
    """mask() of `data`'s CRC32C (google-crc32c, in C): TFRecord frames (event files,
    trainer/rewind.py) and checkpoint indexes (trainer/checkpoint/bundle.py)."""
    return mask(google_crc32c.value(data))


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
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        os.close(fd)


def append_durably(path: str, data: bytes) -> None:
    """Append `data` to `path` (created if missing) and fsync it."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str, text: str, durable: bool = True) -> None:
    """write_bytes_atomic of `text` (UTF-8)."""
    write_bytes_atomic(path, text.encode(), durable)


def write_bytes_atomic(path: str, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` via a temporary file, fsync and rename: never a torn file (for a
    killed process). `durable` (else neither fsync is made): the file is fsynced before the
    rename and the directory after it, so the new name and its contents survive a power loss.
    A failure leaves no temporary file behind; a failed fsync of the directory raises, with the
    new file in place but not known to be on disk (the caller decides: a checkpoint's manifest
    is removed, trainer/checkpoint/store.py)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror, e.filename or tmp) from None
    if durable:
        fsync_path(os.path.dirname(path) or ".")


def manifest_files(paths: list[str], sizes: list[int], index_sha256: str) -> dict:
    """A checkpoint manifest's `files`: each file's size by name, and the index's SHA-256 (the
    data files are covered by the CRC32C of every tensor that the index holds)."""
    files = {os.path.basename(p): {"size": n} for p, n in zip(paths, sizes, strict=True)}
    for path in paths:
        if path.endswith(".index"):
            files[os.path.basename(path)]["sha256"] = index_sha256
    return files
