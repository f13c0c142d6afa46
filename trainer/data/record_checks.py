"""Checking sharded records before and while they are read: the layout the run was made for,
each shard's CRC-32 against the description (`data.verify`), the first bad record of a
shard named, and a read error during training turned into one line naming the shard and
record. The stream itself: trainer/data/records.py."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import tensorflow as tf
from omegaconf import DictConfig

from trainer.config import UserError
from trainer.data import record_files
from trainer.data.record_files import file_crc32


def feature_spec(desc: dict) -> dict:
    y_dtype = tf.int64 if desc["y_dtype"] == "int64" else tf.float32
    return {
        "id": tf.io.FixedLenFeature([], tf.int64),
        "x": tf.io.FixedLenFeature(desc["feature_shape"], tf.float32),
        "y": tf.io.FixedLenFeature(desc["y_shape"], y_dtype),
    }


def check_layout(cfg: DictConfig, data) -> None:
    batch, lanes = int(cfg.batch_size), data.lanes
    if lanes < 1 or batch % lanes:
        raise UserError(
            f"data.lanes: received {lanes}; allowed: an integer >= 1 that divides "
            f"data.batch_size ({batch})"
        )
    if len(data.train) < lanes:
        raise UserError(
            f"data.lanes: received {lanes}; there are only {len(data.train)} training "
            f"shards (allowed: 1..{len(data.train)})"
        )
    for key in ("cycle_shards", "shuffle_buffer"):
        if int(cfg[key]) < 1:
            raise UserError(f"data.{key}: received {cfg[key]!r}; allowed: an integer >= 1")
    if data.steps_per_epoch(batch) < 1:
        raise UserError(
            f"data.batch_size: received {batch}; the smallest lane of {len(data.train)} "
            f"training shards holds fewer than {batch // lanes} examples"
        )


def check_contents(data, verify: str) -> None:
    """Sizes always; CRC-32s with verify=checksums; each shard's first record parses."""
    shards = data.train + data.val
    bad = record_files.size_problems(shards)
    if not bad and verify == "checksums":
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            crcs = pool.map(lambda s: file_crc32(s.path), shards)
            bad = [
                f"shard {s.path!r} fails its checksum (CRC-32 {crc:08x}, description "
                f"{s.crc32:08x}): the file is damaged or was changed"
                for s, crc in zip(shards, crcs, strict=True)
                if crc != s.crc32
            ]
    if len(bad) == 1:
        raise UserError(f"data: {bad[0]}")
    if bad:
        raise UserError(
            f"data: {len(bad)} of {len(shards)} shards do not match their description (a "
            f"description from another dataset?); the first: {bad[0]}"
        )
    for s in shards:
        first = bad_record(data.desc, s.path, limit=1)
        if first is not None:
            raise UserError(f"data: {first}")


def bad_record(desc: dict, path: str, limit: int | None = None) -> str | None:
    """'shard X record N: problem' for the first record of `path` that does not read
    (framing or CRC) or parse (features), within its first `limit` records; else None.
    Reads 1024 records at a time; only a batch that fails is read again record by record."""
    spec = feature_spec(desc)
    ds = tf.data.TFRecordDataset(path)
    if limit is not None:
        ds = ds.take(limit)
    index, it = 0, iter(ds.batch(1024))
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return None
        except (tf.errors.OpError, UnicodeDecodeError) as e:  # framing/CRC: find the record
            one = iter(ds.skip(index))
            while True:
                try:
                    next(one)
                except (StopIteration, tf.errors.OpError):
                    break
                index += 1
            return f"shard {path} record {index}: {_first_line(e)}"
        try:
            tf.io.parse_example(batch, spec)
        except (tf.errors.OpError, UnicodeDecodeError):  # TF can quote bytes undecodably
            for j in range(int(batch.shape[0])):
                try:
                    tf.io.parse_single_example(batch[j], spec)
                except (tf.errors.OpError, UnicodeDecodeError) as e:
                    return (
                        f"shard {path} record {index + j}: its features do not match the "
                        f"description ({_first_line(e)})"
                    )
        index += int(batch.shape[0])


def _first_line(e: Exception) -> str:
    """TensorFlow's message without its op and function names."""
    if isinstance(e, UnicodeDecodeError):
        return "the record is not a tf.train.Example"
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\bname:\s*$", "", e.message or str(e))
    return text.strip().splitlines()[0][:200].strip()


_DATA_ERROR_WORDS = ("corrupted record", "truncated record", "example", "feature", "parse")


def diagnose(data, error: tf.errors.OpError) -> UserError | None:
    """The message for a read error during training or eval: the shard and record at fault.
    None when `error` is not about reading records, or no record is at fault (the caller
    re-raises it: a model's own InvalidArgumentError is not a data problem)."""
    text = (error.message or str(error)).lower()
    if not isinstance(error, tf.errors.DataLossError) and not any(
        w in text for w in _DATA_ERROR_WORDS
    ):
        return None
    for s in data.train + data.val:
        problem = bad_record(data.desc, s.path)
        if problem is not None:
            return UserError(
                f"data: {problem}. The run stopped; its checkpoints are intact. Replace the "
                "shard (scripts/make_records.py) and rerun to resume."
            )
    return None
