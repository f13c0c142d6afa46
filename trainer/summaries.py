"""What a run reports as it trains: TensorBoard event files and metrics.jsonl. Cutting them
back on resume and reading them: trainer/rewind.py."""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import sys
import threading
import time

import tensorflow as tf
from tensorboard.compat.proto import event_pb2, types_pb2

from trainer.sweep.runinfo import METRICS_FILE, last_records, read_metrics  # noqa: F401 (re-exported)


class MetricsLog:
    """Append-only JSON lines: one object per logged train step, plus eval records.

    Each line is one unbuffered write. A write the disk refuses is retried once, after the
    file is cut back to the end of the last whole line (nothing is written twice), with a
    warning; a second failure stops the run with the path and the error (README, "Faults")."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._f = open(self.path, "ab", buffering=0)
        self._end = self._f.seek(0, os.SEEK_END)

    def write(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        try:
            self._append(line)
        except OSError as e:
            print(
                f"warning: could not write {self.path} ({e.strerror}); retrying the line once",
                file=sys.stderr,
            )
            self._f.truncate(self._end)
            self._append(line)

    def _append(self, line: bytes) -> None:
        view, done = memoryview(line), 0
        try:
            while done < len(line):  # a short write (a disk filling up): write the rest
                n = self._f.write(view[done:])
                if not n:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                done += n
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None
        self._end += done

    def sync(self) -> None:
        self.fsync()

    def fsync(self) -> None:
        """The lines written so far (each already handed to the OS) to disk; safe to call from
        another thread while the loop keeps writing. A failed fsync is never retried."""
        try:
            os.fsync(self._f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None

    def close(self) -> None:
        self._f.close()


class EventFile:
    """A TensorBoard event file of scalars, written without tf.summary: a TFRecord file of
    Event protos, as TensorFlow's summary writer writes, but one Event per logged row
    holding all of that row's scalars (TensorBoard reads every value of an event).

    Each row fills a prebuilt Event (one per set of tags) in place and hands its bytes to a
    TFRecord writer: ~6 us per row of 7 scalars, against ~36 us per row plus ~0.4 ms per
    batch for the rows written by a tf.function of tf.summary.write calls (measured;
    BENCHMARKS.md, section 10). `flush()` hands the file's buffer to the OS (a killed
    process loses nothing flushed; like tf.summary's writer it does not fsync). One thread
    at a time: Writers serializes the calls."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
            f"{next(_FILE_IDS):06d}.v2"  # tf.summary's naming, but "000010" sorts after "000009"
        )
        self.path = os.path.join(logdir, name)
        self._records = tf.io.TFRecordWriter(self.path)
        header = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        self._records.write(header.SerializeToString())
        self._records.flush()
        self._rows: dict[tuple[str, ...], event_pb2.Event] = {}  # tags -> the Event to fill

    def write(self, step: int, wall_time: float, tags: tuple[str, ...], values) -> None:
        event = self._rows.get(tags)
        if event is None:
            event = self._rows[tags] = _scalars_event(tags)
        event.step, event.wall_time = step, wall_time
        for slot, value in zip(event.summary.value, values, strict=True):
            slot.tensor.float_val[0] = value  # a float32, as tf.summary.scalar stores it
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


_FILE_IDS = itertools.count()


def _scalars_event(tags: tuple[str, ...]) -> event_pb2.Event:
    """An Event with one float32 scalar per tag, each marked for TensorBoard's scalars plugin
    (the metadata tf.summary.scalar writes)."""
    from tensorboard.plugins.scalar import metadata

    md = metadata.create_summary_metadata(display_name=None, description=None)
    event = event_pb2.Event()
    for tag in tags:
        value = event.summary.value.add(tag=tag, metadata=md)
        value.tensor.dtype = types_pb2.DT_FLOAT
        value.tensor.float_val.append(0.0)
    return event


class Writers:
    """TensorBoard event files for `<run>/tensorboard/train` and `eval` (EventFile).

    Scalars are queued and written in batches: at 200 rows, after 5 s, or at flush() (the
    loop flushes before every checkpoint counts, on the async writer's thread). Any thread
    may call any method."""

    def __init__(self, run_dir: str):
        self.root = root = os.path.join(run_dir, "tensorboard")
        self.train = EventFile(os.path.join(root, "train"))
        self.eval = EventFile(os.path.join(root, "eval"))
        self._queue: list[tuple[EventFile, int, float, dict]] = []
        self._lock = threading.Lock()  # the queue
        self._drain_lock = threading.Lock()  # the files: one drain or flush at a time, in order
        self._drained = time.monotonic()

    def scalars(self, writer: EventFile, step: int, values: dict[str, float]) -> None:
        with self._lock:
            self._queue.append((writer, step, time.time(), values))
            due = len(self._queue) >= 200 or time.monotonic() - self._drained > 5.0
        if due:
            self.drain()

    def drain(self) -> None:
        """Write the queued scalars to their files and hand those to the OS (a live TensorBoard
        sees them; the disk, only once the OS writes them back)."""
        with self._drain_lock:
            with self._lock:
                queue, self._queue, self._drained = self._queue, [], time.monotonic()
            for writer, step, wall_time, values in queue:
                writer.write(step, wall_time, tuple(values), [float(v) for v in values.values()])
            for writer in {entry[0] for entry in queue}:  # to the OS: TensorBoard shows them
                writer.flush()

    def hparams(self, hparams: dict, metrics: list[tuple[str, str]] | None = None) -> None:
        """The run's hyperparameters, in `<run>/tensorboard/`: the HPARAMS tab's session, whose
        `train/` and `eval/` runs hold its metrics. `metrics`, (group, tag) pairs such as
        ("eval", "loss"), also declares the experiment: the tab's metric columns. A sweep's
        jobs pass None: TensorBoard takes one experiment per logdir, and the sweep declares
        one for all its jobs (trainer/sweep/report.py)."""
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
        """Every queued row written and handed to the OS: a drain (which flushes each file it
        writes; the files hold nothing else: their header is flushed when they are made)."""
        self.drain()

    def close(self) -> None:
        self.drain()
        with self._drain_lock:
            self.train.close()
            self.eval.close()
