"""What a run reports: TensorBoard event files and metrics.jsonl, and their clean-up on resume.

After a SIGKILL, the steps between the last checkpoint and the kill were already logged and
will be logged again by the resumed run. TensorBoard keeps both copies for TF2 writers, so on
resume both logs are cut back to the restored step first: one curve per tag.
"""

from __future__ import annotations

import errno
import glob
import itertools
import json
import os
import socket
import struct
import sys
import threading
import time

import tensorflow as tf
from tensorboard.compat.proto import event_pb2, types_pb2

from trainer.checkpoint.files import write_bytes_atomic
from trainer.runinfo import METRICS_FILE, last_records, read_metrics  # noqa: F401 (re-exported)

_TMP_SUFFIX = ".truncating"


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


def truncate_metrics(run_dir: str, max_step: int) -> int:
    """Keep only records with step <= max_step; return how many were dropped. A line that does
    not parse (damaged, or torn by a kill) is never deleted: it is appended to
    `metrics.jsonl.unparsed` and named in a warning."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    kept, dropped, unparsed = [], 0, []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                unparsed.append((number, line))
                continue
            if record.get("step", 0) <= max_step:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
            else:
                dropped += 1
    if unparsed:
        _set_aside(path, unparsed)
    write_bytes_atomic(path, b"".join(kept))
    return dropped


def _set_aside(path: str, lines: list[tuple[int, bytes]]) -> None:
    aside = path + ".unparsed"
    with open(aside, "ab") as f:
        for _, line in lines:
            f.write(line if line.endswith(b"\n") else line + b"\n")
        f.flush()
        os.fsync(f.fileno())
    numbers = ", ".join(str(n) for n, _ in lines[:10]) + (" ..." if len(lines) > 10 else "")
    print(
        f"warning: {path}: {len(lines)} line(s) that do not parse as JSON (line {numbers}) "
        f"moved to {aside}",
        file=sys.stderr,
    )


def _event_files(logdir: str) -> list[str]:
    return sorted(
        p
        for p in glob.glob(os.path.join(glob.escape(logdir), "**", "*tfevents*"), recursive=True)
        if not p.endswith(_TMP_SUFFIX)
    )


def _read_records(path: str) -> tuple[list[bytes], int]:
    """The intact records of a TFRecord file and how many damaged ones were dropped.

    Each record is framed as length (8 bytes), the length's masked CRC32C, data, the data's
    masked CRC32C. A record whose data fails its CRC is skipped by its length; a damaged
    length is skipped by searching forward for the next frame whose two CRCs hold; a torn
    last record (a SIGKILL during a flush) is dropped. Every other record is kept.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    with open(path, "rb") as f:
        blob = f.read()
    records, damaged, pos = [], 0, 0

    def frame_at(at: int) -> int | None:  # the record's data length, if the frame holds
        if at + 16 > len(blob):
            return None
        (length,) = struct.unpack_from("<Q", blob, at)
        (crc,) = struct.unpack_from("<I", blob, at + 8)
        if masked_crc32c(blob[at : at + 8]) != crc or at + 16 + length > len(blob):
            return None
        return length

    while pos < len(blob):
        length = frame_at(pos)
        if length is not None:
            data = blob[pos + 12 : pos + 12 + length]
            (crc,) = struct.unpack_from("<I", blob, pos + 12 + length)
            if masked_crc32c(data) == crc:
                records.append(data)
            else:
                damaged += 1
            pos += 16 + length
            continue
        damaged += 1  # a damaged frame: resume at the next one that holds
        pos = next(
            (at for at in range(pos + 1, len(blob)) if _holds(blob, at, frame_at)), len(blob)
        )
    return records, damaged


def _holds(blob: bytes, at: int, frame_at) -> bool:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    length = frame_at(at)
    if length is None:
        return False
    (crc,) = struct.unpack_from("<I", blob, at + 12 + length)
    return masked_crc32c(blob[at + 12 : at + 12 + length]) == crc


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
        records, damaged = _read_records(path)
        if damaged:
            print(
                f"warning: {path}: {damaged} damaged or torn record(s) dropped, every other event kept",
                file=sys.stderr,
            )
        kept = [r for r in records if _keep(event_pb2.Event.FromString(r), max_step)]
        n = len(records) + damaged  # a damaged or torn record counts as dropped
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
        """Every queued row written and handed to the OS: a drain (which flushes each file it
        writes; the files hold nothing else: their header is flushed when they are made)."""
        self.drain()

    def close(self) -> None:
        self.drain()
        with self._drain_lock:
            self.train.close()
            self.eval.close()
