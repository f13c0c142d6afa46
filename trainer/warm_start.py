"""`trainer.init_from`: start a new run from a `.keras` artifact or a checkpoint of another run."""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from trainer.config import UserError
from trainer.state import TrainState


def _assign_all(dst: list, src: list, what: str, path: str) -> None:
    if len(dst) != len(src) or any(
        tuple(a.shape) != tuple(b.shape) for a, b in zip(dst, src, strict=False)
    ):
        raise UserError(
            f"trainer.init_from: {path!r} does not match this {what} "
            f"({len(src)} variables there, {len(dst)} here, or shapes differ)"
        )
    for a, b in zip(dst, src, strict=True):
        a.assign(b)


def warm_start(path: str, state: TrainState) -> None:
    """Copy weights (and optimizer state where present) from `path` into `state`."""
    path = os.path.expanduser(str(path))
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise UserError(f"trainer.init_from: received {path!r}; no such file")
        import models  # noqa: F401  (registers the project's classes)

        loaded = keras.models.load_model(path)
        _assign_all(state.model.weights, loaded.weights, "model", path)
        if getattr(loaded, "optimizer", None) is not None and loaded.optimizer.variables:
            _assign_all(state.optimizer.variables, loaded.optimizer.variables, "optimizer", path)
        return
    prefix = path
    if os.path.isdir(path):
        from trainer.checkpoints import CheckpointStore

        ckpt_dir = (
            path
            if os.path.basename(path.rstrip("/")) == "checkpoints"
            else os.path.join(path, "checkpoints")
        )
        good = CheckpointStore(
            ckpt_dir, None, max_to_keep=1, keep_every_n_hours=None, manifest_extra={}, write=False
        ).latest_good()
        if good is None:
            raise UserError(f"trainer.init_from: received {path!r}; no checkpoint found there")
        prefix = good.prefix
    if not os.path.exists(prefix + ".index"):
        raise UserError(
            f"trainer.init_from: received {path!r}; allowed: a .keras file, a run "
            "directory, its checkpoints/ directory or a checkpoint prefix"
        )
    ckpt = tf.train.Checkpoint(model=state.model, optimizer=state.optimizer)
    try:
        ckpt.restore(prefix).expect_partial().assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:  # another architecture or data
        raise UserError(
            f"trainer.init_from: received {path!r}; it does not fit this model and data "
            f"({str(e).splitlines()[0]}). Allowed: a checkpoint of the same model trained on "
            "data with the same number of features and outputs"
        ) from None
