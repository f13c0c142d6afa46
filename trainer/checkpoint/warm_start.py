"""`trainer.init_from`: start a new run from a `.keras` artifact or a checkpoint of another run.

A warm start is a new run: its step counter, `optimizer.iterations` (and so the learning-rate
schedule) and learning rate start from this run's own config. What is copied: every model
variable (BatchNorm statistics and `add_weight` variables included) and, when the source
used the same optimizer class, the optimizer's slot variables (momenta, Adam moments).
Copying the source's iteration count would break this run's own resume check
(step == optimizer.iterations) and shift its schedule.
"""

from __future__ import annotations

import os
import sys

import keras
import tensorflow as tf

from trainer.config import UserError, first_few
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


def _not_slots(optimizer: keras.optimizers.Optimizer) -> set[int]:
    """ids of the iteration counters and learning rates of `optimizer` and, under
    mixed_float16, of the optimizer its LossScaleOptimizer wraps: a new run's own."""
    out = set()
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is not None:
            out |= {id(opt.iterations), id(getattr(opt, "_learning_rate", None))}
    return out


def optimizer_slots(optimizer: keras.optimizers.Optimizer) -> list:
    """The optimizer's variables minus its iteration counters and learning rates."""
    skip = _not_slots(optimizer)
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
        from trainer.checkpoint.store import CheckpointStore

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


def _from_checkpoint(path: str, state: TrainState) -> str:
    """Copy by Keras path: each model variable of this run takes the value saved under its
    own path (every one must be there, with its shape, or nothing is copied); the optimizer's
    slots likewise when the source used the same optimizer (same paths), else none."""
    from trainer.checkpoint.manifest import read_manifest
    from trainer.state import STATE_LAYOUT, checkpoint_key

    prefix = _checkpoint_prefix(path)
    try:
        layout = read_manifest(prefix).get("state_layout")
    except (OSError, ValueError):
        layout = None
    if layout != STATE_LAYOUT:
        raise UserError(
            f"trainer.init_from: received {path!r}; checkpoint {os.path.basename(prefix)} was "
            "written by an earlier version of resumable-trainer (or has no manifest), whose "
            "checkpoints can miss variables. Allowed: a checkpoint of this version, or the "
            "run's export/model.keras"
        )
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()

    def pairs(group: str, variables: dict) -> tuple[list, list[str]]:
        found, problems = [], []
        for name, var in variables.items():
            key = checkpoint_key(group, name)
            if key not in shapes:
                problems.append(f"no {name} there")
            elif tuple(shapes[key]) != tuple(var.shape):
                problems.append(f"{name} is {tuple(shapes[key])} there, {tuple(var.shape)} here")
            else:
                found.append((var, key))
        return found, problems

    weights, problems = pairs("model", state.groups["model"])
    if problems:
        shown = first_few(problems, 3, "; ")
        raise UserError(
            f"trainer.init_from: received {path!r}; checkpoint {os.path.basename(prefix)} does "
            f"not fit this model and data ({shown}). Allowed: a checkpoint of the same model "
            "trained on data with the same number of features and outputs"
        )
    skip = _not_slots(state.optimizer)
    slot_vars = {k: v for k, v in state.groups["optimizer"].items() if id(v) not in skip}
    slots, missing = pairs("optimizer", slot_vars)
    for var, key in weights + (slots if not missing else []):
        var.assign(reader.get_tensor(key))
    name = type(state.optimizer).__name__
    if not slot_vars:
        return "weights (this optimizer has no slot variables)"
    if missing:
        held = sorted(
            {k.split("/")[1].split(".S")[0] for k in shapes if k.startswith("optimizer/")}
        )
        there = ", ".join(held) or "none"
        return f"weights only: the optimizer state there is {there}, this run uses {name}"
    return f"weights and {name} slot variables"


def warm_start(path: str, state: TrainState) -> str:
    """Copy weights (and optimizer slots where present) from `path` into `state`; say what."""
    path = os.path.expanduser(str(path))
    what = _from_keras(path, state) if path.endswith(".keras") else _from_checkpoint(path, state)
    print(f"Warm start copied {what}", file=sys.stderr)
    return what
