"""The user's own data (`data=custom`): a function by `_target_` that returns arrays or a
random-access source.

`data._target_` names a function (or a class); every key of the `data` group but its own
(`GROUP_KEYS`) is an argument of it. It returns either arrays `(x, y)`, which trainer/data/memory.py
treats like an .npz file, or a source: an object with `__len__` and `__getitem__(i) -> (x, y)`
(files on disk, a database, an API), which `SourceData` reads on demand and never whole.

A source streams in the same order as data in memory: the training rows are the fixed split
of `split_ids`, each epoch a seeded permutation of them (`batch_positions`), so the data
position is the step and a resume at any step sees the same batches. Rows are read ahead of
the loop (tf.data prefetch), 8 batches at a time spread over `data.workers` threads: a
source that waits on I/O releases the GIL while it waits. A row that raises, or whose shape differs
from row 0's, stops the run with the row's index and the user's message (UserError, exit 2).
"""

from __future__ import annotations

import atexit
import queue
import re
import threading
import time
from concurrent.futures import Future

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from trainer import targets
from trainer.config import UserError
from trainer.data.batch_ids import batch_positions, id_terms, split_ids

# the `data` group's own keys; every other key is an argument of `data._target_`
GROUP_KEYS = ("name", "_target_", "task", "batch_size", "val_fraction", "workers", "standardize")
# a failed row's line inside the error tf.data raises (diagnose): up to the end of that line
_ROW_FAILURE = re.compile(r"(data: (?:reading )?row \d+ of [^\n]*)")
_GROUP = 8  # training batches read per call: their rows are spread over the threads
_IN_FLIGHT = 4  # such calls at once
_SOURCE_HELP = (
    "allowed: arrays (x, y), or a random-access source with __len__ and __getitem__(i) -> (x, y)"
)


def call_custom(cfg: DictConfig):
    """Call `data._target_` with the group's other keys: arrays `(x, y)`, or a SourceData."""
    path = cfg._target_
    fn = targets.import_target("data._target_", path)
    if not callable(fn):
        raise UserError(
            f"data._target_: received {path!r}, {targets.kind(fn)}; allowed: a function "
            "(or class) returning arrays (x, y) or a random-access source"
        )
    kwargs = targets.arguments(cfg, GROUP_KEYS)
    targets.check_arguments("data", fn, kwargs)
    try:
        out = fn(**kwargs)
    except UserError:
        raise
    except Exception as e:  # the user's code: its own message, one line
        raise UserError(
            f"data._target_: {path}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
            f"raised {type(e).__name__}: {e}"
        ) from None
    if isinstance(out, tuple) and len(out) == 2:
        return out
    return SourceData.open(out, cfg)


class SourceData:
    """A random-access source behind the interface of trainer/data/memory.py's `Data`."""

    opened = False  # one was opened in this process (trainer/__main__.py ends it early)

    def __init__(self, source, cfg: DictConfig, x0: np.ndarray, y0: np.ndarray, task: str):
        self.source, self.name = source, str(cfg._target_)
        self.workers = int(cfg.get("workers", 16))
        self.task = task
        self.x_shape, self.y0_shape = x0.shape, y0.shape
        if task == "classification":
            self.y_shape, self.y_dtype = (), np.int32
            self.output_units = int(source.num_classes)
        else:
            self.y_shape, self.y_dtype = (y0.size,), np.float32
            self.output_units = int(y0.size)
        self.y_size = max(1, int(np.prod(self.y_shape)))
        self.rows = len(source)
        val, train = split_ids(self.rows, float(cfg.val_fraction))
        self.train_ids, self.val_ids = train.astype(np.int64), val.astype(np.int64)
        self._lock = threading.Lock()
        self._executor: _Readers | None = None
        self._closed, self._active = False, 0  # reads refused / reads in flight
        self._failure: UserError | None = None  # the bad row that ended the reads
        atexit.register(self.close)
        SourceData.opened = True

    @classmethod
    def open(cls, source, cfg: DictConfig) -> SourceData:
        """Check what `data._target_` returned and read its row 0 (shapes, task)."""
        path = cfg._target_
        for method in ("__len__", "__getitem__"):
            if not hasattr(type(source), method):
                raise UserError(
                    f"data._target_: {path} returned {targets.kind(source)}, which has no "
                    f"{method}; {_SOURCE_HELP}"
                )
        n = len(source)
        if n < 2:
            raise UserError(
                f"data._target_: {path} returned a source of {n} rows; allowed: 2 or more"
            )
        x0, y0 = _split_row(source, 0, path)
        task = cfg.task
        if task == "auto":
            task = "classification" if np.issubdtype(y0.dtype, np.integer) else "regression"
        why = "data.task" if cfg.task != "auto" else f"{y0.dtype} targets in row 0"
        if task == "classification":
            if y0.size != 1 or not isinstance(getattr(source, "num_classes", None), int):
                raise UserError(
                    f"data.task: {task} from a source needs one integer label per row and the "
                    f"source's num_classes attribute (an int); {path} has "
                    f"{'no num_classes' if y0.size == 1 else f'labels of shape {y0.shape}'}. "
                    "Add num_classes to the source, or set data.task=regression"
                )
        data = cls(source, cfg, x0.astype(np.float32), y0, task)
        data.task_reason = why
        if len(data.train_ids) < int(cfg.batch_size):
            raise UserError(
                f"data.batch_size: received {cfg.batch_size}; the training split has only "
                f"{len(data.train_ids)} examples (allowed: 1..{len(data.train_ids)})"
            )
        return data

    # ------------------------------------------------------------ the Data interface
    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_shape)

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.train_ids) // batch_size

    def sample(self, n: int) -> np.ndarray:
        return self.read(self.train_ids[:n])[0]

    def val_x(self, limit: int | None = None) -> np.ndarray:
        return self.read(self.val_ids[:limit])[0]

    def signature(self) -> dict:
        return {
            "feature_shape": list(self.feature_shape),
            "output_units": int(self.output_units),
            "task": self.task,
            "rows": int(self.rows),
        }

    def check_parts(self, parts: int) -> None:
        """Any number of input pipelines works: each reads its rows of the same global batch."""

    def diagnose(self, error: tf.errors.OpError) -> UserError | None:
        """The failed row's line, from the error the stream raised: tf.data raises the
        failure of the earliest batch in step order, whichever read failed first in time."""
        found = _ROW_FAILURE.search(error.message or "")
        return UserError(found.group(1)) if found else None

    def train_dataset(
        self, batch_size: int, seed: int, start_step: int, part: tuple[int, int] = (0, 1)
    ) -> tf.data.Dataset:
        """The endless training stream from batch number `start_step`: (x, y, id terms), as
        `Data.train_dataset`, with each batch's rows read from the source."""
        ids = tf.constant(self.train_ids)
        i, parts = part
        rows = batch_size // parts
        first = i * rows
        ds = batch_positions(len(self.train_ids), batch_size, seed, start_step)
        ds = ds.map(lambda pos: tf.gather(ids, pos[first : first + rows]))
        # _GROUP batches per read: more rows for the threads to share, fewer calls
        ds = ds.batch(_GROUP).map(
            lambda r: (*self._read_op(tf.reshape(r, [-1]), rows), r),
            num_parallel_calls=_IN_FLIGHT,
            deterministic=True,
        )
        ds = ds.unbatch().map(lambda x, y, r: (x, y, id_terms(r, first)))
        return ds.prefetch(2 * _GROUP)

    def eval_dataset(self, batch_size: int) -> tf.data.Dataset:
        """The validation rows in order, last batch possibly smaller: (x, y)."""
        return self.rows_dataset(self.val_ids, batch_size)

    def rows_dataset(self, ids: np.ndarray, batch_size: int) -> tf.data.Dataset:
        """Rows `ids` in order, `batch_size` at a time, read in parallel: (x, y)."""
        ds = tf.data.Dataset.from_tensor_slices(ids).batch(batch_size)
        return ds.map(self._read_op).prefetch(2)

    # ------------------------------------------------------------ reading rows
    def _read_op(self, rows: tf.Tensor, per_batch: int | None = None):
        """Read `rows` (a vector of ids) in a tf.data map; [groups, per_batch, ...] if given.
        (The map is sequential: tf.data runs a Python function one call at a time under op
        determinism, so `read` spreads each call's rows over threads itself.)"""
        # stateful=False: the rows of given ids are the same whenever they are read, so under
        # op determinism tf.data may still run several reads at once (in order)
        x, y = tf.numpy_function(
            self.read, [rows], [tf.float32, tf.as_dtype(self.y_dtype)], stateful=False
        )
        if per_batch is None:
            x.set_shape([None, *self.x_shape])
            y.set_shape([None, *self.y_shape])
            return x, y
        return tf.reshape(x, [-1, per_batch, *self.x_shape]), tf.reshape(
            y, [-1, per_batch, *self.y_shape]
        )

    def read(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Rows `ids` as (x [n, *feature_shape] float32, y), fetched by up to `data.workers`
        threads at once (each a contiguous slice), then stacked and checked against row 0.
        The threads only call `source[i]`: the less Python each holds the GIL for, the more
        reads that wait on I/O overlap."""
        with self._lock:
            if self._closed:  # the run is ending: the stream's prefetching stops here
                raise RuntimeError(f"data: {self.name} is closed")
            failed = self._failure
            self._active += 1
        try:
            rows = self._read(ids)
            if failed is not None:  # another group's row failed before this read started:
                raise UserError(str(failed))  # tf.data reports the error of the earliest
            return rows  # group in step order, this one's maybe: it names that row too
        except UserError as e:
            with self._lock:  # the first bad row: reads that start after it name it too
                self._failure = self._failure or e
            raise
        finally:
            with self._lock:
                self._active -= 1

    def close(self, timeout: float = 10.0) -> None:
        """No further reads; wait for those in flight. Run at exit (atexit), while the
        reader threads still run: a tf.data thread left inside a read when the interpreter
        stops would hold TensorFlow's teardown forever."""
        self._closed = True
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.005)

    def _read(self, ids) -> tuple[np.ndarray, np.ndarray]:
        ids = [int(i) for i in ids]
        rows: list = [None] * len(ids)
        parts = min(self.workers, len(ids))
        bounds = np.linspace(0, len(ids), parts + 1).astype(int).tolist()
        if parts <= 1:
            self._fetch(ids, 0, len(ids), rows)
        else:
            jobs = [
                self._pool().submit(self._fetch, ids, a, b, rows)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            for job in jobs:  # in row order: the first failing slice's first failing row
                job.result()
        try:
            xs = np.asarray([r[0] for r in rows], dtype=np.float32)
            ys = np.asarray([r[1] for r in rows], dtype=self.y_dtype)
            if xs.shape[1:] == self.x_shape and ys.size == len(ids) * self.y_size:
                return xs, ys.reshape((len(ids), *self.y_shape))
        except (TypeError, ValueError, IndexError, KeyError):
            pass
        raise self._first_bad_row(ids, rows)  # the slow path: find the row and say why

    def _pool(self) -> _Readers:
        with self._lock:
            if self._executor is None:
                self._executor = _Readers(self.workers)
            return self._executor

    def _fetch(self, ids: list[int], a: int, b: int, rows: list) -> None:
        get, j = self.source.__getitem__, a
        try:
            for j in range(a, b):
                rows[j] = get(ids[j])
        except Exception as e:  # the user's code: its message, with the row
            raise _read_failed(ids[j], self.name, e) from None

    def _first_bad_row(self, ids: list[int], rows: list) -> UserError:
        for i, row in zip(ids, rows, strict=True):
            try:
                x, y = _as_arrays(row, i, self.name)
            except UserError as e:
                return e
            if x.shape != self.x_shape or y.size != self.y_size:
                return UserError(
                    f"data: row {i} of {self.name} has x of shape {x.shape} and y of shape "
                    f"{y.shape}; row 0 has {self.x_shape} and {self.y0_shape}: every row must "
                    "have the same shapes"
                )
        return UserError(f"data: rows of {self.name} could not be stacked into a batch")


class _Readers:
    """A fixed set of daemon threads running reads: unlike a ThreadPoolExecutor's threads,
    which the interpreter joins at exit, they never keep a stopping process alive (a source
    whose reads hang, or a stream still prefetching when a bad row ended the run)."""

    def __init__(self, n: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        for k in range(n):
            threading.Thread(target=self._work, name=f"data-source-{k}", daemon=True).start()

    def submit(self, fn, *args) -> Future:
        job: Future = Future()
        self._jobs.put((job, fn, args))
        return job

    def _work(self) -> None:
        while True:
            job, fn, args = self._jobs.get()
            if job.set_running_or_notify_cancel():
                try:
                    job.set_result(fn(*args))
                except BaseException as e:  # handed to the reader that waits on it
                    job.set_exception(e)


def _split_row(source, i: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """source[i] as two arrays, the user's exception as one line naming the row."""
    try:
        row = source[i]
    except Exception as e:
        raise _read_failed(i, name, e) from None
    return _as_arrays(row, i, name)


def _read_failed(i: int, name: str, e: Exception) -> UserError:
    """The one line for a row whose read raised: the row and the user's own message."""
    return UserError(f"data: reading row {i} of {name} failed: {type(e).__name__}: {e}")


def _as_arrays(row, i: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(row, (tuple, list)) and len(row) == 2):
        raise UserError(f"data: row {i} of {name} is {targets.kind(row)}; allowed: a pair (x, y)")
    try:
        return np.asarray(row[0], dtype=np.float32), np.asarray(row[1])
    except (TypeError, ValueError) as e:
        raise UserError(f"data: row {i} of {name} is not numeric: {e}") from None
