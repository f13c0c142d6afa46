"""Optimizers and learning-rate schedules from the `optimizer` and `schedule` groups.

An optimizer is any Keras optimizer by `_target_` (the shipped options and `optimizer=custom`
alike), its keys the constructor's arguments. A schedule is one of the shipped ones or
`schedule=custom`: any LearningRateSchedule subclass.

Schedules are Keras schedule objects driven by `optimizer.iterations`, so restoring the
optimizer's iteration counter restores the schedule's position too.
"""

from __future__ import annotations

import inspect

import keras
import tensorflow as tf
from keras.optimizers.schedules import LearningRateSchedule
from omegaconf import DictConfig

from trainer import targets
from trainer.config import UserError
from trainer.targets import import_target


def build_schedule(opt: DictConfig, sched: DictConfig, max_steps: int):
    """A float (constant) or a keras LearningRateSchedule peaking at `opt.learning_rate`."""
    lr = float(opt.learning_rate)
    if sched.name == "custom":
        return _custom_schedule(sched, lr)
    if sched.name == "constant":
        return lr
    if sched.name == "cosine":
        warmup = int(sched.warmup_steps)
        decay = int(sched.decay_steps or max(1, max_steps - warmup))
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                0.0, decay, alpha=sched.alpha, warmup_target=lr, warmup_steps=warmup
            )
        return keras.optimizers.schedules.CosineDecay(lr, decay, alpha=sched.alpha)
    if sched.name == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            lr, sched.decay_steps, sched.decay_rate, staircase=sched.staircase
        )
    raise ValueError(f"unknown schedule {sched.name!r}")


def _custom_schedule(sched: DictConfig, lr: float):
    """`schedule._target_` with the keys given; optimizer.learning_rate as its initial (or
    plain) learning rate argument when it takes one that was not given."""
    cls = import_target("schedule._target_", sched._target_)
    if not (inspect.isclass(cls) and issubclass(cls, LearningRateSchedule)):
        raise UserError(
            f"schedule._target_: received {sched._target_!r}, {targets.kind(cls)}; allowed: a "
            "keras.optimizers.schedules.LearningRateSchedule subclass"
        )
    kwargs = targets.arguments(sched, ("name", "_target_"))
    targets.check_arguments("schedule", cls, kwargs)
    names, _ = targets.accepted(cls)
    for name in ("initial_learning_rate", "learning_rate"):
        if name in names and name not in kwargs:
            kwargs[name] = lr
            break
    return targets.call("schedule", cls, kwargs)


def build_optimizer(
    opt: DictConfig, sched: DictConfig, max_steps: int
) -> keras.optimizers.Optimizer:
    """The Keras optimizer `optimizer._target_` names, built with the group's keys (its
    constructor's arguments, checked against its signature) and the schedule as its
    learning rate."""
    cls = import_target("optimizer._target_", opt._target_)
    if not (inspect.isclass(cls) and issubclass(cls, keras.optimizers.Optimizer)):
        raise UserError(
            f"optimizer._target_: received {opt._target_!r}, {targets.kind(cls)}; allowed: a "
            "keras.optimizers.Optimizer subclass"
        )
    kwargs = targets.arguments(opt, ("_target_",))
    targets.check_arguments("optimizer", cls, kwargs)
    if kwargs.get("gradient_accumulation_steps") and tf.distribute.has_strategy():
        raise UserError(
            "optimizer.gradient_accumulation_steps: received "
            f"{kwargs['gradient_accumulation_steps']}; allowed with distribute=default only "
            "(Keras' accumulation cannot be traced under a tf.distribute strategy)"
        )
    kwargs["learning_rate"] = build_schedule(opt, sched, max_steps)
    return targets.call("optimizer", cls, kwargs)


def step_counter(optimizer: keras.optimizers.Optimizer):
    """The optimizer's variable that counts train steps (calls of apply_gradients): equal to
    the loop's step, checked on resume. With `gradient_accumulation_steps` n, Keras'
    `iterations` counts updates (steps // n); this is the counter behind it."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    counter = getattr(
        optimizer, "_iterations", None
    )  # (never `or`: a variable's truth is a tensor)
    return optimizer.iterations if counter is None else counter


def learning_rate_fn(optimizer: keras.optimizers.Optimizer):
    """f(step) -> the float32 learning rate the optimizer uses at (0-based) train `step`
    (Keras evaluates a schedule at the step counter, also with gradient accumulation);
    works eagerly and inside a tf.function (the train chunk logs it per step)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    lr = optimizer._learning_rate  # the schedule object or a variable
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        return lambda step: tf.cast(lr(step), tf.float32)
    return lambda step: tf.cast(optimizer.learning_rate, tf.float32)  # also Mirrored
