"""`trainer.precision`: float32, or Keras mixed precision (float16 with loss scaling, bfloat16).

The policy is set before the model is built (layers read it when created); variables stay
float32 either way, so checkpoints hold float32 weights. For mixed_float16 the optimizer is
wrapped in a LossScaleOptimizer whose dynamic loss scale and its counter are optimizer
variables, so they are checkpointed and restored with the rest of the optimizer state.
"""

from __future__ import annotations

import keras
import tensorflow as tf

ALLOWED = ("float32", "mixed_float16", "mixed_bfloat16")


def set_policy(name: str) -> None:
    """Set Keras' global dtype policy (call before building the model)."""
    keras.mixed_precision.set_global_policy(name)


def wrap_optimizer(optimizer: keras.optimizers.Optimizer, name: str) -> keras.optimizers.Optimizer:
    """A LossScaleOptimizer around `optimizer` for mixed_float16; `optimizer` otherwise."""
    if name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def grad_norm(optimizer: keras.optimizers.Optimizer, grads: list) -> tf.Tensor:
    """Global norm of the gradients the update uses: unscaled under loss scaling.

    A step the loss scaler skips (float16 overflow) is reported as 0.0, not inf, so that the
    loop's non-finite check stops only on a loss or gradient that is really diverging.
    """
    norm = tf.linalg.global_norm(grads)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        norm = norm / tf.cast(optimizer.dynamic_scale, norm.dtype)
        norm = tf.where(tf.math.is_finite(norm), norm, tf.zeros_like(norm))
    return norm


def sync_iterations(optimizer: keras.optimizers.Optimizer, step: int) -> None:
    """Count steps the loss scaler skipped: keep optimizer.iterations equal to the step.

    Keras' LossScaleOptimizer does not advance `iterations` on a skipped step, which would
    shift the learning-rate schedule and break the step == iterations check on resume.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # the step counter itself: with gradient accumulation `iterations` is computed from it
        counter = getattr(optimizer.inner_optimizer, "_iterations", None)
        (optimizer.iterations if counter is None else counter).assign(step)
