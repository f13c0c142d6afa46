"""Datasets and deterministic tf.data pipelines.

Three kinds of data, one interface (`load_data` returns any of them):
- `Data`: a source loaded into memory as numpy arrays (synthetic, digits, npz, csv) and split
  once into train and validation parts. Epoch `e` is a permutation drawn with the stateless
  seed (seed, e), cut into fixed-size batches.
- `data=records`: sharded TFRecord files streamed from disk (trainer/data/records.py);
- `data=custom`: the user's function, returning arrays (then a `Data`) or a random-access
  source read on demand (trainer/data/source.py).

Either way the training stream is a pure function of (seed, step), so the position in the
data is just the step counter: a resumed run rebuilds the stream at its restored step and
sees exactly the batches the uninterrupted run would have seen, with no shuffle buffer to
checkpoint. Each batch carries its examples' ids (the row of the source), as per-row terms
of `batch_ids_hash` (`id_terms`): the loop sums them into one fingerprint per step.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from trainer.config import UserError, check_file
from trainer.data import source as user_source
from trainer.data.batch_ids import SPLIT_SEED, batch_positions, id_terms, split_ids
from trainer.data.records import open_records
from trainer.data.standardize import statistics

__all__ = ["Data", "id_terms", "load_data", "read_source", "split_ids"]
_SYNTHETIC_SEED = SPLIT_SEED  # the synthetic datasets' identity: the same arrays in every run
_BLOCK_ROWS = 65536  # synthetic rows are drawn in blocks: any prefix, any size, little memory


@dataclass
class Data:
    """In-memory train/validation arrays plus what the model and loss need to know.

    `train_ids`/`val_ids`: each row's index in the source (the ids of `batch_ids_hash`).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    task: str  # "regression" | "classification"
    output_units: int
    train_ids: np.ndarray | None = None
    val_ids: np.ndarray | None = None
    task_reason: str = ""  # why this task (printed at start: the task is never a surprise)

    def __post_init__(self):
        if self.train_ids is None:
            self.train_ids = np.arange(len(self.x_train), dtype=np.int64)
        if self.val_ids is None:
            self.val_ids = np.arange(len(self.x_val), dtype=np.int64) + len(self.x_train)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.x_train) // batch_size

    def sample(self, n: int) -> np.ndarray:
        """The first `n` training inputs (to build a model on)."""
        return self.x_train[:n]

    def val_x(self, limit: int | None = None) -> np.ndarray:
        """The validation inputs (the first `limit`)."""
        return self.x_val[:limit]

    def signature(self) -> dict:
        """What a checkpoint's tensors depend on in the data (recorded in every manifest)."""
        return {
            "feature_shape": list(self.feature_shape),
            "output_units": int(self.output_units),
            "task": self.task,
        }

    def check_parts(self, parts: int) -> None:
        """Any number of input pipelines works: each slices the same global stream."""

    def standardize_stats(self) -> dict:
        """The training split's statistics (trainer/data/standardize.py)."""
        y = self.y_train if self.task == "regression" else None
        return statistics(self.x_train, y)

    def train_dataset(
        self, batch_size: int, seed: int, start_step: int, part: tuple[int, int] = (0, 1)
    ) -> tf.data.Dataset:
        """The endless training stream from batch number `start_step` (0-based): (x, y,
        id terms). `part` (i, n): input pipeline i of n keeps rows [i*B/n, (i+1)*B/n) of
        each global batch (every pipeline builds the same global stream)."""
        x, y = tf.constant(self.x_train), tf.constant(self.y_train)
        ids = tf.constant(self.train_ids, tf.int64)
        ds = batch_positions(len(self.x_train), batch_size, seed, start_step)
        i, parts = part
        rows = batch_size // parts
        first = i * rows

        def gather(idx):
            idx = idx[first : first + rows]
            return tf.gather(x, idx), tf.gather(y, idx), id_terms(tf.gather(ids, idx), first)

        return ds.map(gather).prefetch(2)

    def eval_dataset(self, batch_size: int) -> tf.data.Dataset:
        """The validation split in order, last batch possibly smaller: (x, y)."""
        return tf.data.Dataset.from_tensor_slices((self.x_val, self.y_val)).batch(batch_size)


# ---------------------------------------------------------------- sources
def _blocks(num_samples: int):
    """(block number, first row, rows) of the synthetic sources' row blocks."""
    for b, start in enumerate(range(0, num_samples, _BLOCK_ROWS)):
        yield b, start, min(_BLOCK_ROWS, num_samples - start)


def _synthetic_regression_blocks(cfg: DictConfig):
    """The regression set's rows block by block: (first row, x, y). Block b's rows come
    from the generator seeded (seed, b): the first N rows are the same for any size."""
    f = int(cfg.num_features)
    weights = np.random.default_rng([_SYNTHETIC_SEED, 0, f])
    w1 = weights.normal(size=(f, 16)) / np.sqrt(f)
    w2 = weights.normal(size=(16, 1))
    for b, start, rows in _blocks(int(cfg.num_samples)):
        x = np.random.default_rng([_SYNTHETIC_SEED, 1, b]).standard_normal((rows, f), np.float32)
        noise = np.random.default_rng([_SYNTHETIC_SEED, 2, b]).normal(size=(rows, 1))
        y = np.tanh(x @ w1) @ w2 + cfg.noise * noise
        yield start, x, y.astype(np.float32)


def _synthetic_sequence_blocks(cfg: DictConfig):
    """The sequence set's rows block by block, as `_synthetic_regression_blocks`."""
    decay = 0.8 ** np.arange(cfg.seq_len)[::-1]  # recent steps matter most: needs memory
    shape = (int(cfg.seq_len), int(cfg.num_features))
    for b, start, rows in _blocks(int(cfg.num_samples)):
        x = np.random.default_rng([_SYNTHETIC_SEED, 1, b]).standard_normal(
            (rows, *shape), np.float32
        )
        noise = np.random.default_rng([_SYNTHETIC_SEED, 2, b]).normal(size=(rows, 1))
        y = (x[:, :, 0] * decay).sum(axis=1, keepdims=True) - 0.5 * x[:, -1, 1:2]
        yield start, x, (y + cfg.noise * noise).astype(np.float32)


def _concat(blocks) -> tuple[np.ndarray, np.ndarray]:
    parts = list(blocks)
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def _synthetic_regression(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    return _concat(_synthetic_regression_blocks(cfg))


def _synthetic_sequence(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    return _concat(_synthetic_sequence_blocks(cfg))


def _digits(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int32)


def _npz(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    path = check_file(cfg.path)
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
    path = check_file(cfg.path)
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
# sources that can be drawn block by block (the record converter streams them)
STREAMED = {
    "synthetic_regression": _synthetic_regression_blocks,
    "synthetic_sequence": _synthetic_sequence_blocks,
}


MAX_CLASSES = 1000  # task auto: more distinct whole-number targets than this are not classes


def choose_task(task: str, y: np.ndarray) -> tuple[str, str]:
    """(task, why) for `data.task` and targets `y`: `auto` takes whole-number targets for
    class ids only when there are few of them (at most MAX_CLASSES and a tenth of the rows);
    prices or counts with many distinct values are a regression."""
    if task != "auto":
        return task, f"data.task={task}"
    if not np.issubdtype(y.dtype, np.integer):
        return "regression", "float targets"
    distinct = len(np.unique(y))
    if distinct > MAX_CLASSES or distinct > len(y) / 10:
        return "regression", (
            f"whole-number targets, but {distinct} distinct values in {len(y)} rows are too "
            "many for classes; data.task=classification to override"
        )
    return (
        "classification",
        f"whole-number targets: {distinct} classes; data.task=regression to override",
    )


def read_source(cfg: DictConfig, arrays=None) -> tuple[np.ndarray, np.ndarray, str, int, str]:
    """The source `cfg` names (or `arrays`, the (x, y) a data=custom function returned),
    whole and checked: (x, y, task, output units, why that task)."""
    x, y = _SOURCES[cfg.name](cfg) if arrays is None else arrays
    try:
        x, y = np.asarray(x), np.asarray(y)
    except ValueError as e:  # ragged lists
        raise UserError(f"data: x and y must be arrays of equal-shaped rows ({e})") from None
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise UserError(f"data: x and y must be numeric; got x {x.dtype}, y {y.dtype}")
    if x.ndim < 1 or len(x) != len(y):
        raise UserError(f"data: x has {len(x)} rows but y has {len(y)}; they must match")
    task, why = choose_task(cfg.task, y)
    x = np.asarray(x, dtype=np.float32)
    if task == "classification":
        y = np.asarray(y).reshape(-1)
        if not np.all(y == np.round(y)) or y.min() < 0:
            raise UserError("data.task: classification needs integer class labels 0..K-1 in y")
        y = y.astype(np.int32)
        return x, y, task, int(y.max()) + 1, why
    y = np.asarray(y, dtype=np.float32)
    y = y.reshape(len(y), -1)
    return x, y, task, y.shape[1], why


def load_data(cfg: DictConfig):
    """The dataset that `cfg` (the `data` group) names: `Data` in memory, split
    train/validation, or sharded records streamed from disk (trainer/data/records.py)."""
    if cfg.name == "records":
        return open_records(cfg)
    arrays = None
    if cfg.name == "custom":  # the user's function: arrays, or a source read on demand
        arrays = user_source.call_custom(cfg)
        if isinstance(arrays, user_source.SourceData):
            return arrays
    x, y, task, output_units, why = read_source(cfg, arrays)
    val, train = split_ids(len(x), cfg.val_fraction)
    if len(train) < cfg.batch_size:
        raise UserError(
            f"data.batch_size: received {cfg.batch_size}; the training split has only "
            f"{len(train)} examples (allowed: 1..{len(train)})"
        )
    return Data(x[train], y[train], x[val], y[val], task, output_units, train, val, why)
