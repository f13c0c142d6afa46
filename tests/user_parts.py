"""Optimizers, schedules, losses, metrics and data written the way users write them, plugged
in by `_target_` (tests put tests/ on PYTHONPATH): `optimizer=custom
optimizer._target_=user_parts.ScaledSGD`, `schedule=custom
schedule._target_=user_parts.StepDecay`, `loss=custom loss._target_=user_parts.log_cosh`,
`metrics=[user_parts.MaxError]`, `data=custom data._target_=user_parts.make_arrays` or
`user_parts.make_source`."""

from __future__ import annotations

import os
import threading
import time

import keras
import numpy as np
from keras import ops

_PKG = "user_parts"


@keras.saving.register_keras_serializable(package=_PKG)
class ScaledSGD(keras.optimizers.SGD):
    """SGD whose update is scaled by a constructor argument, with a slot of its own: a
    running count of steps, as a user's optimizer might keep."""

    def __init__(self, learning_rate=0.01, scale=1.0, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.scale = scale

    def build(self, variables):
        super().build(variables)
        self.seen = self.add_variable((), initializer="zeros", name="seen")

    def update_step(self, gradient, variable, learning_rate):
        super().update_step(gradient * self.scale, variable, learning_rate)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        self.seen.assign_add(1.0)
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package=_PKG)
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Halves the learning rate every `every` steps."""

    def __init__(self, initial_learning_rate, every=10):
        self.initial_learning_rate, self.every = initial_learning_rate, every

    def __call__(self, step):
        halvings = ops.floor(ops.cast(step, "float32") / self.every)
        return self.initial_learning_rate * ops.power(0.5, halvings)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "every": self.every}


@keras.saving.register_keras_serializable(package=_PKG)
def log_cosh(y_true, y_pred, scale=1.0):
    """A loss function of the user's own, with an argument."""
    d = (y_pred - y_true) * scale
    return ops.mean(d + ops.softplus(-2.0 * d) - ops.log(2.0), axis=-1)


@keras.saving.register_keras_serializable(package=_PKG)
class MaxError(keras.metrics.Metric):
    """A stateful metric of the user's own: the largest absolute error since its reset."""

    def __init__(self, name="max_error", **kwargs):
        super().__init__(name=name, **kwargs)
        self.worst = self.add_variable((), initializer="zeros", name="worst")

    def update_state(self, y_true, y_pred, sample_weight=None):
        err = ops.max(ops.abs(ops.cast(y_true, y_pred.dtype) - y_pred))
        self.worst.assign(ops.maximum(self.worst, err))

    def result(self):
        return self.worst


def _rows(n: int, features: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = np.sin(x @ rng.standard_normal((features, 1))).astype(np.float32)
    return x, y


def make_arrays(n: int = 512, features: int = 6):
    """A user's function returning arrays (x, y)."""
    return _rows(n, features)


def make_arrays_kw(**options):
    """A user's function that takes its options as **kwargs."""
    return _rows(int(options.get("rows", 512)), int(options.get("features", 6)))


class RowSource:
    """A random-access source: rows computed (or read) one at a time, never all at once.
    `delay` seconds per row stand for I/O (a file, a database); `fail_at` raises at that row,
    `ragged_at` returns a row of another shape there, both while the file `fault` exists (if
    given: the store fails, then comes back)."""

    def __init__(
        self, n=512, features=6, delay=0.0, fail_at=None, ragged_at=None, fault=None, slow_fail=None
    ):
        self.n, self.features, self.delay, self.slow_fail = n, features, delay, slow_fail
        self.fail_at, self.ragged_at, self.fault = fail_at, ragged_at, fault
        self.x, self.y = _rows(n, features)
        self.reading, self.most_at_once = 0, 0  # reads in flight: how parallel the reader is
        self._lock = threading.Lock()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.delay:
            with self._lock:
                self.reading += 1
                self.most_at_once = max(self.most_at_once, self.reading)
            time.sleep(self.delay)
            with self._lock:
                self.reading -= 1
        faulty = self.fault is None or os.path.exists(self.fault)
        if i in np.atleast_1d(self.fail_at if self.fail_at is not None else []) and faulty:
            if i == self.slow_fail:
                time.sleep(1.0)  # a read that times out: it fails after the ones behind it
            raise OSError(f"cannot read blob {i}: connection reset")
        if i == self.ragged_at and faulty:
            return self.x[i][:-1], self.y[i]
        return self.x[i], self.y[i]


def make_source(
    n: int = 512,
    features: int = 6,
    delay: float = 0.0,
    fail_at=None,
    ragged_at=None,
    fault=None,
    slow_fail=None,
):
    """A user's function returning a random-access source (`fail_at`: a row or a list)."""
    return RowSource(n, features, delay, fail_at, ragged_at, fault, slow_fail)


def no_len(n: int = 10):
    """Wrong on purpose: a source without __len__."""

    class Stream:
        def __getitem__(self, i):
            return np.zeros(3, np.float32), np.zeros(1, np.float32)

    return Stream()


def not_ready(path: str = "/data/today"):
    """A data function that gives up the way scripts do: sys.exit with a message."""
    import sys

    sys.exit(f"{path} is not ready yet; try again later")
