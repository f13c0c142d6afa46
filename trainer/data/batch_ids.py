"""Which examples a step trains on, and their fingerprint: shared by every data source.

`split_ids` is the fixed train/validation split of a source's rows (the same for data in
memory, a user's source and the record converter); `id_terms` turns a batch's example ids
into the per-row terms of its `batch_ids_hash` (the loop sums them into one number per step,
logged in metrics.jsonl). No module of the data sources is imported here.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

SPLIT_SEED = (
    20240601  # the split's seed (also the synthetic datasets' identity, trainer/data/memory.py)
)


def id_terms(ids: tf.Tensor, first_row) -> tf.Tensor:
    """Per-row terms of a step's `batch_ids_hash`: a 32-bit fingerprint of (example id,
    row in the global batch), as float64. Their sum over the global batch (exact in float64
    for batches up to 2**21 rows, whichever replica holds which rows) is the step's
    fingerprint: it changes when any example, or the order of the examples, changes."""
    shape = tf.shape(ids, out_type=tf.int64)  # [rows] or [batches, rows]: rows last
    rows = tf.range(shape[-1]) + tf.cast(first_row, tf.int64)
    pairs = tf.stack([tf.reshape(ids, [-1]), tf.reshape(tf.broadcast_to(rows, shape), [-1])], 1)
    fp = tf.cast(tf.fingerprint(pairs)[:, :4], tf.float64)
    terms = tf.linalg.matvec(fp, tf.constant([2.0**k for k in range(0, 32, 8)], tf.float64))
    return tf.reshape(terms, shape)


def split_ids(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, training rows) of a source of `n` rows: a fixed random split,
    the same for the in-memory data and the record converter."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return order[:n_val], order[n_val:]


def batch_positions(n: int, batch_size: int, seed: int, start_step: int) -> tf.data.Dataset:
    """The endless stream of global batches from batch number `start_step` (0-based), each a
    [batch_size] vector of positions in the training rows 0..n-1: epoch `e` is a permutation
    drawn with the stateless seed (seed, e), cut into n // batch_size batches (the rest
    dropped). A pure function of (seed, step): the data position is the step."""
    spe = n // batch_size
    seed = tf.constant(seed, tf.int64)

    def epoch_batches(epoch):
        noise = tf.random.stateless_uniform([n], seed=tf.stack([seed, epoch]))
        perm = tf.argsort(noise, stable=True)[: spe * batch_size]
        return tf.data.Dataset.from_tensor_slices(tf.reshape(perm, [spe, batch_size]))

    start_epoch, offset = divmod(start_step, spe)
    return tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_batches).skip(offset)
