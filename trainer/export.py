"""Full artifacts: `<run>/export/model.keras` and `<run>/export/saved_model/`, written atomically.

Each artifact is first written under a temporary name in the same directory and then
renamed into place, so a crash during export leaves the previous artifact or the new one,
never a torn file.
"""

from __future__ import annotations

import os
import shutil

import keras
import tensorflow as tf


def export_keras(model: keras.Model, path: str) -> str:
    """`model.save` (config + weights + compiled optimizer state) to `path`, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    model.save(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def export_saved_model(model: keras.Model, path: str, feature_shape: tuple[int, ...]) -> str:
    """`model.export` (SavedModel with a `serve` signature) to directory `path`, swapped in atomically."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    old = f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    signature = [tf.TensorSpec((None, *feature_shape), tf.float32, name="inputs")]
    model.export(tmp, format="tf_saved_model", verbose=False, input_signature=signature)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def export_all(model: keras.Model, run_dir: str, feature_shape: tuple[int, ...]) -> dict[str, str]:
    """Both artifacts under `<run>/export/`; returns their paths."""
    root = os.path.join(run_dir, "export")
    return {
        "keras": export_keras(model, os.path.join(root, "model.keras")),
        "saved_model": export_saved_model(model, os.path.join(root, "saved_model"), feature_shape),
    }
