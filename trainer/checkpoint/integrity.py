"""Recovering a run directory after a crash, and saving so that a failure loses nothing.

`recover()` runs once before a resume. It verifies the checkpoints newest first against
their manifests (trainer/checkpoint/store.py) and sorts the ones it cannot use into two kinds:
- incomplete: no manifest. The manifest is written only after TensorFlow has finished the
  checkpoint, so this is what a kill or a crash during a save leaves behind;
- corrupted: a manifest exists but a file is missing, truncated or has another checksum.
Each one is reported (which file, what is wrong) and moved to `checkpoints/bad/` (never
deleted), and the CheckpointManager state file is rewritten to list only what is left, so
neither `latest_checkpoint` nor retention can later point at a bad checkpoint. A good
checkpoint newer than everything the state file lists (a kill between its manifest and the
state-file update) is added to it, so retention deletes it in its turn. If no
checkpoint verifies and one of them is corrupted, the resume is refused and nothing is
moved; if all of them are merely incomplete, no save ever finished and the run starts over.

`save()` wraps CheckpointStore.save: a full disk or an unwritable directory becomes one
message (exit 2) after the partial files of the failed save are removed; the previous
checkpoint stays intact because retention only runs after a save succeeded.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import sys
import time
from collections.abc import Callable

import tensorflow as tf

from trainer.checkpoint.files import write_text_atomic
from trainer.checkpoint.manifest import (
    MANIFEST_SUFFIX,
    Verdict,
    list_checkpoints,
    read_manifest,
    step_of,
    verify,
)
from trainer.checkpoint.store import CheckpointStore
from trainer.config import UserError

BAD_DIR = "bad"
STATE_FILE = "checkpoint"  # CheckpointManager's state file (a CheckpointState text proto)


def _leftovers(directory: str) -> dict[str, list[str]]:
    """{checkpoint prefix: every path that belongs to it}, including TensorFlow's
    `<prefix>_temp/` directory and our manifest temporary files."""
    out: dict[str, list[str]] = {}
    for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*")):
        name = os.path.basename(path)
        stem = name.split(".", 1)[0]
        if stem.endswith("_temp"):
            stem = stem[: -len("_temp")]
        if step_of(stem) < 0:
            continue
        out.setdefault(os.path.join(directory, stem), []).append(path)
    return out


def set_aside(prefix: str, reason: str, paths: list[str] | None = None) -> str | None:
    """Move every file of checkpoint `prefix` into `checkpoints/bad/<name>-<time>/` with a
    REASON.txt; return that directory (None if there was nothing to move)."""
    directory = os.path.dirname(prefix)
    paths = paths if paths is not None else _leftovers(directory).get(prefix, [])
    if not paths:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = os.path.join(directory, BAD_DIR, f"{os.path.basename(prefix)}-{stamp}")
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(directory, BAD_DIR, f"{os.path.basename(prefix)}-{stamp}-{n}")
    os.makedirs(dest)
    with open(os.path.join(dest, "REASON.txt"), "w") as f:
        f.write(reason + "\n")
    for path in paths:
        shutil.move(path, os.path.join(dest, os.path.basename(path)))
    return dest


def _state(directory: str) -> tuple[set[str] | None, float | None]:
    """(checkpoint names the state file lists, its last_preserved_timestamp); (None, None)
    when there is no readable state file."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError):  # a torn or foreign file: rebuilt from the manifests
        state = None
    if state is None:
        return None, None
    listed = {os.path.basename(p) for p in state.all_model_checkpoint_paths}
    return listed, state.last_preserved_timestamp or None


def _retained(directory: str, listed: set[str] | None) -> list[str]:
    """The checkpoints retention should manage: those the state file lists that still have a
    manifest, plus newer ones it never heard of (a kill between a checkpoint's manifest and
    TensorFlow's state-file update). Older unlisted ones stay out: keep_every_n_hours keeps
    its checkpoints out of the list on purpose, so that retention never deletes them.
    `listed`: the names the state file lists (None: no state file)."""
    good = [p for p in list_checkpoints(directory) if os.path.exists(p + MANIFEST_SUFFIX)]
    if listed is None:
        return good
    newest = max((step_of(n) for n in listed), default=-1)
    return [p for p in good if os.path.basename(p) in listed or step_of(p) > newest]


def rewrite_state_file(directory: str) -> None:
    """Make CheckpointManager's state file list exactly the checkpoints `_retained` finds."""
    listed, last_preserved = _state(directory)
    kept = _retained(directory, listed)
    path = os.path.join(directory, STATE_FILE)
    if not kept:
        if os.path.exists(path):
            os.replace(path, os.path.join(directory, BAD_DIR, STATE_FILE))
        return
    times = []
    for p in kept:
        try:
            times.append(float(read_manifest(p)["time"]))
        except (OSError, ValueError, KeyError):
            times.append(os.path.getmtime(p + MANIFEST_SUFFIX))
    names = [os.path.basename(p) for p in kept]
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{n}"' for n in names]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in times]
    lines.append(f"last_preserved_timestamp: {last_preserved or min(times) - 1.0!r}")
    write_text_atomic(path, "\n".join(lines) + "\n")


def recover(
    directory: str, check: Callable[[str], None] | None = None, report=None, tidy: bool = True
) -> Verdict | None:
    """The checkpoint a resume should use (None: start from scratch); see the module docstring.

    `check(prefix)` may raise UserError to refuse the chosen checkpoint (a changed config):
    it runs before anything is moved, so a refused resume leaves the directory untouched.
    `tidy=False` (multi-worker non-chief workers) only chooses: the chief moves bad ones aside.
    """
    report = report or sys.stderr
    if not os.path.isdir(directory):
        return None
    bad: list[Verdict] = []
    chosen = None
    for prefix in reversed(list_checkpoints(directory)):
        verdict = verify(prefix)
        if verdict.ok:
            chosen = verdict
            break
        bad.append(verdict)
    corrupted = [b for b in bad if os.path.exists(b.prefix + MANIFEST_SUFFIX)]
    if chosen is None and corrupted:
        details = "; ".join(f"{os.path.basename(b.prefix)}: {b.reason}" for b in bad)
        raise UserError(
            f"checkpoints: no checkpoint in {directory} verifies ({details}). Nothing was "
            "moved or deleted; restore the files, or use another hydra.run.dir to start over."
        )
    if chosen is not None and check is not None:
        check(chosen.prefix)
    known = {b.prefix for b in bad} | ({chosen.prefix} if chosen else set())
    newest = chosen.step if chosen else -1
    # Temporary files of an interrupted write that never produced an index or a manifest.
    listed = set(list_checkpoints(directory))
    # Older checkpoints are not hashed (that could take long) but their files must all be
    # there: a kill during a retention sweep leaves a half-deleted one behind.
    for prefix in listed:
        if prefix not in known and step_of(prefix) < newest:
            verdict = verify(prefix, hashes=False)
            if not verdict.ok:
                bad.append(verdict)
    strays = [
        Verdict(p, step_of(p), False, "temporary files of an interrupted write")
        for p in _leftovers(directory)
        if p not in known and p not in listed and step_of(p) > newest
    ]
    moved = False
    for b in (bad + strays) if tidy else []:
        dest = set_aside(b.prefix, b.reason)
        if dest:
            moved = True
            where = os.path.relpath(dest, os.path.dirname(directory))
            print(
                f"checkpoint {os.path.basename(b.prefix)} skipped: {b.reason} (moved to {where})",
                file=report,
            )
    # A good checkpoint the state file does not list (a kill after its manifest, before TF's
    # state-file update; or no state file at all): list it, so retention retires it in turn.
    listed, _ = _state(directory)
    unlisted = {os.path.basename(p) for p in _retained(directory, listed)} - (listed or set())
    if moved or (tidy and unlisted):
        rewrite_state_file(directory)
    if chosen is None and moved:
        print(
            "No checkpoint was ever completed in this run directory: starting from step 0.",
            file=report,
        )
    return chosen


# ---------------------------------------------------------------- data shape
def check_data_fits(prefix: str, data, data_path: str | None = None) -> None:
    """Refuse to load checkpoint `prefix` into a model built for data of another shape."""
    manifest = read_manifest(prefix)
    then = manifest.get("data_shape")
    now = data.signature()
    if then is None or then == now:
        return
    diffs = ", ".join(f"{k} {then.get(k)} -> {now[k]}" for k in now if then.get(k) != now[k])
    source = f"data.path: received {data_path!r}" if data_path else "data"
    was = (manifest.get("config") or {}).get("data", {}).get("path")
    raise UserError(
        f"{source}; it does not fit the model in {os.path.dirname(prefix)} ({diffs}"
        f"{f'; that run was trained on {was!r}' if was else ''}). Allowed: data with "
        f"feature shape {then.get('feature_shape')} and {then.get('output_units')} outputs, "
        "or another hydra.run.dir."
    )


# ---------------------------------------------------------------- saving
# A write the disk refused: full, over quota, read-only, not permitted, or failing (EIO). Python
# raises OSError with an errno; TensorFlow's C++ writers raise their own OpError types whose
# message is "<path>; <strerror>", so the words are matched too (README, "Faults").
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_DISK_WORDS = tuple(os.strerror(n) for n in sorted(_DISK_ERRNOS))
_PATH_BEFORE = re.compile(r"(\S+?)[;:] (?:" + "|".join(map(re.escape, _DISK_WORDS)) + ")", re.I)


def disk_problem(e: BaseException) -> str | None:
    """The error's words if `e` is a write the disk refused (see _DISK_ERRNOS), else None."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        return os.strerror(e.errno)
    if isinstance(e, (OSError, tf.errors.OpError)):
        text = str(e).lower()
        for word in _DISK_WORDS:
            if word.lower() in text:
                return word
    return None


def failed_path(e: BaseException) -> str | None:
    """The file a refused write named: OSError.filename, or the path in TensorFlow's message."""
    if isinstance(e, OSError) and e.filename:
        return os.fsdecode(e.filename)
    m = _PATH_BEFORE.search(str(e))
    return m.group(1) if m else None


def describe(e: BaseException) -> str:
    """ "<path>: <error>" for a refused write (or the error alone when no path is known)."""
    problem = disk_problem(e) or str(e).splitlines()[0][:200]
    path = failed_path(e)
    return f"{path}: {problem}" if path else problem


def newest_intact(directory: str) -> str:
    """What a failed save leaves: "the newest good checkpoint ckpt-N is intact (verified)",
    every tensor read back against its checksum, or that none exists."""
    for prefix in reversed(list_checkpoints(directory)):
        if verify(prefix).ok:
            return f"the newest good checkpoint {os.path.basename(prefix)} is intact (verified)"
    return "no earlier checkpoint exists"


def save(store: CheckpointStore, step: int, before_write=None, **kwargs) -> float:
    """store.save(step, ...), turning a write the disk refused into a UserError (exit 2): the
    failed save's partial files are removed, a failed fsync is never retried (the kernel may
    have dropped the pages it could not write), and the newest good checkpoint is verified."""
    try:
        return store.save(step, before_write=before_write, **kwargs)
    except (OSError, tf.errors.OpError) as e:
        if disk_problem(e) is None:
            raise
        step = getattr(e, "checkpoint_step", step)  # an async write fails one save later
        # Clean where this process writes (a non-chief worker writes to its own temp dir,
        # never into the chief's checkpoints).
        write_dir = store.manager.directory if store.manager is not None else store.directory
        prefix = os.path.join(write_dir, f"ckpt-{step}")
        if store.committed_step == step:  # it committed; what came after failed
            # (the manager's state file, written every few seconds: a full disk was seen)
            what = f"ckpt-{step} was saved, then a write after it failed ({describe(e)})"
        else:  # never a checkpoint: free the space
            _remove(_leftovers(write_dir).get(prefix, []))
            what = f"could not write ckpt-{step} in {store.directory} ({describe(e)})"
        raise UserError(
            f"checkpoint: {what}; {newest_intact(store.directory)}. Free space, fix "
            "permissions or the disk, then rerun the same command to resume."
        ) from None


def _remove(paths: list[str]) -> None:
    """Remove a failed save's files; one that cannot be removed is named in a warning (the
    next run sets it aside: it has no manifest, so it never counts)."""
    for path in paths:
        try:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        except OSError as e:
            print(
                f"warning: could not remove {path} ({e.strerror}); it never counts", file=sys.stderr
            )
