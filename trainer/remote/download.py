"""A run brought back from checkpoint.remote: onto a fresh machine (`bring_back`, before the
run resumes) and into a local copy for the tools that read runs (`local_copy`)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

from trainer.remote.objects import RemoteError, Store, describe
from trainer.remote.uploader import CKPT, FINAL, LOGS, MANIFEST, committed_steps


def local_newest(ckpt_dir: str) -> int:
    """The step of the newest local checkpoint that has a manifest (-1: none). Verified
    later, as every checkpoint is before a resume (trainer/checkpoint/integrity.py)."""
    from trainer.checkpoint.manifest import MANIFEST_SUFFIX, list_checkpoints, step_of

    have = [p for p in list_checkpoints(ckpt_dir) if os.path.exists(p + MANIFEST_SUFFIX)]
    return max(map(step_of, have), default=-1)


def _fetch_checkpoint(store: Store, ckpt_dir: str, step: int, before_commit=None) -> int:
    """Download ckpt-`step`: its files, then `before_commit()` (the logs swapped in), then
    its manifest (fsynced) and a verification of every tensor; bytes fetched. A checkpoint
    that fails anywhere is removed (never left to count) and RemoteError raised."""
    from trainer.checkpoint.files import write_bytes_atomic
    from trainer.checkpoint.manifest import verify

    name = f"ckpt-{step}{MANIFEST}"
    files: dict = {}
    try:
        manifest = store.read_bytes(f"{CKPT}/{name}")
        files = json.loads(manifest)["files"]
        os.makedirs(ckpt_dir, exist_ok=True)
        for fname in sorted(files):
            store.get_file(f"{CKPT}/{fname}", os.path.join(ckpt_dir, fname))
        if before_commit is not None:
            before_commit()
        write_bytes_atomic(os.path.join(ckpt_dir, name), manifest)  # the local commit
        verdict = verify(os.path.join(ckpt_dir, f"ckpt-{step}"))
        if not verdict.ok:
            raise RemoteError(f"ckpt-{step} on {store.url} does not verify: {verdict.reason}")
    except Exception as e:
        for fname in [name, *files]:  # manifest first: never left to count
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(ckpt_dir, fname))
        if isinstance(e, RemoteError):
            raise
        raise RemoteError(f"ckpt-{step} on {store.url}: {describe(e)}") from None
    return sum(meta["size"] for meta in files.values())


def _fetch_tree(store: Store, run_dir: str, names: tuple[str, ...]) -> None:
    """Download the store's logs (or exports) into `run_dir`."""
    for name in names:
        for rel in store.find(name):
            store.get_file(f"{name}/{rel}", os.path.join(run_dir, name, rel))
        if "." in name.lstrip(".") and name in store.list(""):  # a file: metrics.jsonl
            store.get_file(name, os.path.join(run_dir, name))


def _swap_logs(store: Store, run_dir: str) -> None:
    """The store's metrics.jsonl and TensorBoard logs in place of the local ones: fetched
    into a staging directory first, so that a failed fetch changes nothing local."""
    staging = os.path.join(run_dir, f".remote-logs-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _fetch_tree(store, staging, LOGS)
        for name in LOGS:
            path, new = os.path.join(run_dir, name), os.path.join(staging, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
            if os.path.exists(new):
                os.replace(new, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def bring_back(store: Store, run_dir: str, report=None) -> int | None:
    """If the store holds a committed checkpoint newer than `run_dir`'s newest (or the run
    directory is empty or missing), download the newest one that verifies, with metrics.jsonl
    and the TensorBoard logs swapped in before its manifest is written (cut back to its step on
    resume, like any resume). Returns its step, or None when the local run is as new."""
    report = report or sys.stderr  # (looked up now: a sweep's job tees it to its train.log)
    ckpt_dir = os.path.join(run_dir, CKPT)
    have = local_newest(ckpt_dir)
    newer = [s for s in committed_steps(store) if s > have]
    for step in reversed(newer):
        t0 = time.monotonic()
        try:
            size = _fetch_checkpoint(store, ckpt_dir, step, lambda: _swap_logs(store, run_dir))
        except RemoteError as e:
            print(f"warning: {e}; trying an older one", file=report)
            continue
        print(
            f"remote: brought back ckpt-{step} from {store.url} ({size / 1e6:.1f} MB in "
            f"{time.monotonic() - t0:.1f} s) with metrics.jsonl and the TensorBoard logs",
            file=report,
        )
        return step
    return None


def local_copy(url: str, into: str | None = None) -> str:
    """A local directory holding remote run `url`: its committed checkpoints, logs, config
    and exports (for verify_resume.py, compare_runs.py, inspect_checkpoints.py). Without
    `into`, a temporary directory, deleted when the process exits."""
    store = Store(url)
    if into is None:
        into = tempfile.mkdtemp(prefix="trainer-remote-")
        atexit.register(shutil.rmtree, into, True)
    try:
        steps = committed_steps(store)
        if not steps and not store.list("") and not store.find(LOGS[1]):
            raise RemoteError(f"{url}: no run there (no checkpoints, no metrics.jsonl)")
        for step in steps:
            _fetch_checkpoint(store, os.path.join(into, CKPT), step)
        _fetch_tree(store, into, (*LOGS, *FINAL))
    except RemoteError:
        raise
    except Exception as e:
        raise RemoteError(f"{url}: {describe(e)}") from None
    return into


def unusable(e: RemoteError):
    """The one line (a UserError: exit 2) for a store that failed its start-up probe."""
    from trainer.config import UserError

    return UserError(
        f"checkpoint.remote: cannot use {e} (found by writing, reading and deleting a probe "
        "object). Check the bucket, the credentials and the endpoint (AWS_ENDPOINT_URL, "
        "STORAGE_EMULATOR_HOST); nothing was trained"
    )


_PROBED: set[str] = set()  # stores probed by this process (preflight's, then the run's)


def probed(url: str) -> Store:
    """checkpoint.remote's URL checked and its store probed with a write, a read and a
    delete, once per process: preflight probes before TensorFlow loads, the run reuses that
    (a sweep's job probes its own prefix). UserError (exit 2, one line) when refused."""
    from trainer.config import UserError
    from trainer.remote.objects import check_url

    if problem := check_url(url):
        raise UserError(f"checkpoint.remote: {problem}")
    try:
        store = Store(url)
        if store.url not in _PROBED:
            store.probe()
            _PROBED.add(store.url)
    except RemoteError as e:
        raise unusable(e) from None
    return store


def run_url(url: str, run_dir: str) -> str:
    """Where one of several runs sharing checkpoint.remote keeps its files: URL/<the name of
    its run directory> (a sweep's jobs; verify_resume's reference and resumed runs)."""
    return f"{url.rstrip('/')}/{os.path.basename(os.path.normpath(run_dir))}"


def connect(url: str | None, run_dir: str, sweep: bool, resume: str = "auto") -> Store | None:
    """checkpoint.remote at the start of a run: the run's store (a sweep's job: under the
    sweep's URL by its directory name), probed (`probed`), and the run brought back from it
    when it holds a newer checkpoint. UserError (exit 2, one line) when the URL is refused or
    the store cannot be used; nothing is trained then."""
    if not url:
        return None
    from trainer.config import UserError

    if sweep:
        url = run_url(url, run_dir)
    store = probed(url)
    try:
        if resume == "never" and committed_steps(store):
            raise UserError(
                f"trainer.resume: received 'never' but {store.url} already holds checkpoints; "
                "use another checkpoint.remote or trainer.resume=auto"
            )
        bring_back(store, run_dir)
    except UserError:
        raise
    except Exception as e:  # the store failed while bringing the run back
        raise UserError(
            f"checkpoint.remote: cannot bring the run back from {store.url} ({describe(e)}); "
            "nothing was trained"
        ) from None
    return store


def resolve_run(run: str) -> str:
    """A tool's RUN argument: a local directory as given, or a remote run's URL (s3://...,
    gs://...) copied into a temporary directory first. UserError when the store fails."""
    if "://" not in str(run) or str(run).startswith("file://"):
        return str(run)[len("file://") :] if str(run).startswith("file://") else str(run)
    from trainer.config import UserError
    from trainer.remote.objects import check_url

    if problem := check_url(run):
        raise UserError(f"RUN: {problem}")
    try:
        return local_copy(run)
    except RemoteError as e:
        raise UserError(f"RUN: cannot read {e}") from None
