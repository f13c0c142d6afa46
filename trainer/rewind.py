"""Rewinding a run's logs to the step it resumes from, and reading them back.

After a SIGKILL, the steps between the last checkpoint and the kill were already logged and
will be logged again by the resumed run. TensorBoard keeps both copies for TF2 writers, so on
resume both logs are cut back to the restored step first: one curve per tag. Nothing that
cannot be parsed is deleted: metrics.jsonl's unparsable lines are moved aside, and a damaged
event record drops that record only (README, "Faults")."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import tensorflow as tf
from tensorboard.compat.proto import event_pb2

from trainer.checkpoint.files import append_durably, masked_crc32c, write_bytes_atomic
from trainer.sweep.runinfo import METRICS_FILE

_TMP_SUFFIX = ".truncating"


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
    append_durably(
        aside, b"".join(line if line.endswith(b"\n") else line + b"\n" for _, line in lines)
    )
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
    """The intact records of a TFRecord file and how many damaged ones were dropped: read by
    TensorFlow's reader (C++), and only when it meets damage before the end, again frame by
    frame (`_reframe`) so that the records after the damage are kept too."""
    records = []
    try:
        for record in tf.data.TFRecordDataset(path):
            records.append(record.numpy())
    except tf.errors.DataLossError:
        kept, damaged = _reframe(path)
        if len(kept) == len(records):  # only the last record was torn (a kill mid-flush)
            return records, 1
        return kept, damaged
    return records, 0


def _reframe(path: str) -> tuple[list[bytes], int]:
    """Every record of a TFRecord file whose frame holds, and how many were dropped.

    Each record is framed as length (8 bytes), the length's masked CRC32C, data, the data's
    masked CRC32C. A record whose data fails its CRC is skipped by its length; a damaged
    length is skipped by searching forward for the next frame whose two CRCs hold; a torn
    last record (a SIGKILL during a flush) is dropped. Every other record is kept.
    """
    with open(path, "rb") as f:
        blob = f.read()
    records, damaged, pos = [], 0, 0

    def frame_at(at: int) -> int | None:  # the record's data length, if the frame holds
        if at + 16 > len(blob):
            return None
        (length,) = struct.unpack_from("<Q", blob, at)
        (crc,) = struct.unpack_from("<I", blob, at + 8)
        if at + 16 + length > len(blob) or masked_crc32c(blob[at : at + 8]) != crc:
            return None  # the cheap test first: a search tries every offset
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
