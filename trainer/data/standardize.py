"""`data.standardize`: features (and regression targets) scaled inside the model, with
statistics of the training split only.

`Standardized` wraps the user's model: it takes the data's own features, scales them with
the training split's mean and standard deviation, runs the model, and for a regression maps
its outputs back to the targets' own units. So predictions, the logged MAE and the exported
model are all in the data's units, and a reloaded export needs no extra step. The loss is
taken on the standardized scale (`scaled_loss`), as if the targets had been standardized:
a price in the hundreds of thousands trains like any other target. The statistics are
non-trainable weights of the wrapper: in every checkpoint and in both exports.

`data.standardize`: null (the default) scales CSV, NPZ and a data=custom function's arrays,
and records whose description.json holds the statistics (the converter writes them); true
asks for it (an error where there are no statistics); false leaves the data as it is.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from trainer.config import UserError

AUTO_SOURCES = ("csv", "npz", "custom", "records")  # null: scaled when statistics exist


def statistics(x: np.ndarray, y: np.ndarray | None) -> dict:
    """Mean and standard deviation per feature (the last axis of x) and per target column
    (a regression's y); a constant column gets a standard deviation of 1."""
    axes = tuple(range(x.ndim - 1))
    # NaN-aware: a bad value stays in its own row (the loop's non-finite check stops on it),
    # not in every row through the statistics
    out = {"x_mean": np.nanmean(x, axis=axes), "x_std": np.nanstd(x, axis=axes)}
    if y is not None:
        out.update(y_mean=np.nanmean(y, axis=0), y_std=np.nanstd(y, axis=0))
    return {k: np.where(v > 0, v, 1.0) if k.endswith("std") else v for k, v in out.items()}


def wanted(cfg, data) -> dict | None:
    """The statistics to scale with, or None: `data.standardize` against what the data has."""
    setting = cfg.get("standardize")
    if setting is False:
        return None
    stats = getattr(data, "standardize_stats", lambda: None)()
    if stats is None and setting is True:
        raise UserError(
            f"data.standardize: received true; data={cfg.name} has no training statistics "
            "(a source is read on demand; records converted before the converter wrote "
            "them: convert again). Allowed here: false or null"
        )
    if setting is None and cfg.name not in AUTO_SOURCES:
        return None
    return stats


@keras.saving.register_keras_serializable(package="resumable_trainer")
class Standardized(keras.Model):
    """`model` on standardized features; a regression's outputs back in the targets' units."""

    def __init__(self, model, x_mean, x_std, y_mean=None, y_std=None, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.stats = {"x_mean": x_mean, "x_std": x_std, "y_mean": y_mean, "y_std": y_std}
        self.scale = {
            k: self.add_weight(
                shape=np.shape(v),
                initializer=keras.initializers.Constant(v),
                trainable=False,
                name=k,
            )
            for k, v in self.stats.items()
            if v is not None
        }

    def call(self, x, training=False):
        x = (x - self.scale["x_mean"]) / self.scale["x_std"]
        out = self.model(x, training=training)
        if "y_mean" in self.scale:
            out = out * tf.cast(self.scale["y_std"], out.dtype) + tf.cast(
                self.scale["y_mean"], out.dtype
            )
        return out

    def get_config(self):
        stats = {k: None if v is None else np.asarray(v).tolist() for k, v in self.stats.items()}
        return {
            **super().get_config(),
            "model": keras.saving.serialize_keras_object(self.model),
            **stats,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        for k in ("x_mean", "x_std", "y_mean", "y_std"):
            if config.get(k) is not None:
                config[k] = np.asarray(config[k], np.float32)
        return cls(**config)


def scaled_loss(loss_fn, model):
    """The loss per example on the standardized scale of a `Standardized` regression: its
    targets and predictions both mapped back through the training split's statistics."""
    if not (isinstance(model, Standardized) and "y_mean" in model.scale):
        return loss_fn
    mean, std = model.scale["y_mean"], model.scale["y_std"]

    def fn(y, pred):
        return loss_fn((tf.cast(y, pred.dtype) - mean) / std, (pred - mean) / std)

    return fn
