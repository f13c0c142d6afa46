"""The background upload of a run's checkpoints to checkpoint.remote (README, "Object
storage"). The commit order, per checkpoint:

1. The local checkpoint commits as always (files, fsync, manifest last); the store then
   hands its prefix here (`committed`) and returns: a save never waits for an upload.
2. Its files are read, checked against the local manifest (sizes, the index's SHA-256),
   uploaded and checked again on the store (size, MD5 of the bytes sent).
3. The run's logs follow (metrics.jsonl to its last whole line, the event files to their
   last whole record; only what changed), then the manifest: the remote manifest is the
   commit marker, and a remote checkpoint without one never counts.
4. Remote retention deletes older checkpoints (manifest first) only after that.

When saves come faster than the store takes them, only the newest committed checkpoint is
uploaded next. A failing store is retried with backoff while training goes on, with one
warning per outage; the lag (steps and seconds behind) is logged at every save. `finish` is
the end of the run: it waits for the newest checkpoint, the exports and the config, and says
how long it waited, or why the store is behind.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from trainer.remote.objects import RemoteError, Store, describe

CKPT = "checkpoints"
MANIFEST = ".manifest.json"
LOGS = ("metrics.jsonl", "tensorboard")
FINAL = (".hydra", "export", "train.log")  # uploaded at the end of the run
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # seconds between retries of a failing store


def remote_checkpoints(store: Store) -> dict[int, set[str]]:
    """{step: names} of every checkpoint object under the store's checkpoints/."""
    found: dict[int, set[str]] = {}
    for name in store.list(CKPT):
        head = name.split(".", 1)[0]
        if head.startswith("ckpt-") and head[5:].isdigit():
            found.setdefault(int(head[5:]), set()).add(name)
    return found


def committed_steps(store: Store) -> list[int]:
    """The steps of the store's committed checkpoints (those with a manifest), oldest first."""
    found = remote_checkpoints(store)
    return sorted(s for s, names in found.items() if f"ckpt-{s}{MANIFEST}" in names)


def whole_prefix(path: str, data: bytes) -> bytes:
    """What of a log file can be uploaded: up to its last whole line (metrics.jsonl) or
    record (an event file: 8-byte length, 4-byte CRC, data, 4-byte CRC)."""
    if path.endswith(".jsonl"):
        return data[: data.rfind(b"\n") + 1]
    at = 0
    while at + 12 <= len(data):
        length = int.from_bytes(data[at : at + 8], "little")
        if at + 16 + length > len(data):
            break
        at += 16 + length
    return data[:at]


class Uploader:
    """One thread that keeps the store up to date with the run directory's checkpoints."""

    def __init__(
        self,
        store: Store,
        run_dir: str,
        max_to_keep: int,
        every_seconds: float = 0.0,
        clock=time.monotonic,
        resumed: tuple[str, int] | None = None,
    ):
        """`resumed`: (prefix, step) of the local checkpoint this run resumes from, uploaded
        first if the store lacks it and holds nothing newer (an earlier run killed before
        its upload, or whose store was down, or run without the remote)."""
        self.store, self.run_dir, self.max_to_keep = store, run_dir, max(1, int(max_to_keep))
        self.every_seconds = float(every_seconds or 0.0)  # checkpoint.remote_every_seconds
        self.clock = clock
        self._next_at = 0.0  # no upload starts before this (but the end of the run's)
        self._files: dict[int, set[str]] = {}  # the store's checkpoints as this run knows them
        self._cond = threading.Condition()
        self._pending: tuple[str, int, float] | None = None  # newest local commit to upload
        self._final = False  # upload the exports and the config too, then stop
        self._extras: tuple[str, ...] = FINAL
        self._done_final = False
        self._busy = False
        self._closed = False
        self._resume = resumed
        self._sent: dict[str, int] = {}  # log file -> bytes already on the store
        self.remote_step, self.remote_since = -1, clock()
        self.local_step = resumed[1] if resumed else -1
        self.outage: str | None = None  # the store's current problem, if any
        self.skipped = 0  # intermediate checkpoints never uploaded (the store was slower)
        self.uploaded = 0
        self.bytes_sent = 0
        self._thread = threading.Thread(target=self._run, name="remote-upload", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the loop's side
    def committed(self, prefix: str, step: int) -> None:
        """A local checkpoint has committed (called by the store, any thread): upload it."""
        with self._cond:
            if self._pending is not None:
                self.skipped += 1
            self._pending = (prefix, step, self.clock())
            self.local_step = max(self.local_step, step)
            self._cond.notify_all()

    def lag(self, step: int) -> tuple[int, float]:
        """(steps, seconds) the store is behind `step`: seconds since it last held the newest
        local checkpoint (0 when it does)."""
        steps = max(0, step - max(self.remote_step, 0))
        caught_up = self.remote_step >= self.local_step and self._pending is None
        return steps, 0.0 if caught_up else round(self.clock() - self.remote_since, 3)

    def finish(self, timeout: float, extras: tuple[str, ...] = FINAL) -> tuple[str | None, float]:
        """End of the run: wait up to `timeout` s for the newest checkpoint, the logs and
        `extras` (the exports, the config, train.log). Returns (problem or None, seconds)."""
        t0, said = self.clock(), False
        with self._cond:
            self._final, self._extras = True, extras
            self._cond.notify_all()
            while not self._done_final and self.clock() - t0 < timeout:
                self._cond.wait(timeout=min(0.5, max(0.01, timeout - (self.clock() - t0))))
                if not said and self.clock() - t0 > 2 and not self._done_final:
                    said = True  # (a preempted machine's grace period may be shorter)
                    print(
                        f"remote: waiting up to {timeout:g} s (checkpoint.remote_wait) for the "
                        f"upload to {self.store.url}",
                        file=sys.stderr,
                    )
            done = self._done_final
            self._closed = True
            self._cond.notify_all()
        waited = self.clock() - t0
        if done:
            return None, waited
        what = f"ckpt-{self.local_step}" if self.local_step > self.remote_step else "the exports"
        return (
            f"remote: {self.store.url} is behind: {what} could not be uploaded in "
            f"{timeout:g} s ({self.outage or 'still uploading'}); it holds "
            + (f"ckpt-{self.remote_step}" if self.remote_step >= 0 else "no checkpoint"),
            waited,
        )

    def close(self) -> None:
        """Stop without waiting (a failed run): the next run uploads what is missing."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        self._retry("clean up", self._clean_leftovers)
        with self._cond:  # (a commit since start is newer: it goes instead)
            if self._resume and self._resume[1] > max(self._files, default=-1):
                if self._pending is None:  # (a newer store's steps would be retired as
                    self._pending = (*self._resume, self.clock())  # another history's)
        while True:
            with self._cond:
                while self._pending is None and not self._closed and not self._final:
                    self._cond.wait()
                while not (self._closed or self._final) and self.clock() < self._next_at:
                    self._cond.wait(timeout=self._next_at - self.clock())  # newer ones replace it
                if self._closed:
                    return
                job, self._pending = self._pending, None
                self._busy = True
            if job is not None:
                self._retry(f"upload ckpt-{job[1]}", lambda j=job: self._upload_checkpoint(*j))
                continue
            if self._retry("upload the exports and the config", self._upload_final):
                with self._cond:
                    self._done_final = True
                    self._cond.notify_all()
                return

    def _retry(self, what: str, fn) -> bool:
        """Run `fn` until it succeeds, a newer checkpoint is pending (the one in hand is then
        dropped) or the uploader is closed. One warning per outage; one line when it ends."""
        for attempt in range(1 << 30):
            try:
                fn()
            except _Superseded:
                return False  # a newer checkpoint is pending, or this one was retired locally
            except Exception as e:  # a store that failed: retried, never the loop's failure
                problem = describe(e)
                if self.outage is None:
                    print(
                        f"warning: remote: could not {what} to {self.store.url} ({problem}); "
                        "training goes on, retrying with backoff",
                        file=sys.stderr,
                    )
                self.outage = problem
                delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, timeout=delay)
                    if self._closed:
                        return False
                    if self._pending is not None and what.startswith("upload ckpt"):
                        self.skipped += 1
                        return False
                continue
            if self.outage is not None:
                print(
                    f"remote: {self.store.url} is reachable again ({what}: done)", file=sys.stderr
                )
                self.outage = None
            return True
        return False

    def _upload_checkpoint(self, prefix: str, step: int, committed_at: float) -> None:
        directory = os.path.dirname(prefix)
        try:
            with open(prefix + MANIFEST, "rb") as f:
                manifest_bytes = f.read()
        except FileNotFoundError:  # retired locally: a newer checkpoint follows
            raise _Superseded from None
        files = json.loads(manifest_bytes)["files"]
        name = os.path.basename(prefix) + MANIFEST
        if step in self._files:  # the same step again: uncommit it before rewriting it
            self.store.remove([f"{CKPT}/{name}"])
            self._files.pop(step)
        sent: list[str] = []
        try:
            for fname, meta in sorted(files.items()):
                local = os.path.join(directory, fname)  # (a newer one waits for this upload)
                try:
                    if "sha256" in meta:
                        _check_sha256(local, meta["sha256"])
                    self.bytes_sent += self.store.put_file(local, f"{CKPT}/{fname}", meta["size"])
                except FileNotFoundError:
                    if not os.path.exists(local):  # retired locally while it uploaded
                        raise _Superseded from None
                    raise  # the store's (a missing bucket)
                sent.append(f"{CKPT}/{fname}")
        except _Superseded:  # never committed: its files go (a kill here: the next run's)
            self.store.remove(sent)
            raise
        self._upload_logs()
        self.store.put_bytes(f"{CKPT}/{name}", manifest_bytes)  # the commit
        self.remote_step, self.remote_since = step, committed_at
        self._files[step] = {*files, name}
        self._retire_remote()
        self.uploaded += 1
        self._next_at = self.clock() + self.every_seconds

    def _upload_logs(self) -> None:
        for rel in _files_under(self.run_dir, LOGS):
            path = os.path.join(self.run_dir, rel)
            try:
                with open(path, "rb") as f:
                    data = whole_prefix(path, f.read())
            except FileNotFoundError:
                continue
            if self._sent.get(rel) != len(data):
                self.store.put_bytes(rel, data)
                self._sent[rel] = len(data)
                self.bytes_sent += len(data)

    def _upload_final(self) -> None:
        with self._cond:
            job, self._pending = self._pending, None
        if job is not None:
            self._upload_checkpoint(*job)
        self._upload_logs()
        for rel in _files_under(self.run_dir, self._extras):
            self.bytes_sent += self.store.put_file(os.path.join(self.run_dir, rel), rel)
        self._clean_leftovers()  # what an upload abandoned midway left (a store that failed)

    def _retire_remote(self) -> None:
        """Keep the newest max_to_keep committed checkpoints on the store: an older one loses
        its manifest first, so that a kill midway never leaves a committed partial one."""
        newest = self.remote_step  # just committed: never retired; steps above it are another
        stale = [s for s in self._files if s > newest]  # history's (this run resumed below them)
        kept = sorted(s for s in self._files if s <= newest)[-self.max_to_keep :]
        for step in stale + [s for s in sorted(self._files) if s <= newest and s not in kept]:
            manifest = f"ckpt-{step}{MANIFEST}"
            self.store.remove([f"{CKPT}/{manifest}"])
            self.store.remove(sorted(f"{CKPT}/{n}" for n in self._files.pop(step) if n != manifest))

    def _clean_leftovers(self) -> None:
        """Remote checkpoint files without a manifest: an upload a killed run left."""
        found = remote_checkpoints(self.store)
        self._files = {s: n for s, n in found.items() if f"ckpt-{s}{MANIFEST}" in n}
        self.remote_step = max(self._files, default=-1)
        for step, names in found.items():
            if step not in self._files:
                self.store.remove(sorted(f"{CKPT}/{n}" for n in names))


class _Superseded(Exception):
    """A newer checkpoint committed while an older one was uploading: upload the newer."""


def _check_sha256(path: str, expected: str) -> None:
    from trainer.checkpoint.files import sha256_file

    if sha256_file(path) != expected:
        raise RemoteError(f"{path} no longer matches its manifest's SHA-256; not uploaded")


def _files_under(run_dir: str, names: tuple[str, ...]) -> list[str]:
    """Relative paths of the files under `run_dir`/name for each name (a file or a tree)."""
    out = []
    for name in names:
        top = os.path.join(run_dir, name)
        if os.path.isfile(top):
            out.append(name)
        for root, _dirs, files in os.walk(top):
            for f in files:
                if ".tmp-" not in f and ".part-" not in f:
                    out.append(os.path.relpath(os.path.join(root, f), run_dir))
    return sorted(out)
