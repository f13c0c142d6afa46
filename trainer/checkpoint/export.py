"""Full artifacts: `<run>/export/model.keras` and `<run>/export/saved_model/`, written atomically.

Each artifact is first written under a temporary name in the same directory and then
renamed into place, so a crash during export leaves the previous artifact or the new one,
never a torn file. A file is swapped with one `os.replace`; a directory is swapped with
Linux `renameat2(RENAME_EXCHANGE)`, which exchanges both names in one step (elsewhere: two
renames, with a moment in which only `saved_model.old-*` exists). A failed export removes
its temporary files and leaves the previous artifact untouched.

TensorFlow is imported where an artifact is written: `missing()` serves a sweep's check of a
finished job before TensorFlow loads (trainer/sweep/runinfo.py).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
from typing import TYPE_CHECKING

from trainer.checkpoint.files import fsync_path, write_text_atomic

if TYPE_CHECKING:
    import keras

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _fsync_tree(path: str) -> None:
    """Flush a file, or every file and directory under `path`, to disk."""
    paths = [path]
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            paths += [os.path.join(root, n) for n in dirs + files]
    for p in paths:
        fsync_path(p)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the names `a` and `b` (Linux renameat2). False, with a warning, where
    the system or the file system does not support it; any other failure (EIO...) raises."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        why = "no renameat2 in this C library"
    else:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return True
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), b)
        why = os.strerror(code)
    print(
        f"warning: cannot swap {b} atomically ({why}): replaced in two renames; a crash "
        f"between them leaves the previous export at {b}.old-{os.getpid()}",
        file=sys.stderr,
    )
    return False


def _remove_tree(path: str) -> None:
    """Remove a previous export set aside; one that cannot be removed is named in a warning."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        print(
            f"warning: could not remove {path} ({e.strerror}); remove it by hand", file=sys.stderr
        )


def export_keras(model: keras.Model, path: str) -> str:
    """`model.save` (config + weights + compiled optimizer state) to `path`, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    try:
        model.save(tmp)
        _fsync_tree(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path))  # the new name, durable
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def export_saved_model(model: keras.Model, path: str, feature_shape: tuple[int, ...]) -> str:
    """`model.export` (SavedModel with a `serve` signature) to directory `path`, swapped in atomically."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    old = f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    import tensorflow as tf

    signature = [tf.TensorSpec((None, *feature_shape), tf.float32, name="inputs")]
    try:
        model.export(tmp, format="tf_saved_model", verbose=False, input_signature=signature)
        _fsync_tree(tmp)
        if not os.path.exists(path):
            os.replace(tmp, path)
            fsync_path(parent)  # the new name, durable
        elif _exchange(tmp, path):
            fsync_path(parent)  # the swapped names, durable before the old one goes
            _remove_tree(tmp)  # now holds the previous artifact
        else:
            os.replace(path, old)
            os.replace(tmp, path)
            fsync_path(parent)
            _remove_tree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sweep(root: str) -> None:
    """Clear what a killed export left in `root`: put back a swapped-out SavedModel, drop temps."""
    for name in sorted(os.listdir(root)):
        m = re.search(r"\.(tmp|old)-(\d+)(\.keras)?$", name)
        if not m or _alive(int(m.group(2))):
            continue
        leftover = os.path.join(root, name)
        final = os.path.join(root, name[: m.start()] + (m.group(3) or ""))
        if m.group(1) == "old" and not os.path.exists(final):
            os.replace(leftover, final)  # killed between the two renames of the fallback swap
        elif os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            os.remove(leftover)


ARTIFACTS = {"keras": "model.keras", "saved_model": "saved_model"}


MARKER = "EXPORTED.json"  # <run>/export/EXPORTED.json: {artifact: the step it was written at}


def _marker(root: str) -> dict:
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def missing(run_dir: str, step: int | None = None) -> list[str]:
    """The artifacts (keys of ARTIFACTS) under `<run>/export/` that are not there, or (with
    `step`) were not written at that step: an export of an earlier completion that a longer
    run, killed before its own export, left behind is stale. A SavedModel counts once its
    `saved_model.pb` is there (it is swapped in whole)."""
    root = os.path.join(run_dir, "export")
    present = {
        "keras": os.path.isfile(os.path.join(root, ARTIFACTS["keras"])),
        "saved_model": os.path.isfile(
            os.path.join(root, ARTIFACTS["saved_model"], "saved_model.pb")
        ),
    }
    written = _marker(root) if step is not None else {}
    return [
        kind
        for kind, ok in present.items()
        if not ok or (step is not None and written.get(kind) != step)
    ]


def _record(root: str, kind: str, step: int | None) -> None:
    """Note in export/EXPORTED.json that `kind` now holds the model of `step` (atomically)."""
    if step is None:
        return
    written = {**_marker(root), kind: step}
    write_text_atomic(os.path.join(root, MARKER), json.dumps(written))


def export_all(
    model: keras.Model,
    run_dir: str,
    feature_shape: tuple[int, ...],
    only: list[str] | None = None,
    step: int | None = None,
) -> dict[str, str]:
    """The artifacts under `<run>/export/` (all, or those in `only`); returns their paths.
    `step`: recorded per artifact in export/EXPORTED.json once it is in place."""
    root = os.path.join(run_dir, "export")
    if os.path.isdir(root):
        sweep(root)
    kinds = list(ARTIFACTS) if only is None else only
    out = {}
    if "keras" in kinds:
        out["keras"] = export_keras(model, os.path.join(root, ARTIFACTS["keras"]))
        _record(root, "keras", step)
    if "saved_model" in kinds:
        path = os.path.join(root, ARTIFACTS["saved_model"])
        out["saved_model"] = export_saved_model(model, path, feature_shape)
        _record(root, "saved_model", step)
    return out
