"""Checkpoints on disk: tf.train.CheckpointManager plus a manifest per checkpoint.

A checkpoint `<run>/checkpoints/ckpt-<step>` counts as good only when its manifest
`ckpt-<step>.manifest.json` exists, every file it lists has the recorded size, and the
checksums hold. The manifest is written (atomically) after the checkpoint's files are complete
(TensorFlow's saver, or bundle.py for small states), so a crash at any moment leaves
either a good checkpoint or one that is reported and skipped on resume.

Checksums, without a second pass over the data at save time: the bundle writer (TensorFlow's,
or bundle.py in its format) computes a CRC32C of every tensor and stores it in the `.index`.
The manifest records the SHA-256 of that (small) index, which pins those CRCs, and the size
of every data file; `verify()` then reads every tensor back, and TensorFlow's reader checks
each one against its CRC32C (a flipped bit raises DataLossError). Hashing the data files
with SHA-256 as well doubled the save time of a 300 MB state (BENCHMARKS.md) for no extra
detection: a CRC32C catches every error burst up to 32 bits and all but 2^-32 of the rest.
Manifests written before this change carry a SHA-256 for every file; those are still checked.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence

import tensorflow as tf

from trainer import nonfinite
from trainer.checkpoint.async_save import AsyncCheckpointWriter, refuse_nonfinite
from trainer.checkpoint.files import fsync_path, manifest_files, sha256_file, write_text_atomic
from trainer.checkpoint.manager import Manager
from trainer.checkpoint.manifest import (
    MANIFEST_SUFFIX,
    Verdict,
    checkpoint_files,
    list_checkpoints,
    verify,
)
from trainer.config import UserError

TRASH_DIR = ".deleting"  # checkpoints/.deleting/: retention's deletions, finished in the background
DEFER_BYTES = 32 << 20  # retention deletes smaller checkpoints in place


def _empty_trash(trash: str) -> None:
    """Delete `checkpoints/.deleting/`; what cannot be deleted is named in a warning (the next
    run tries again; it is never read as a checkpoint)."""

    def warn(function, path, exc_info) -> None:
        print(
            f"warning: could not delete {path} ({exc_info[1]}); the next run tries again",
            file=sys.stderr,
        )

    shutil.rmtree(trash, onerror=warn)


def _files_on_disk(paths: list[str]) -> dict:
    """The manifest's `files` for checkpoint files TensorFlow wrote, read from the disk."""
    index = next(p for p in paths if p.endswith(".index"))
    return manifest_files(paths, [os.path.getsize(p) for p in paths], sha256_file(index))


class CheckpointStore:
    """CheckpointManager with manifests, verification and a good-only `latest`."""

    # Retention moves large checkpoints into checkpoints/.deleting/, which _write's deleter
    # thread empties (a store whose _write starts no deleter deletes in place instead).
    defers_deletes = True

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
        durable: bool = True,
        snapshot_sync: bool = False,
    ):
        self.directory = directory
        self.durable = durable  # checkpoint.durable: fsync files and directory (README)
        self.committed_step: int | None = None  # this run's newest checkpoint with a manifest
        self.checkpoint = checkpoint
        self.manifest_extra = manifest_extra
        # serialized once (later changes to manifest_extra are not seen): the manifest of every
        # save embeds it (with the whole config)
        self._extra_json = json.dumps(manifest_extra, sort_keys=True)
        if reserved := {"step", "time", "files", "data_checksums"} & manifest_extra.keys():
            raise ValueError(f"manifest_extra may not set {sorted(reserved)}")
        self._deleter: threading.Thread | None = None
        self._trash_seen = True  # checkpoints/.deleting/ may exist (_start_deleter looks)
        self.on_commit = None  # on_commit(prefix, step) after each commit (trainer/remote/)
        self._checks: dict = {}  # save()'s finiteness check, per list of checked variables
        # False until a save succeeds: the first save of a process (and the one after a
        # failed save) drops every stale manifest; retention drops the ones it retires
        self._manifests_clean = False
        # checkpoint.async: snapshot in save(), write on a background thread (async_save.py)
        self.async_writer = AsyncCheckpointWriter(checkpoint, durable) if async_write else None
        # snapshot_sync (one device): synchronous saves by the same snapshot and writer, on
        # this thread (AsyncCheckpointWriter.write_now): from the second save of a small state
        # the project's writer writes its files, where TensorFlow's eager save rebuilt its
        # saver in Python at every save (README, Performance)
        self._inline = (
            AsyncCheckpointWriter(checkpoint, durable, inline=True)
            if snapshot_sync and not async_write and write
            else None
        )
        self.manager = (
            Manager(
                checkpoint,
                directory,
                max_to_keep=max_to_keep,
                keep_checkpoint_every_n_hours=keep_every_n_hours,
                checkpoint_name="ckpt",
                retire=self._retire,
            )
            if write
            else None
        )
        if write:
            self._start_deleter()  # what a killed run left in checkpoints/.deleting/

    def busy(self) -> bool:
        """Is a save's background work (an async write, retention's deletes) still running?"""
        deleting = self._deleter is not None and self._deleter.is_alive()
        return deleting or (self.async_writer is not None and self.async_writer.in_flight())

    def has_checkpoints(self) -> bool:
        return bool(list_checkpoints(self.directory))

    def latest_good(self, report=None) -> Verdict | None:
        """The newest checkpoint that verifies; bad newer ones are reported on `report`.

        Raises UserError when checkpoints exist but none verifies (nothing is deleted).
        """
        report = report or sys.stderr  # looked up now: a sweep's job tees it
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
        for writer in (self.async_writer, self._inline):
            if writer is not None:
                writer.replan()
        self.checkpoint.restore(prefix).assert_existing_objects_matched()

    def save(
        self,
        step: int,
        before_write=None,
        assign: Sequence[tuple[tf.Variable, object]] = (),
        check: Sequence[tf.Variable] = (),
        on_nonfinite=None,
        blocked=None,
    ) -> float:
        """Write checkpoint `ckpt-<step>` and then its manifest; return the seconds it blocked.

        First the `assign` (variable, value) pairs are written into the checkpoint's variables
        (the loop's counters), and if a floating variable of `check` holds NaN or Inf,
        `on_nonfinite(those variables)` is called to raise the caller's error (a ValueError
        follows if it returns) and nothing is written.
        `before_write()` runs next (the loop syncs its logs). With async writes the
        assignments, the check and the snapshot are one call here and the rest runs on the
        writer's thread; `wait()` waits for the last write.

        `blocked(seconds)` is called on this thread with the time the save blocked it, as soon
        as that is known: after the write (sync), before the background write starts (async,
        so that what it logs is queued ahead of the write's `before_write`).
        """
        t0 = time.perf_counter()
        if self.async_writer is not None:
            self.async_writer.submit(
                step,
                lambda s: self._write(s, before_write),
                assign,
                check,
                on_nonfinite,
                before_start=blocked and (lambda: blocked(time.perf_counter() - t0)),
            )
            return time.perf_counter() - t0

        def write(s: int) -> None:  # (as the async path calls it)
            self._write(s, before_write)

        if self._inline is not None and not self._inline.write_now(
            step, write, assign, check, on_nonfinite
        ):
            self._inline = None  # (objects its snapshot cannot read: TensorFlow's save, for good)
        if self._inline is None:
            self._prepare(assign, check, on_nonfinite)
            write(step)
        seconds = time.perf_counter() - t0
        if blocked is not None:
            blocked(seconds)
        return seconds

    def _prepare(self, assign, check, on_nonfinite) -> None:
        """A synchronous save's assignments and finiteness check (see save())."""
        for var, value in assign:
            var.assign(value, read_value=False)
        if check:
            key = tuple(map(id, check))
            if key not in self._checks:
                self._checks = {key: nonfinite.nonfinite_variables(check)}  # one at a time
            if bad := self._checks[key]():
                if on_nonfinite is not None:
                    on_nonfinite(bad)
                refuse_nonfinite(bad)  # whatever on_nonfinite did: nothing is written

    def wait(self) -> None:
        """Return once no checkpoint write or deletion is in flight (raises a failed
        background write)."""
        if self.async_writer is not None:
            self.async_writer.wait()
        self._join_deleter()
        self._flush_state()

    @contextlib.contextmanager
    def pending_writes(self):
        """A context manager that, on exit, waits for the last background write and deletion
        (and, unless the block failed, brings the state file up to date: after a failure the
        next run's recover() rewrites it)."""
        failed = True
        try:
            with self.async_writer.pending() if self.async_writer else contextlib.nullcontext():
                yield self
            failed = False
        finally:
            self._join_deleter()
            if not failed:
                self._flush_state()

    def _flush_state(self) -> None:
        if self.manager is not None:
            try:
                self.manager.flush_state()
            except (OSError, tf.errors.OpError) as e:  # resume does not need it: say so, go on
                print(
                    f"warning: could not write {self.directory}/checkpoint ({e}); "
                    "TensorFlow's tools may not see the newest checkpoint until the next run",
                    file=sys.stderr,
                )

    def _write(self, step: int, before_write=None) -> None:
        self._join_deleter()
        if before_write is not None:
            before_write()
        try:
            self._manager_save(step)
        finally:
            self._start_deleter()
        if self.on_commit is not None:  # checkpoint.remote: queued for upload (never waited on)
            self.on_commit(os.path.join(self.directory, f"ckpt-{step}"), step)

    def _manager_save(self, step: int) -> None:
        # The manifest is written once the files are complete and *before* the manager's
        # retention sweep, so an older checkpoint is only deleted once the new one has a
        # manifest (a failed save deletes nothing). An async save's snapshot has already
        # incremented the save counter (checkpoint/snapshot.py).
        clean, self._manifests_clean = self._manifests_clean, False
        self.manager.save(
            step,
            written=lambda prefix: self.write_manifest(prefix, step),
            counted=self.async_writer is not None or self._inline is not None,
        )
        if not clean:
            self._sweep_manifests()
        self._manifests_clean = True

    def _retire(self, prefix: str) -> None:
        """Retention's delete of checkpoint `prefix`: its data, its index, then its manifest.

        Files of checkpoints of DEFER_BYTES or more are moved into `checkpoints/.deleting/`
        instead, and freed on a background thread (freeing the blocks was 50 ms of a 0.25 s
        save of a 300 MB state, profiled); a file that cannot be moved there (no room for the
        folder, say) is deleted in place. The data goes first: a kill midway leaves a small
        index and a manifest, which resume reports and sets aside, while the data already in
        the trash is freed when the next run starts.
        """
        paths = checkpoint_files(prefix)  # sorted: .data-* before .index
        trash = os.path.join(self.directory, TRASH_DIR)
        defer = self.defers_deletes and sum(os.path.getsize(p) for p in paths) >= DEFER_BYTES
        for path in paths:
            if defer:
                try:
                    os.makedirs(trash, exist_ok=True)
                    self._trash_seen = True
                    os.replace(path, os.path.join(trash, os.path.basename(path)))
                    continue
                except OSError as e:  # then deleted in place (if it still exists)
                    print(
                        f"warning: could not move {path} into {trash} ({e.strerror}); "
                        "deleting it in place",
                        file=sys.stderr,
                    )
                    defer = False
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(prefix + MANIFEST_SUFFIX)

    def _start_deleter(self) -> None:
        """Empty `checkpoints/.deleting/` (also what a killed run left there) on a thread."""
        trash = os.path.join(self.directory, TRASH_DIR)
        if not self._trash_seen:  # (an isdir per save: ~0.1 ms of the writer, profiled)
            return
        if os.path.isdir(trash):
            self._deleter = threading.Thread(target=_empty_trash, args=(trash,))
            self._deleter.start()  # not a daemon: the interpreter waits for it at exit
        else:  # emptied (the deleter removes the folder): looked at again once _retire uses it
            self._trash_seen = False

    def _join_deleter(self) -> None:
        if self._deleter is not None:
            self._deleter.join()
            self._deleter = None

    def write_manifest(self, prefix: str, step: int) -> None:
        """The manifest that makes checkpoint `prefix` count. Durable (checkpoint.durable):
        TensorFlow does not fsync, so every file of the checkpoint is fsynced, then the
        directory (their names), before the manifest is written (fsynced and renamed), and the
        directory again after the rename; retention, which the manager's save runs after
        this call, deletes older checkpoints only then. A power loss leaves the previous
        checkpoint, or this one."""
        writer = self.async_writer or self._inline
        known = writer.take_written(prefix) if writer is not None else None
        paths = known.paths if known else checkpoint_files(prefix)
        if self.durable:
            if not (known and known.synced):  # (bundle_save's writer fsynced its own files)
                for path in paths:
                    fsync_path(path)
            fsync_path(self.directory)
        files = known.manifest_files() if known else _files_on_disk(paths)
        own = {
            "step": step,
            "time": time.time(),
            "files": files,
            "data_checksums": "crc32c of every tensor, stored in the .index by TensorFlow",
        }
        if self._extra_json != "{}":  # one JSON object: this save's keys, then the constant ones
            text = json.dumps(own, sort_keys=True)[:-1] + ", " + self._extra_json[1:]
        else:
            text = json.dumps(own, sort_keys=True)
        try:
            write_text_atomic(prefix + MANIFEST_SUFFIX, text, durable=self.durable)
        except OSError:  # a failed fsync is not retried into success: this one never counts
            with contextlib.suppress(FileNotFoundError):
                os.remove(prefix + MANIFEST_SUFFIX)
            raise
        self.committed_step = step
        # (no read-back: the sizes are the disk's, or what the writer wrote and synced)

    def _sweep_manifests(self) -> None:
        """Drop every manifest whose checkpoint has no index: what a run killed during
        retention left (run at the first save of a process, and after a failed one)."""
        pattern = os.path.join(glob.escape(self.directory), "ckpt-*" + MANIFEST_SUFFIX)
        for manifest in glob.glob(pattern):
            if not os.path.exists(manifest[: -len(MANIFEST_SUFFIX)] + ".index"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(manifest)
