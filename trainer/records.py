"""`data=records`: sharded TFRecord files streamed from disk, with exact, tiny-state resume.

The files come from scripts/make_records.py: shards of tf.train.Example records (`id`: the
example's row in its source, `x`, `y`) and `description.json` beside them (feature shape,
dtypes, task, classes, and per shard its split, example count, size and CRC-32).

The training stream is a pure function of (seed, step), as for in-memory data
(trainer/data.py), so a checkpoint's data position is the step counter alone:
- Epoch `e` permutes the shards with the stateless seed (seed, e) and deals them round-robin
  to `data.lanes` lanes. Each global batch is `batch/lanes` examples from every lane, lane
  after lane, so it mixes examples from many shards.
- A lane reads its shards `data.cycle_shards` at a time (a block): their records are
  interleaved (64 at a time from each shard; read in order when the whole block fits in one
  window), cut into windows of `data.shuffle_buffer` records, and each window is permuted
  with the stateless seed of (seed, e, lane, block, window). Nothing else is random (no
  tf.data shuffle state, no global seed), so the order is reproducible from any window's
  start.
- An epoch is `steps_per_epoch` batches: as many as the lane with the fewest examples can
  fill in any shard order; the rest of each lane is dropped (a different rest each epoch).
- Resuming at step s: every lane skips whole blocks by their example counts without
  opening them, then reads the current block's records as bytes (never decoded or
  permuted) up to the window holding its position, and drops the examples of that window
  before its position before decoding. The replay is bounded by one block.
- Under multi-worker training each worker reads only its own lanes: the global batch at
  each step holds the same examples for any number of workers that divides the lanes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, ListConfig

from trainer.config import UserError, first_few
from trainer.data import id_terms

DESCRIPTION = "description.json"
FORMAT = "resumable-trainer records"
VERSION = 1
_READ_BUFFER = 1 << 20  # bytes per shard read at a time (TFRecordDataset buffer_size)
_READ_BATCH = 64  # records per element read from a shard
_STEPS_PER = 16  # global batches made at a time


# ---------------------------------------------------------------- the description
@dataclass(frozen=True)
class Shard:
    path: str
    examples: int
    bytes: int
    crc32: int


def file_crc32(path: str, chunk: int = 1 << 22) -> int:
    """CRC-32 of a whole file (zlib; releases the GIL, so shards are checked in parallel)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def dataset_id(description: dict) -> str:
    """The identity of a dataset: its features and every shard's name, count and CRC
    (recorded in each checkpoint's manifest: a resume on other data is refused)."""
    core = {
        k: description[k] for k in ("feature_shape", "y_shape", "y_dtype", "task", "output_units")
    }
    core["shards"] = sorted(
        (s["file"], s["split"], s["examples"], s["crc32"]) for s in description["shards"]
    )
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def feature_spec(desc: dict) -> dict:
    y_dtype = tf.int64 if desc["y_dtype"] == "int64" else tf.float32
    return {
        "id": tf.io.FixedLenFeature([], tf.int64),
        "x": tf.io.FixedLenFeature(desc["feature_shape"], tf.float32),
        "y": tf.io.FixedLenFeature(desc["y_shape"], y_dtype),
    }


def _read_description(path: str) -> dict:
    try:
        with open(path) as f:
            desc = json.load(f)
    except OSError as e:
        raise UserError(
            f"data.description: cannot read {path!r} ({e.strerror}); write the shards and "
            "their description with scripts/make_records.py, or set data.description"
        ) from None
    except ValueError as e:
        raise UserError(f"data.description: {path!r} is not valid JSON ({e})") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise UserError(
            f"data.description: {path!r} is not a description written by "
            f"scripts/make_records.py (format {FORMAT!r} expected)"
        )
    if desc.get("version") != VERSION:
        raise UserError(
            f"data.description: {path!r} has version {desc.get('version')!r}; this trainer "
            f"reads version {VERSION}"
        )
    try:
        desc["shards"] = [dict(s) for s in desc["shards"]]
        for s in desc["shards"]:
            s["examples"], s["bytes"], s["crc32"] = (
                int(s[k]) for k in ("examples", "bytes", "crc32")
            )
            if s["split"] not in ("train", "val") or not isinstance(s["file"], str):
                raise ValueError(f"shard {s['file']!r}: split {s['split']!r}")
        desc["feature_shape"] = [int(d) for d in desc["feature_shape"]]
        desc["y_shape"] = [int(d) for d in desc["y_shape"]]
        desc["output_units"] = int(desc["output_units"])
        if desc["task"] not in ("regression", "classification"):
            raise ValueError(f"task {desc['task']!r}")
        if desc["y_dtype"] not in ("float32", "int64"):
            raise ValueError(f"y_dtype {desc['y_dtype']!r}")
        desc["dataset_id"] = dataset_id(desc)  # computed, never trusted from the file
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"data.description: {path!r} lacks or garbles {e} (write it with "
            "scripts/make_records.py)"
        ) from None
    return desc


def _expand(key: str, value) -> list[str]:
    """Sorted files matched by a glob, or by a list of paths and globs."""
    patterns = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not patterns:
        raise UserError(f"{key}: received an empty list; allowed: a glob or a list of paths")
    files: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(str(pattern))))
        if not found:
            raise UserError(f"{key}: received {str(pattern)!r}; no file matches it")
        files += [f for f in found if f not in files]
    return files


# ---------------------------------------------------------------- the dataset
@dataclass
class RecordData:
    """Sharded records: the same interface as trainer/data.py's in-memory `Data`."""

    desc: dict
    train: list[Shard]
    val: list[Shard]
    lanes: int
    cycle_shards: int
    shuffle_buffer: int

    @property
    def task(self) -> str:
        return self.desc["task"]

    task_reason = "from the dataset's description.json"

    def standardize_stats(self) -> dict | None:
        """The training shards' statistics, if the converter wrote them (trainer/standardize.py)."""
        stats = self.desc.get("standardize")
        return None if stats is None else {k: np.asarray(v) for k, v in stats.items()}

    @property
    def output_units(self) -> int:
        return int(self.desc["output_units"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.desc["feature_shape"])

    def signature(self) -> dict:
        """Recorded in each checkpoint: a resume on other records, or on another set of
        training shards of them, is refused (the stream depends on both)."""
        names = json.dumps([os.path.basename(s.path) for s in self.train])
        return {
            "feature_shape": list(self.feature_shape),
            "output_units": self.output_units,
            "task": self.task,
            "dataset_id": self.desc["dataset_id"],
            "training_shards": hashlib.sha256(names.encode()).hexdigest()[:16],
        }

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch: what the lane with the fewest examples fills in any order."""
        smallest = sorted(s.examples for s in self.train)[: len(self.train) // self.lanes]
        return sum(smallest) // (batch_size // self.lanes)

    def check_parts(self, parts: int) -> None:
        """Each of `parts` input pipelines (workers) reads whole lanes of its own."""
        if self.lanes % parts:
            raise UserError(
                f"data.lanes: received {self.lanes}; with {parts} workers it must be a "
                "multiple of the number of workers (each worker reads whole lanes)"
            )

    def diagnose(self, error: tf.errors.OpError) -> UserError | None:
        return diagnose(self, error)

    def _parse(self, serialized: tf.Tensor):
        ex = tf.io.parse_example(serialized, feature_spec(self.desc))
        y = tf.cast(ex["y"], tf.int32) if self.task == "classification" else ex["y"]
        return ex["x"], y, ex["id"]

    def sample(self, n: int) -> np.ndarray:
        """The first `n` inputs of the training shards (to build a model on)."""
        ds = tf.data.TFRecordDataset([s.path for s in self.train]).take(n).batch(n)
        return next(iter(ds.map(self._parse)))[0].numpy()

    def val_x(self, limit: int | None = None) -> np.ndarray:
        """The validation inputs in order (the first `limit`)."""
        ds = tf.data.TFRecordDataset([s.path for s in self.val])
        if limit is not None:
            ds = ds.take(limit)
        xs = [x.numpy() for x, _, _ in ds.batch(4096).map(self._parse)]
        return np.concatenate(xs)

    def eval_dataset(self, batch_size: int) -> tf.data.Dataset:
        """The validation shards in order, last batch possibly smaller: (x, y)."""
        ds = tf.data.TFRecordDataset([s.path for s in self.val], buffer_size=_READ_BUFFER)
        ds = ds.batch(batch_size).map(self._parse, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.map(lambda x, y, _: (x, y)).prefetch(tf.data.AUTOTUNE)

    def train_dataset(
        self, batch_size: int, seed: int, start_step: int, part: tuple[int, int] = (0, 1)
    ) -> tf.data.Dataset:
        """The endless training stream from batch number `start_step`: (x, y, id terms).
        `part` (i, n): pipeline i of n reads lanes [i*L/n, (i+1)*L/n) only, which are rows
        [i*B/n, (i+1)*B/n) of every global batch."""
        spe = self.steps_per_epoch(batch_size)
        per_lane = batch_size // self.lanes
        i, parts = part
        mine = range(i * self.lanes // parts, (i + 1) * self.lanes // parts)
        start_epoch, offset = divmod(start_step, spe)
        lane = _LaneReader(self, seed, spe * per_lane)

        epochs = tf.data.Dataset.range(start_epoch, 2**62).map(
            lambda e: (e, tf.where(e == start_epoch, tf.constant(offset, tf.int64), 0))
        )

        def lane_stream(k: int) -> tf.data.Dataset:
            """Lane k's examples, (spe - skipped steps) steps' worth per epoch, endless."""

            def epoch(e, skip_steps):
                ds = lane.examples(e, k, skip_steps * per_lane, self._parse)
                ds = ds.scan((spe - skip_steps) * per_lane, _cap)
                return ds.take_while(lambda left, *_: left > 0).map(lambda _, *ex: ex)

            return epochs.flat_map(epoch).rebatch(_STEPS_PER * per_lane)

        # the lanes side by side make _STEPS_PER global batches at a time (built once: only
        # each lane's epoch is rebuilt per epoch, a cost that counts when epochs are short)
        first_row = mine.start * per_lane
        lanes = tf.data.Dataset.zip(tuple(lane_stream(k) for k in mine))
        ds = lanes.map(_side_by_side(per_lane, first_row)).unbatch()
        return ds.prefetch(tf.data.AUTOTUNE)


def _cap(left, example):
    """scan: keep at most `left` examples of the stream; emit (left before, examples)."""
    x, y, ids = example
    k = tf.minimum(tf.shape(ids, out_type=tf.int64)[0], left)
    return left - k, (left, x[:k], y[:k], ids[:k])


def _side_by_side(per_lane: int, first_row: int):
    """Lanes' chunks of c steps -> c global batches [c, rows, ...] and their id terms."""

    def merge(*lanes):
        def steps(t):
            return tf.reshape(t, tf.concat([[-1, per_lane], tf.shape(t)[1:]], 0))

        x, y, ids = (
            tf.concat([steps(t) for t in parts], axis=1) for parts in zip(*lanes, strict=True)
        )
        return x, y, id_terms(ids, first_row)

    return merge


class _LaneReader:
    """One lane's examples of one epoch, from any position (graph code: traced per epoch).

    Records travel in tensors of many, never one element each (tf.data's cost per element
    was most of a step of the default model): each shard is read `_READ_BATCH` records at
    a time, the block's interleaved reads are cut into windows of `data.shuffle_buffer`,
    and a window is permuted, then decoded as one batch.
    """

    def __init__(self, data: RecordData, seed: int, per_epoch: int):
        self.paths = tf.constant([s.path for s in data.train])
        self.counts = tf.constant([s.examples for s in data.train], tf.int64)
        self.n, self.lanes = len(data.train), data.lanes
        self.cycle, self.buffer = data.cycle_shards, data.shuffle_buffer
        self.seed, self.per_epoch = seed, per_epoch
        # every block fits in one window (small shards): interleaving them, or decoding in
        # parallel, would add only its set-up, ~1 ms a block, which counts when an epoch is
        # a few dozen steps. Larger shards are read in parallel; windows are decoded one at a
        # time (decoding two at a time took CPU from the train step on 2 cores: 0.92x memory's
        # steps/s against 1.00-1.20x, BENCHMARKS.md).
        self.one_window = max(s.examples for s in data.train) * self.cycle <= self.buffer

    def shard_order(self, e):
        """Epoch e's shard permutation: the stateless seed (seed, e)."""
        noise = tf.random.stateless_uniform(
            [self.n], seed=tf.stack([tf.constant(self.seed, tf.int64), e])
        )
        return tf.argsort(noise, stable=True)

    def examples(self, e, lane: int, position, parse) -> tf.data.Dataset:
        """Lane `lane`'s examples of epoch `e` from example `position` on, decoded by
        `parse`, in tensors of up to a window each."""
        shards = tf.gather(self.shard_order(e), tf.range(lane, self.n, self.lanes))
        n_shards = len(range(lane, self.n, self.lanes))
        blocks = -(-n_shards // self.cycle)
        segment = tf.constant([j // self.cycle for j in range(n_shards)])
        sizes = tf.math.segment_sum(tf.gather(self.counts, shards), segment)
        ends = tf.cumsum(sizes)
        first = tf.reduce_sum(tf.cast(ends <= position, tf.int64))  # the block holding it
        skip = position - (ends[first] - sizes[first])

        def block(b):
            files = tf.gather(self.paths, shards[b * self.cycle : (b + 1) * self.cycle])
            if self.one_window:  # the window permutes the whole block: read it in order
                records = tf.data.TFRecordDataset(files, buffer_size=_READ_BUFFER)
                records = records.batch(_READ_BATCH)
            else:  # shards read side by side (in parallel), so that every window mixes them
                records = tf.data.Dataset.from_tensor_slices(files).interleave(
                    lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER).batch(
                        _READ_BATCH
                    ),
                    cycle_length=self.cycle,
                    block_length=1,
                    num_parallel_calls=self.cycle,
                    deterministic=True,
                )
            mix = _fold(tf.constant(self.seed, tf.int64), e, lane, b)
            at = tf.where(b == first, skip, 0)  # examples of this block to skip
            w0 = at // self.buffer  # whole windows skipped as bytes: never permuted or decoded
            windows = tf.data.Dataset.zip(
                tf.data.Dataset.range(0, 2**62), records.rebatch(self.buffer)
            ).skip(w0)

            def permute(w, window):
                noise = tf.random.stateless_uniform(tf.shape(window), seed=tf.stack([mix, w]))
                window = tf.gather(window, tf.argsort(noise, stable=True))
                return parse(window[tf.where(w == w0, at - w0 * self.buffer, 0) :])

            return windows.map(permute)

        return tf.data.Dataset.range(first, blocks).flat_map(block)


# ---------------------------------------------------------------- opening and checking
def open_records(cfg: DictConfig) -> RecordData:
    """The shards `data.files` (and `data.val_files`) name, checked against their
    description before anything is written: every shard present, of its size, with its
    CRC-32 (data.verify=checksums), and its first record of the described features."""
    files = _expand("data.files", cfg.files)
    desc_path = cfg.get("description") or os.path.join(os.path.dirname(files[0]), DESCRIPTION)
    desc = _read_description(os.path.expanduser(str(desc_path)))
    if cfg.task not in ("auto", desc["task"]):
        raise UserError(
            f"data.task: received {cfg.task!r}; the dataset in {desc_path} is "
            f"{desc['task']} (allowed: auto or {desc['task']})"
        )
    listed = {s["file"]: s for s in desc["shards"]}
    train = _shards("data.files", files, listed, desc_path, "train")
    train_names = {os.path.basename(s.path) for s in train}
    missing = [n for n, s in listed.items() if s["split"] == "train" and n not in train_names]
    if missing:
        raise UserError(
            f"data.files: {len(missing)} shard(s) listed in {desc_path} are not among the "
            f"files matched by {str(cfg.files)!r}: {first_few(sorted(missing), 3)} (missing?)"
        )
    if cfg.get("val_files"):
        given = _expand("data.val_files", cfg.val_files)
        val = _shards("data.val_files", given, listed, desc_path, "val")
    else:
        here = os.path.dirname(train[0].path)
        names = sorted(n for n, s in listed.items() if s["split"] == "val")
        val = _shards("data.val_files", [os.path.join(here, n) for n in names], listed, desc_path)
        if not val:  # no validation shards: hold out a fraction of the training shards
            held = max(1, int(round(float(cfg.val_fraction) * len(train))))
            if held >= len(train):
                raise UserError(
                    f"data.val_fraction: the description has no validation shards and "
                    f"holding out {held} of {len(train)} training shard(s) would leave none to "
                    "train on; write validation shards (scripts/make_records.py) or set "
                    "data.val_files"
                )
            train, val = train[:-held], train[-held:]
    data = RecordData(
        desc, train, val, int(cfg.lanes), int(cfg.cycle_shards), int(cfg.shuffle_buffer)
    )
    _check_layout(cfg, data)
    _check_contents(data, str(cfg.get("verify", "checksums")))
    return data


def _shards(
    key: str, files: list[str], listed: dict, desc_path: str, split: str | None = None
) -> list[Shard]:
    """The description's entries of `files`, in the description's order (so the stream
    does not depend on how the files were listed); of `split` only, each name once."""
    names = [os.path.basename(p) for p in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{key}: shard {twice[0]!r} is given twice (from two directories?)")
    order = {name: i for i, name in enumerate(listed)}
    files = sorted(files, key=lambda p: order.get(os.path.basename(p), -1))
    shards = []
    for path in files:
        entry = listed.get(os.path.basename(path))
        if entry is None:
            raise UserError(
                f"{key}: {path!r} is not a shard of the dataset described by {desc_path} "
                "(a description from another dataset?)"
            )
        if not os.path.isfile(path):
            raise UserError(f"{key}: shard {path!r} is missing")
        if split is not None and entry["split"] != split:
            raise UserError(
                f"{key}: {path!r} is a {entry['split']} shard in {desc_path}; allowed here: "
                f"{split} shards only (narrow the glob, e.g. 'train-*.tfrecord')"
            )
        shards.append(Shard(path, int(entry["examples"]), int(entry["bytes"]), int(entry["crc32"])))
    return shards


def _check_layout(cfg: DictConfig, data: RecordData) -> None:
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


def _check_contents(data: RecordData, verify: str) -> None:
    """Sizes always; CRC-32s with verify=checksums; each shard's first record parses."""
    shards = data.train + data.val
    bad = [
        f"shard {s.path!r} has {size} bytes; its description says {s.bytes}"
        for s in shards
        if (size := os.path.getsize(s.path)) != s.bytes
    ]
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


def _fold(*parts) -> tf.Tensor:
    """An int64 seed from int64 parts, without overflow or collisions between them."""
    data = tf.stack([tf.cast(p, tf.int64) for p in parts])
    return tf.bitcast(tf.fingerprint(data[None])[0], tf.int64)


def _first_line(e: Exception) -> str:
    """TensorFlow's message without its op and function names."""
    if isinstance(e, UnicodeDecodeError):
        return "the record is not a tf.train.Example"
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]|\bname:\s*$", "", e.message or str(e))
    return text.strip().splitlines()[0][:200].strip()


_DATA_ERROR_WORDS = ("corrupted record", "truncated record", "example", "feature", "parse")


def diagnose(data: RecordData, error: tf.errors.OpError) -> UserError | None:
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
