"""TensorFlow's checkpoint files (a tensor bundle: `<prefix>.index` and
`<prefix>.data-00000-of-00001`), written from Python for small states.

Why (README, "Performance"): TensorFlow's traced save, run by the async writer, writes the
shard into `<prefix>_temp/`, reads its index back and merges it into the final files (a
dozen file-system calls a save), through TensorFlow's function runtime; within runs it cost
the loop 1.0-1.3 ms a save more than writing the same bytes here (BENCHMARKS.md, session 14):
two files, one writev each. A sync save by TensorFlow's eager save cost 14.8 ms against 5.9
(session 15).

The format is TensorFlow's (tensorflow/core/util/tensor_bundle, TF 2.21): the data file holds
each tensor's bytes in the saver's order; the index is a LevelDB-format table (restart
interval 16, blocks of 256 KiB, no compression; TensorFlow's table also flushes a block
before an entry of 512 KiB or more, which an index entry never is) mapping "" to a
BundleHeaderProto and each checkpoint key to a BundleEntryProto (dtype, shape, offset, size,
masked CRC32C of the bytes). A string tensor is stored as the varint lengths of its
elements, a masked CRC32C of those lengths (as uint32) and the elements' bytes. The writer
that uses this module checks, at the first save of each object graph, that its bytes equal
TensorFlow's own files for the same snapshot, and writes with TensorFlow's saver whenever
they do not (trainer/checkpoint/async_save.py).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import os
import struct

import google_crc32c
import numpy as np

from trainer.checkpoint.files import manifest_files, mask, masked_crc32c, varint

DATA_SUFFIX = ".data-00000-of-00001"
INDEX_SUFFIX = ".index"
_RESTART_INTERVAL = 16
_BLOCK_SIZE = 262144
_MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)
_HEADER = bytes.fromhex("0801") + bytes.fromhex("1a020801")  # num_shards 1, version {producer 1}
DT_STRING = 7


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:  # a varint protobuf field (proto3: 0 omitted)
    return varint(number << 3) + varint(value) if value else b""


def shape_proto(shape: tuple[int, ...]) -> bytes:
    """A TensorShapeProto's bytes: one `dim` message per dimension holding its size."""
    return b"".join(_field(2, _int_field(1, d)) for d in shape)


def entry_proto(dtype: int, shape: bytes, offset: int, size: int, crc: int) -> bytes:
    """A BundleEntryProto's bytes (shard 0, no slices), fields in number order as protobuf
    writes them; the shape message is present even when empty (a scalar)."""
    out = _int_field(1, dtype) + _field(2, shape) + _int_field(4, offset) + _int_field(5, size)
    return out + (b"\x35" + struct.pack("<I", crc) if crc else b"")


def string_tensor(values: list[bytes]) -> tuple[bytes, int]:
    """(the on-disk bytes of a string tensor's elements, their masked CRC32C)."""
    lengths = b"".join(varint(len(v)) for v in values)
    crc = 0
    for v in values:  # lengths as uint32 (uint64 beyond 4 GiB), as TensorFlow checksums them
        crc = google_crc32c.extend(crc, struct.pack("<I" if len(v) <= 0xFFFFFFFF else "<Q", len(v)))
    length_crc = struct.pack("<I", mask(crc))
    crc = google_crc32c.extend(crc, length_crc)
    for v in values:
        crc = google_crc32c.extend(crc, v)
    return lengths + length_crc + b"".join(values), mask(crc)


@functools.lru_cache(maxsize=1 << 16)  # the same keys follow each other in every save
def _shared(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Block:
    """LevelDB's BlockBuilder: prefix-compressed keys, a restart point every `interval`
    entries (16 in data blocks, 1 in the index block)."""

    def __init__(self, interval: int = _RESTART_INTERVAL):
        self.buffer, self.restarts, self.count, self.last = bytearray(), [0], 0, b""
        self.interval = interval

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count < self.interval:
            shared = _shared(self.last, key)
        else:
            self.restarts.append(len(self.buffer))
            self.count = 0
        self.buffer += varint(shared) + varint(len(key) - shared) + varint(len(value))
        self.buffer += key[shared:] + value
        self.last, self.count = key, self.count + 1

    def size(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        restarts = struct.pack(f"<{len(self.restarts)}I", *self.restarts)
        return bytes(self.buffer) + restarts + struct.pack("<I", len(self.restarts))


def _separator(start: bytes, limit: bytes) -> bytes:
    """LevelDB's bytewise FindShortestSeparator: a short key in [start, limit)."""
    i = _shared(start, limit)
    if i < min(len(start), len(limit)):
        byte = start[i]
        if byte < 0xFF and byte + 1 < limit[i]:
            return start[:i] + bytes([byte + 1])
    return start


def _successor(key: bytes) -> bytes:
    """LevelDB's bytewise FindShortSuccessor: a short key >= `key`."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def table(items: list[tuple[bytes, bytes]]) -> bytes:
    """A LevelDB-format table (TensorFlow's table::TableBuilder, no compression) of `items`,
    whose keys are sorted."""
    out = bytearray()
    index = _Block(interval=1)
    block, last, pending = _Block(), b"", None

    def flush() -> tuple[int, int]:
        nonlocal block
        contents = block.finish()
        handle = (len(out), len(contents))
        out.extend(contents + b"\x00")
        out.extend(
            struct.pack("<I", mask(google_crc32c.extend(google_crc32c.value(contents), b"\x00")))
        )
        block = _Block()
        return handle

    for key, value in items:
        if pending is not None:
            index.add(_separator(last, key), varint(pending[0]) + varint(pending[1]))
            pending = None
        block.add(key, value)
        last = key
        if block.size() >= _BLOCK_SIZE:
            pending = flush()
    if block.count:
        pending = flush()
    meta = flush()  # the (empty) meta-index block
    if pending is not None:
        index.add(_successor(last), varint(pending[0]) + varint(pending[1]))
    block = index
    index_handle = flush()
    footer = b"".join(varint(v) for v in (*meta, *index_handle))
    out.extend(footer + b"\x00" * (40 - len(footer)) + _MAGIC)
    return bytes(out)


class Layout:
    """What every save of one object graph writes: its checkpoint keys in the saver's order
    and their dtypes (TensorFlow's DataType numbers)."""

    def __init__(self, keys: list[str], dtypes: list[int]):
        self.keys = [k.encode() for k in keys]
        self.dtypes = dtypes
        self.order = sorted(range(len(keys)), key=lambda i: self.keys[i])  # the index's
        self._heads: dict[tuple, bytes] = {}

    def entry(self, i: int, shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
        """entry_proto() of key `i`; all but the checksum is the same save after save."""
        if (head := self._heads.get((i, shape, offset, size))) is None:
            if len(self._heads) > 4 * len(self.keys):  # (string tensors that change length)
                self._heads.clear()
            head = entry_proto(self.dtypes[i], shape_proto(shape), offset, size, 0)
            self._heads[i, shape, offset, size] = head
        return head + b"\x35" + struct.pack("<I", crc) if crc else head


def encode(layout: Layout, values: list[np.ndarray]) -> tuple[list, bytes]:
    """(the data file's pieces, the index file's bytes) for `values`, one numpy array per key
    of `layout` (an object array of bytes for a string tensor)."""
    pieces, entries, offset = [], [None] * len(values), 0
    for i, value in enumerate(values):
        if layout.dtypes[i] == DT_STRING:
            data, crc = string_tensor(list(np.ravel(value)))
        else:  # the bytes, as a read-only uint8 view (google_crc32c reads read-only buffers)
            data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            data.flags.writeable = False
            crc = masked_crc32c(data)
        size = len(data)
        entries[i] = layout.entry(i, np.shape(value), offset, size, crc)
        pieces.append(data)
        offset += size
    items = [(b"", _HEADER)] + [(layout.keys[i], entries[i]) for i in layout.order]
    return pieces, table(items)


@dataclasses.dataclass
class Written:
    """What write() put on the disk: the manifest's facts, without reading the files back."""

    paths: list[str]  # the data file, then the index
    sizes: list[int]
    index_sha256: str
    synced: bool  # each file fsynced before it was closed

    def manifest_files(self) -> dict:
        """The manifest's `files`: each file's size, and the index's SHA-256."""
        return manifest_files(self.paths, self.sizes, self.index_sha256)


def write(prefix: str, layout: Layout, values: list, sync: bool = False) -> Written:
    """Write the bundle of `values` at `prefix` (its data file, then its index). `sync`
    (checkpoint.durable): each file is fsynced before it is closed, the data file first, so
    that the store's manifest step need not open them again; it still fsyncs the directory
    before the manifest. The folder is made if it is missing, as TensorFlow's save does."""
    pieces, index = encode(layout, values)
    paths = [prefix + DATA_SUFFIX, prefix + INDEX_SUFFIX]
    sizes = []
    for path, parts in zip(paths, (pieces, [index]), strict=True):
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        sizes.append(sum(v.nbytes for v in views))
        try:
            fd = _create(path)
            try:
                _write_all(fd, views)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
    return Written(paths, sizes, hashlib.sha256(index).hexdigest(), sync)


def _create(path: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:  # (one makedirs per save cost ~0.1 ms of the writer, profiled)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o666)


def _write_all(fd: int, views: list[memoryview]) -> None:
    """os.writev of `views` (at most 1024 a call), resumed after a short write."""
    while views:
        done = os.writev(fd, views[:1024])
        if not done:
            raise OSError(errno.EIO, "the file took no bytes")
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]
