"""`data=records`: sharded TFRecord files streamed from disk, with exact, tiny-state resume.

The files come from scripts/make_records.py: shards of tf.train.Example records (`id`: the
example's row in its source, `x`, `y`) and `description.json` beside them (feature shape,
dtypes, task, classes, and per shard its split, example count, size and CRC-32).

The training stream is a pure function of (seed, step), as for in-memory data
(trainer/data/memory.py), so a checkpoint's data position is the step counter alone:
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

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from trainer.config import UserError
from trainer.data import record_files
from trainer.data.batch_ids import id_terms
from trainer.data.record_checks import check_contents, check_layout, diagnose, feature_spec
from trainer.data.record_files import Shard

_READ_BUFFER = 1 << 20  # bytes per shard read at a time (TFRecordDataset buffer_size)
_READ_BATCH = 64  # records per element read from a shard
_STEPS_PER = 16  # global batches made at a time


# ---------------------------------------------------------------- the dataset
@dataclass
class RecordData:
    """Sharded records: the same interface as trainer/data/memory.py's in-memory `Data`."""

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
        """The training shards' statistics, if the converter wrote them (trainer/data/standardize.py)."""
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
        return record_files.signature(self.desc, self.train)

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
    """scan: keep at most `left` examples of the stream; emit (left before, examples). The
    cut (an epoch's last window) is gathered into new tensors: a slice would be a view of the
    window's buffer, on which the rebatch that follows logs TensorFlow's "Tensor RefCount not
    reliable if buf_ points to a SubBuffer" ERROR line (a few per epoch; harmless, but ERROR
    lines on a newcomer's screen)."""
    x, y, ids = example
    n = tf.shape(ids, out_type=tf.int64)[0]
    k = tf.minimum(n, left)

    def cut(t):
        return tf.cond(k < n, lambda: tf.gather(t, tf.range(k)), lambda: t)

    return left - k, (left, cut(x), cut(y), cut(ids))


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
    """The shards `data.files` (and `data.val_files`) name (record_files.select), checked
    against their description before anything is written: every shard present, of its size,
    with its CRC-32 (data.verify=checksums), and its first record of the described features."""
    chosen = record_files.select(cfg)
    data = RecordData(
        chosen.desc,
        chosen.train,
        chosen.val,
        int(cfg.lanes),
        int(cfg.cycle_shards),
        int(cfg.shuffle_buffer),
    )
    check_layout(cfg, data)
    check_contents(data, str(cfg.get("verify", "checksums")))
    return data


def _fold(*parts) -> tf.Tensor:
    """An int64 seed from int64 parts, without overflow or collisions between them."""
    data = tf.stack([tf.cast(p, tf.int64) for p in parts])
    return tf.bitcast(tf.fingerprint(data[None])[0], tf.int64)
