"""What a run reports: TensorBoard event files and metrics.jsonl, and their clean-up on resume.

After a SIGKILL, the steps between the last checkpoint and the kill were already logged and
will be logged again by the resumed run. TensorBoard keeps both copies for TF2 writers, so on
resume both logs are cut back to the restored step first: one curve per tag.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import threading
import time

import tensorflow as tf
from tensorboard.compat.proto import event_pb2

from trainer.runinfo import METRICS_FILE, last_records, read_metrics  # noqa: F401 (re-exported)
from trainer.tfcall import flat_caller

_TMP_SUFFIX = ".truncating"


class MetricsLog:
    """Append-only JSON lines: one object per logged train step, plus eval records."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def fsync(self) -> None:
        """The lines written so far (line-buffered: already handed to the OS) to disk; safe to
        call from another thread while the loop keeps writing."""
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def truncate_metrics(run_dir: str, max_step: int) -> int:
    """Keep only records with step <= max_step; return how many were dropped."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    records = read_metrics(run_dir)
    kept = [r for r in records if r.get("step", 0) <= max_step]
    tmp = path + _TMP_SUFFIX
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(records) - len(kept)


def _event_files(logdir: str) -> list[str]:
    return sorted(
        p
        for p in glob.glob(os.path.join(glob.escape(logdir), "**", "*tfevents*"), recursive=True)
        if not p.endswith(_TMP_SUFFIX)
    )


def _read_records(path: str) -> tuple[list[bytes], bool]:
    """The records of a TFRecord file up to the first torn one; (records, torn?).

    A SIGKILL while the writer flushes leaves a half-written last record, which
    TFRecordDataset reports as DataLossError after yielding every complete record.
    """
    records = []
    try:
        for record in tf.data.TFRecordDataset(path):
            records.append(record.numpy())
    except tf.errors.DataLossError:
        return records, True
    return records, False


def _keep(event, max_step: int) -> bool:
    return event.step <= max_step or event.HasField("file_version")


def truncate_events(logdir: str, max_step: int) -> int:
    """Rewrite every event file under `logdir` without events past `max_step`.

    A file is rewritten to `<name>.truncating` (not read by TensorBoard), the original is
    removed, then the copy is renamed into place; a copy left by a crash is finished first.
    A torn last record (a kill during a flush) is dropped too. Returns the number of
    events dropped.
    """
    for tmp in glob.glob(
        os.path.join(glob.escape(logdir), "**", "*" + _TMP_SUFFIX), recursive=True
    ):
        if os.path.exists(tmp[: -len(_TMP_SUFFIX)]):
            os.remove(tmp)  # the copy was never finished (kill, full disk): the original is intact
        else:
            os.replace(tmp, tmp[: -len(_TMP_SUFFIX)])
    dropped = 0
    for path in _event_files(logdir):
        records, torn = _read_records(path)
        kept = [r for r in records if _keep(event_pb2.Event.FromString(r), max_step)]
        n = len(records) + int(torn)  # a torn last record counts as dropped
        if len(kept) == n:
            continue
        dropped += n - len(kept)
        tmp = path + _TMP_SUFFIX
        with tf.io.TFRecordWriter(tmp) as w:
            for rec in kept:
                w.write(rec)
        os.remove(path)
        os.replace(tmp, path)
    return dropped


def read_scalars(logdir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of scalar `tag` in the event files directly under `logdir`, in file order."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util

    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(logdir), "*tfevents*"))):
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    out.append((event.step, float(tensor_util.make_ndarray(value.tensor))))
    return out


def _scalar_rows_fn(writer, tags: tuple[str, ...]):
    """fn(steps [n], values [n, len(tags)]): the events tf.summary.scalar(tag, v, step) writes."""
    from tensorboard.plugins.scalar import metadata

    md = metadata.create_summary_metadata(display_name=None, description=None)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([None, len(tags)], tf.float32),
        ]
    )
    def fn(steps, values):
        with writer.as_default():
            for i in tf.range(tf.shape(steps)[0]):
                for j, tag in enumerate(tags):  # summary.write: the tag as is, no name scope
                    tf.summary.write(tag, values[i, j], step=steps[i], metadata=md)

    return fn


class Writers:
    """TensorBoard writers for `<run>/tensorboard/train` and `eval`."""

    def __init__(self, run_dir: str):
        self.root = root = os.path.join(run_dir, "tensorboard")
        self.train = tf.summary.create_file_writer(os.path.join(root, "train"))
        self.eval = tf.summary.create_file_writer(os.path.join(root, "eval"))
        # Scalars are queued and written in batches, one tf.function call per batch: eager
        # tf.summary.scalar calls were the largest cost of a logged step (BENCHMARKS.md).
        # TF's writer buffers events for up to 2 minutes anyway; flush() writes everything.
        self._fns = {}  # (writer, tags) -> tf.function writing rows of those scalars
        self._queue: list[tuple[object, int, dict]] = []
        self._lock = threading.Lock()  # flush() may run on the checkpoint writer's thread
        self._drain_lock = threading.Lock()
        self._drained = time.monotonic()

    def scalars(self, writer, step: int, values: dict[str, float]) -> None:
        key = (id(writer), tuple(values))
        if key not in self._fns:  # traced and run once (no rows) here, on the loop thread: the
            # first call, on the checkpoint writer's thread, stalled the loop (BENCHMARKS.md)
            empty = tf.zeros([0], tf.int64), tf.zeros([0, len(values)], tf.float32)
            fn = self._fns[key] = flat_caller(_scalar_rows_fn(writer, key[1]), *empty)
            fn(*empty)
        with self._lock:
            self._queue.append((writer, step, values))
            due = len(self._queue) >= 200 or time.monotonic() - self._drained > 5.0
        if due:
            self.drain()

    def drain(self) -> None:
        """Hand the queued scalars to TensorFlow's writers (any thread: nothing is traced here)."""
        with self._drain_lock:  # one drain at a time: events stay in step order
            with self._lock:
                queue, self._queue, self._drained = self._queue, [], time.monotonic()
            self._write_rows(queue)

    def _write_rows(self, queue: list) -> None:
        for (_, tags), rows in itertools.groupby(queue, key=lambda r: (id(r[0]), tuple(r[2]))):
            rows = list(rows)
            fn = self._fns[(id(rows[0][0]), tags)]
            fn(
                tf.constant([r[1] for r in rows], tf.int64),
                tf.constant([[float(v) for v in r[2].values()] for r in rows], tf.float32),
            )

    def hparams(self, hparams: dict, metrics: list[tuple[str, str]] | None = None) -> None:
        """The run's hyperparameters, in `<run>/tensorboard/`: the HPARAMS tab's session, whose
        `train/` and `eval/` runs hold its metrics. `metrics`, (group, tag) pairs such as
        ("eval", "loss"), also declares the experiment: the tab's metric columns. A sweep's
        jobs pass None: TensorBoard takes one experiment per logdir, and the sweep declares
        one for all its jobs (trainer/sweep_report.py)."""
        from tensorboard.plugins.hparams import api as hp

        writer = tf.summary.create_file_writer(self.root)
        with writer.as_default(step=0):
            if metrics is not None:
                hp.hparams_config(
                    hparams=[hp.HParam(name) for name in sorted(hparams)],
                    metrics=[hp.Metric(t, group=g, display_name=f"{g} {t}") for g, t in metrics],
                )
            hp.hparams(hparams)
        writer.close()

    def flush(self) -> None:
        self.drain()
        self.flush_files()

    def flush_files(self) -> None:
        """What the writers hold to their files, without draining the queue (any thread)."""
        self.train.flush()
        self.eval.flush()

    def close(self) -> None:
        self.drain()
        self.train.close()
        self.eval.close()
