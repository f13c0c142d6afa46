"""What a run reports: TensorBoard event files and metrics.jsonl, and their clean-up on resume.

After a SIGKILL, the steps between the last checkpoint and the kill were already logged and
will be logged again by the resumed run. TensorBoard keeps both copies for TF2 writers, so on
resume both logs are cut back to the restored step first: one curve per tag.
"""

from __future__ import annotations

import glob
import json
import os

import tensorflow as tf
from tensorboard.compat.proto import event_pb2

METRICS_FILE = "metrics.jsonl"
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

    def close(self) -> None:
        self._f.close()


def read_metrics(run_dir: str) -> list[dict]:
    """Every record of `<run>/metrics.jsonl` (a torn last line from a kill is skipped)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


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


def truncate_events(logdir: str, max_step: int) -> int:
    """Rewrite every event file under `logdir` without events past `max_step`.

    A file is rewritten to `<name>.truncating` (not read by TensorBoard), the original is
    removed, then the copy is renamed into place; a copy left by a crash is finished first.
    Returns the number of events dropped.
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
        kept, n = [], 0
        for record in tf.data.TFRecordDataset(path):
            n += 1
            event = event_pb2.Event.FromString(record.numpy())
            if event.step <= max_step or event.HasField("file_version"):
                kept.append(record.numpy())
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


class Writers:
    """TensorBoard writers for `<run>/tensorboard/train` and `eval`."""

    def __init__(self, run_dir: str):
        root = os.path.join(run_dir, "tensorboard")
        self.train = tf.summary.create_file_writer(os.path.join(root, "train"))
        self.eval = tf.summary.create_file_writer(os.path.join(root, "eval"))

    def scalars(self, writer, step: int, values: dict[str, float]) -> None:
        with writer.as_default(step=step):
            for tag, v in values.items():
                tf.summary.scalar(tag, v)

    def hparams(self, hparams: dict) -> None:
        from tensorboard.plugins.hparams import api as hp

        with self.train.as_default(step=0):
            hp.hparams(hparams)

    def flush(self) -> None:
        self.train.flush()
        self.eval.flush()

    def close(self) -> None:
        self.train.close()
        self.eval.close()
