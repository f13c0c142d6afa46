"""`trainer.init_from`: start a new run from a `.keras` artifact or a checkpoint of another run.

A warm start is a new run: its step counter, `optimizer.iterations` (and so the learning-rate
schedule) and learning rate start from this run's own config. What is copied: every model
variable (BatchNorm statistics and `add_weight` variables included) and, when the source
used the same optimizer class, the optimizer's slot variables (momenta, Adam moments).
Copying the source's iteration count would break this run's own resume check
(step == optimizer.iterations) and shift its schedule.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

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


def optimizer_slots(optimizer: keras.optimizers.Optimizer) -> list:
    """The optimizer's variables minus its iteration counter and learning rate."""
    skip = {id(optimizer.iterations), id(getattr(optimizer, "_learning_rate", None))}
    return [v for v in optimizer.variables if id(v) not in skip]


def _copy_slots(dst, src, path: str) -> str:
    """Copy slot variables from optimizer `src` when it is the same class; say what was done."""
    if src is None or not src.variables:
        return "weights (no optimizer state there)"
    if type(src) is not type(dst):
        return (
            f"weights only: the optimizer state there is {type(src).__name__}, "
            f"this run uses {type(dst).__name__}"
        )
    _assign_all(optimizer_slots(dst), optimizer_slots(src), "optimizer", path)
    return f"weights and {type(dst).__name__} slot variables"


def _from_keras(path: str, state: TrainState) -> str:
    if not os.path.isfile(path):
        raise UserError(f"trainer.init_from: received {path!r}; no such file")
    import models  # noqa: F401  (registers the project's classes)

    try:
        loaded = keras.models.load_model(path, safe_mode=True)
    except Exception as e:
        raise UserError(
            f"trainer.init_from: cannot load {path!r} ({type(e).__name__}: {e})"
        ) from None
    _assign_all(state.model.weights, loaded.weights, "model", path)
    return _copy_slots(state.optimizer, getattr(loaded, "optimizer", None), path)


def _checkpoint_prefix(path: str) -> str:
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
        return good.prefix
    if not os.path.exists(path + ".index"):
        raise UserError(
            f"trainer.init_from: received {path!r}; allowed: a .keras file, a run "
            "directory, its checkpoints/ directory or a checkpoint prefix"
        )
    return path


def _source_optimizer(prefix: str, state: TrainState, model: keras.Model):
    """An optimizer shaped like the one that wrote `prefix` (from its manifest's config)."""
    from omegaconf import OmegaConf

    from trainer.checkpoints import read_manifest
    from trainer.optim import build_optimizer

    try:
        cfg = OmegaConf.create(read_manifest(prefix)["config"])
        optimizer = build_optimizer(cfg.optimizer, cfg.schedule, int(cfg.trainer.max_steps))
    except (OSError, ValueError, KeyError):  # no manifest: assume this run's optimizer
        optimizer = type(state.optimizer).from_config(state.optimizer.get_config())
    optimizer.build(model.trainable_variables)  # the restore target's own variables
    return optimizer


def _collect_quietly() -> None:
    """Collect a failed restore's objects without TensorFlow's 'unrestored values' warnings."""
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        gc.collect()
    finally:
        logger.setLevel(level)


def _from_checkpoint(path: str, state: TrainState) -> str:
    prefix = _checkpoint_prefix(path)
    # Restore into a twin of the model (same class and config, not compiled) so that no
    # object of this run is half-written if the checkpoint does not fit, and so that every
    # twin variable must find its value (assert_existing_objects_matched).
    twin = type(state.model).from_config(state.model.get_config())
    shape = state.model.get_build_config()["input_shape"]
    twin(tf.zeros([1, *shape[1:]]))  # build every variable, as build.build_model does
    source = _source_optimizer(prefix, state, twin)
    problem = None
    ckpt = tf.train.Checkpoint(model=twin, optimizer=source)
    try:
        ckpt.restore(prefix).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if problem is not None:
        del ckpt, twin, source
        _collect_quietly()
        raise UserError(
            f"trainer.init_from: received {path!r}; checkpoint {os.path.basename(prefix)} does "
            f"not fit this model and data ({problem}). Allowed: a checkpoint of the same model "
            "trained on data with the same number of features and outputs"
        )
    _assign_all(state.model.weights, twin.weights, "model", path)
    return _copy_slots(state.optimizer, source, path)


def warm_start(path: str, state: TrainState) -> str:
    """Copy weights (and optimizer slots where present) from `path` into `state`; say what."""
    path = os.path.expanduser(str(path))
    what = _from_keras(path, state) if path.endswith(".keras") else _from_checkpoint(path, state)
    print(f"Warm start copied {what}", file=sys.stderr)
    return what
