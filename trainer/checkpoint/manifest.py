"""A checkpoint's manifest and its verification: which files make checkpoint `ckpt-<step>`,
whether they are all there with their recorded sizes, and whether every tensor still matches
the CRC32C TensorFlow stored for it (README, "Crashes, kill -9 and power loss"). Used by the
store (trainer/checkpoint/store.py), by recovery and by the tools that read a run."""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

import tensorflow as tf

from trainer.checkpoint.files import sha256_file, write_text_atomic

MANIFEST_SUFFIX = ".manifest.json"
_CKPT_RE = re.compile(r"ckpt-(\d+)$")


def read_manifest(prefix: str) -> dict:
    """Checkpoint `prefix`'s manifest (raises OSError / ValueError when missing or torn)."""
    with open(prefix + MANIFEST_SUFFIX) as f:
        return json.load(f)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to `path` via a temporary file, fsync and rename: never a torn file."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def checkpoint_files(prefix: str) -> list[str]:
    """The files TensorFlow wrote for checkpoint `prefix` (index + data shards).
    (One directory listing: two globs cost ~0.2 ms per call on the save path, profiled.)"""
    directory, base = os.path.split(prefix)
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return []
    return sorted(
        os.path.join(directory, n)
        for n in names
        if n == base + ".index" or n.startswith(base + ".data-")
    )


def step_of(prefix: str) -> int:
    m = _CKPT_RE.search(prefix)
    return int(m.group(1)) if m else -1


@dataclass
class Verdict:
    prefix: str
    step: int
    ok: bool
    reason: str = ""


def verify(prefix: str, hashes: bool = True) -> Verdict:
    """Check one checkpoint against its manifest: which file is wrong and how (file sizes
    only when `hashes` is False; with hashes, every tensor is read back and CRC-checked)."""
    step = step_of(prefix)
    mpath = prefix + MANIFEST_SUFFIX
    if not os.path.exists(mpath):
        return Verdict(
            prefix, step, False, f"{os.path.basename(mpath)} missing: the write never completed"
        )
    try:
        files = read_manifest(prefix)["files"]
    except (OSError, ValueError, KeyError) as e:
        return Verdict(prefix, step, False, f"{os.path.basename(mpath)} unreadable ({e})")
    directory = os.path.dirname(prefix)
    for name, meta in files.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            return Verdict(prefix, step, False, f"{name} is missing")
        size = os.path.getsize(path)
        if size != meta["size"]:
            return Verdict(
                prefix,
                step,
                False,
                f"{name} has {size} bytes, the manifest says {meta['size']} (truncated?)",
            )
        if hashes and "sha256" in meta and sha256_file(path) != meta["sha256"]:
            return Verdict(
                prefix, step, False, f"{name} checksum differs from the manifest (corrupted)"
            )
    data_files = sorted(n for n in files if ".data-" in n)
    if hashes and not all("sha256" in files[n] for n in data_files):  # old manifests: done
        return _check_tensors(prefix, step, data_files)
    return Verdict(prefix, step, True)


def _corruption(e: tf.errors.OpError) -> bool:
    """A failed checksum or short data. TF's CheckpointReader raises a plain OpError (code
    UNKNOWN) for a CRC mismatch: only its message tells."""
    return isinstance(e, (tf.errors.DataLossError, tf.errors.OutOfRangeError)) or (
        "Checksum does not match" in str(e)
    )


def _check_tensors(prefix: str, step: int, data_files: list[str]) -> Verdict:
    """Read every tensor of the checkpoint: TensorFlow checks each against the CRC32C its
    writer stored in the index (whose SHA-256 the manifest has just confirmed). Only a
    failed checksum or short data counts as corruption; other errors (memory, I/O) propagate
    rather than send a good checkpoint to checkpoints/bad/."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_dtype_map():
            try:
                reader.get_tensor(key)
            except tf.errors.OpError as e:
                if not _corruption(e):
                    raise
                where = " or ".join(data_files) or "the data file"
                return Verdict(
                    prefix,
                    step,
                    False,
                    f"{where}: tensor {key} checksum differs from its CRC32C in the index "
                    f"(corrupted): {e.message.splitlines()[0][:200]}",
                )
    except tf.errors.OpError as e:
        if not _corruption(e):
            raise
        return Verdict(prefix, step, False, f"unreadable ({e.message.splitlines()[0][:200]})")
    return Verdict(prefix, step, True)


def list_checkpoints(directory: str) -> list[str]:
    """Every checkpoint prefix in `directory`, oldest first (from the files, not the state file)."""
    prefixes = {
        p[: -len(".index")] for p in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index"))
    }
    prefixes |= {
        p[: -len(MANIFEST_SUFFIX)]
        for p in glob.glob(os.path.join(glob.escape(directory), "ckpt-*" + MANIFEST_SUFFIX))
    }
    return sorted(prefixes, key=step_of)
