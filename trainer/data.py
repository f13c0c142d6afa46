"""Datasets and deterministic tf.data pipelines.

Every dataset is loaded into memory as numpy arrays and split once into train and
validation parts. The training stream is a pure function of (seed, step): epoch `e` is a
permutation drawn with the stateless seed (seed, e), cut into fixed-size batches, so the
position in the data is just the step counter. A resumed run rebuilds the stream at its
restored step and sees exactly the batches the uninterrupted run would have seen, with
no shuffle buffer to checkpoint.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from trainer.config import UserError

_SYNTHETIC_SEED = 20240601  # the synthetic datasets' identity: the same arrays in every run


@dataclass
class Data:
    """In-memory train/validation arrays plus what the model and loss need to know."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    task: str  # "regression" | "classification"
    output_units: int

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.x_train) // batch_size


# ---------------------------------------------------------------- sources
def _synthetic_regression(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_SYNTHETIC_SEED)
    x = rng.normal(size=(cfg.num_samples, cfg.num_features)).astype(np.float32)
    w1 = rng.normal(size=(cfg.num_features, 16)) / np.sqrt(cfg.num_features)
    w2 = rng.normal(size=(16, 1))
    y = np.tanh(x @ w1) @ w2 + cfg.noise * rng.normal(size=(cfg.num_samples, 1))
    return x, y.astype(np.float32)


def _synthetic_sequence(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_SYNTHETIC_SEED)
    x = rng.normal(size=(cfg.num_samples, cfg.seq_len, cfg.num_features)).astype(np.float32)
    decay = 0.8 ** np.arange(cfg.seq_len)[::-1]  # recent steps matter most: needs memory
    y = (x[:, :, 0] * decay).sum(axis=1, keepdims=True) - 0.5 * x[:, -1, 1:2]
    y = y + cfg.noise * rng.normal(size=y.shape)
    return x, y.astype(np.float32)


def _digits(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int32)


def _check_file(path: str) -> str:
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise UserError(f"data.path: received {path!r}; no such file")
    if not os.access(path, os.R_OK):
        raise UserError(f"data.path: received {path!r}; the file is not readable")
    return path


def _npz(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    path = _check_file(cfg.path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise UserError(
                    f"data.path: {path!r} has arrays {sorted(f.files)}; arrays 'x' and 'y' are required"
                )
            x, y = f["x"], f["y"]
    except UserError:
        raise
    except Exception as e:  # not a zip, truncated, pickled objects...
        raise UserError(f"data.path: cannot read {path!r} as .npz ({e})") from None
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise UserError(f"data.path: {path!r} arrays must be numeric; got x {x.dtype}, y {y.dtype}")
    return x, y


def _csv(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    path = _check_file(cfg.path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"data.path: cannot read {path!r} as CSV ({e})") from None
    if len(rows) < 2:
        raise UserError(f"data.path: {path!r} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if cfg.target not in header:
        raise UserError(f"data.target: received {cfg.target!r}; columns in {path!r}: {header}")
    t = header.index(cfg.target)
    try:
        table = np.array([[float(v) for v in r] for r in rows[1:] if r], dtype=np.float64)
    except ValueError as e:
        raise UserError(f"data.path: {path!r} must hold numbers only ({e})") from None
    y = table[:, t]
    if np.all(y == np.round(y)) and cfg.task in ("auto", "classification"):
        y = y.astype(np.int64)
    return np.delete(table, t, axis=1), y


_SOURCES = {
    "synthetic_regression": _synthetic_regression,
    "synthetic_sequence": _synthetic_sequence,
    "digits": _digits,
    "npz": _npz,
    "csv": _csv,
}


def load_data(cfg: DictConfig) -> Data:
    """Load the dataset that `cfg` (the `data` group) names and split it train/validation."""
    x, y = _SOURCES[cfg.name](cfg)
    if len(x) != len(y):
        raise UserError(f"data: x has {len(x)} rows but y has {len(y)}; they must match")
    task = cfg.task
    if task == "auto":
        task = "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
    x = np.asarray(x, dtype=np.float32)
    if task == "classification":
        y = np.asarray(y).reshape(-1)
        if not np.all(y == np.round(y)) or y.min() < 0:
            raise UserError("data.task: classification needs integer class labels 0..K-1 in y")
        y = y.astype(np.int32)
        output_units = int(y.max()) + 1
    else:
        y = np.asarray(y, dtype=np.float32)
        y = y.reshape(len(y), -1)
        output_units = y.shape[1]
    order = np.random.default_rng(_SYNTHETIC_SEED).permutation(len(x))  # a fixed split
    n_val = max(1, int(round(cfg.val_fraction * len(x))))
    val, train = order[:n_val], order[n_val:]
    if len(train) < cfg.batch_size:
        raise UserError(
            f"data.batch_size: received {cfg.batch_size}; the training split has only "
            f"{len(train)} examples (allowed: 1..{len(train)})"
        )
    return Data(x[train], y[train], x[val], y[val], task, output_units)


# ---------------------------------------------------------------- pipelines
def train_dataset(data: Data, batch_size: int, seed: int, start_step: int) -> tf.data.Dataset:
    """The endless training stream, starting at batch number `start_step` (0-based)."""
    n = len(data.x_train)
    spe = data.steps_per_epoch(batch_size)
    x, y = tf.constant(data.x_train), tf.constant(data.y_train)
    seed = tf.constant(seed, tf.int64)

    def epoch_batches(epoch):
        noise = tf.random.stateless_uniform([n], seed=tf.stack([seed, epoch]))
        perm = tf.argsort(noise, stable=True)[: spe * batch_size]
        return tf.data.Dataset.from_tensor_slices(tf.reshape(perm, [spe, batch_size]))

    start_epoch, offset = divmod(start_step, spe)
    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_batches).skip(offset)
    ds = ds.map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
    return ds.prefetch(2)


def eval_dataset(data: Data, batch_size: int) -> tf.data.Dataset:
    """The validation split in order, last batch possibly smaller."""
    return tf.data.Dataset.from_tensor_slices((data.x_val, data.y_val)).batch(batch_size)
