"""Checkpoints on disk: tf.train.CheckpointManager plus a manifest per checkpoint.

A checkpoint `<run>/checkpoints/ckpt-<step>` counts as good only when its manifest
`ckpt-<step>.manifest.json` exists and every file it lists has the recorded size and
SHA-256. The manifest is written (atomically) after TensorFlow has finished writing the
checkpoint, so a crash at any moment leaves either a good checkpoint or one that is
reported and skipped on resume.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import tensorflow as tf

from trainer.async_save import AsyncCheckpointWriter
from trainer.config import UserError

MANIFEST_SUFFIX = ".manifest.json"
_CKPT_RE = re.compile(r"ckpt-(\d+)$")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to `path` via a temporary file, fsync and rename: never a torn file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_files(prefix: str) -> list[str]:
    """The files TensorFlow wrote for checkpoint `prefix` (index + data shards)."""
    return sorted(
        glob.glob(glob.escape(prefix) + ".index") + glob.glob(glob.escape(prefix) + ".data-*")
    )


def step_of(prefix: str) -> int:
    m = _CKPT_RE.search(prefix)
    return int(m.group(1)) if m else -1


@dataclass
class Verdict:
    prefix: str
    step: int
    ok: bool
    reason: str = ""


def verify(prefix: str, hashes: bool = True) -> Verdict:
    """Check one checkpoint against its manifest: which file is wrong and how (sizes only
    when `hashes` is False)."""
    step = step_of(prefix)
    mpath = prefix + MANIFEST_SUFFIX
    if not os.path.exists(mpath):
        return Verdict(
            prefix, step, False, f"{os.path.basename(mpath)} missing: the write never completed"
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        return Verdict(prefix, step, False, f"{os.path.basename(mpath)} unreadable ({e})")
    directory = os.path.dirname(prefix)
    for name, meta in files.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            return Verdict(prefix, step, False, f"{name} is missing")
        size = os.path.getsize(path)
        if size != meta["size"]:
            return Verdict(
                prefix,
                step,
                False,
                f"{name} has {size} bytes, the manifest says {meta['size']} (truncated?)",
            )
        if hashes and sha256_file(path) != meta["sha256"]:
            return Verdict(
                prefix, step, False, f"{name} checksum differs from the manifest (corrupted)"
            )
    return Verdict(prefix, step, True)


def list_checkpoints(directory: str) -> list[str]:
    """Every checkpoint prefix in `directory`, oldest first (from the files, not the state file)."""
    prefixes = {
        p[: -len(".index")] for p in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index"))
    }
    prefixes |= {
        p[: -len(MANIFEST_SUFFIX)]
        for p in glob.glob(os.path.join(glob.escape(directory), "ckpt-*" + MANIFEST_SUFFIX))
    }
    return sorted(prefixes, key=step_of)


class CheckpointStore:
    """CheckpointManager with manifests, verification and a good-only `latest`."""

    def __init__(
        self,
        directory: str,
        checkpoint: tf.train.Checkpoint,
        *,
        max_to_keep: int,
        keep_every_n_hours: float | None,
        manifest_extra: dict,
        write: bool = True,
        async_write: bool = False,
    ):
        self.directory = directory
        self.checkpoint = checkpoint
        self.manifest_extra = manifest_extra
        # checkpoint.async: snapshot in save(), write on a background thread (async_save.py)
        self.async_writer = AsyncCheckpointWriter(checkpoint) if async_write else None
        self.manager = (
            tf.train.CheckpointManager(
                checkpoint,
                directory,
                max_to_keep=max_to_keep,
                keep_checkpoint_every_n_hours=keep_every_n_hours,
                checkpoint_name="ckpt",
            )
            if write
            else None
        )

    def has_checkpoints(self) -> bool:
        return bool(list_checkpoints(self.directory))

    def latest_good(self, report=sys.stderr) -> Verdict | None:
        """The newest checkpoint that verifies; bad newer ones are reported on `report`.

        Raises UserError when checkpoints exist but none verifies (nothing is deleted).
        """
        prefixes = list_checkpoints(self.directory)
        bad = []
        for prefix in reversed(prefixes):
            verdict = verify(prefix)
            if verdict.ok:
                for b in bad:
                    print(
                        f"checkpoint {os.path.basename(b.prefix)} skipped: {b.reason}", file=report
                    )
                return verdict
            bad.append(verdict)
        if bad:
            details = "; ".join(f"{os.path.basename(b.prefix)}: {b.reason}" for b in bad)
            raise UserError(
                f"checkpoints: no checkpoint in {self.directory} verifies ({details}). "
                "Nothing was deleted; move the directory aside to start over."
            )
        return None

    def restore(self, prefix: str) -> None:
        self.checkpoint.restore(prefix).assert_existing_objects_matched()

    def save(self, step: int, before_write=None) -> float:
        """Write checkpoint `ckpt-<step>` and then its manifest; return the seconds it blocked.

        `before_write()` runs first (the loop syncs its logs). With async writes the state is
        snapshotted here and both run on the writer's thread; `wait()` waits for the last write.
        """
        t0 = time.perf_counter()
        if self.async_writer is not None:
            self.async_writer.submit(step, lambda s: self._write(s, before_write))
        else:
            self._write(step, before_write)
        return time.perf_counter() - t0

    def wait(self) -> None:
        """Return once no checkpoint write is in flight (raises a failed background write)."""
        if self.async_writer is not None:
            self.async_writer.wait()

    def pending_writes(self):
        """A context manager that, on exit, waits for the last background write."""
        return self.async_writer.pending() if self.async_writer else contextlib.nullcontext()

    def _write(self, step: int, before_write=None) -> None:
        if before_write is not None:
            before_write()
        # The manifest is written in a write callback: CheckpointManager runs it after the
        # files are complete and *before* its retention sweep, so an older checkpoint is only
        # deleted once the new one has a manifest (a failed save deletes nothing).
        write_manifest = lambda prefix: self.write_manifest(prefix, step)  # noqa: E731
        options = tf.train.CheckpointOptions(experimental_write_callbacks=[write_manifest])
        self.manager.save(checkpoint_number=step, options=options)
        self._sweep_manifests()

    def write_manifest(self, prefix: str, step: int) -> None:
        files = {}
        for path in checkpoint_files(prefix):
            files[os.path.basename(path)] = {
                "size": os.path.getsize(path),
                "sha256": sha256_file(path),
            }
        write_json_atomic(
            prefix + MANIFEST_SUFFIX,
            {
                "step": step,
                "time": time.time(),
                "files": files,
                **self.manifest_extra,
            },
        )
        verdict = verify(prefix, hashes=False)  # sizes re-read from disk: a cheap read-back
        if not verdict.ok:
            os.remove(prefix + MANIFEST_SUFFIX)  # not a good checkpoint: leave it "incomplete"
            raise OSError(f"{prefix} failed verification right after writing: {verdict.reason}")

    def _sweep_manifests(self) -> None:
        """Drop manifests whose checkpoint the manager's retention has deleted."""
        for mpath in glob.glob(
            os.path.join(glob.escape(self.directory), "ckpt-*" + MANIFEST_SUFFIX)
        ):
            if not os.path.exists(mpath[: -len(MANIFEST_SUFFIX)] + ".index"):
                os.remove(mpath)
