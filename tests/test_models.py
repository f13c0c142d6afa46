"""Every registered model survives get_config/from_config and a .keras round trip exactly.

In-process and fast. Every variable is first overwritten with random values (moving
statistics and `add_weight` variables included), so a round trip that silently falls back to
freshly initialised values cannot pass.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import models

RNG = np.random.default_rng(7)
# (class, constructor kwargs, input shape of one example)
CASES = {
    "custom_dense": (models.MySubclassedModel, {"num_units": 8, "output_units": 2}, (10,)),
    "custom_bn": (models.CustomBatchNormModel, {"units": 8, "output_units": 1}, (10,)),
    "custom_variable": (models.CustomModelWithVariableLayer, {"output_units": 3}, (5,)),
    "dropout_mlp": (models.DropoutMLP, {"units": 8, "depth": 2, "output_units": 1}, (6,)),
    "gru": (models.GRURegressor, {"units": 4, "output_units": 1}, (7, 3)),
    "convnet": (models.SmallConvNet, {"filters": 4, "output_units": 10}, (64,)),
}


def _built(name: str) -> tuple[keras.Model, np.ndarray]:
    cls, kwargs, shape = CASES[name]
    model = cls(**kwargs)
    x = RNG.normal(size=(16, *shape)).astype("float32")
    model(x[:1])
    for v in model.weights:  # canary values everywhere; variances must stay positive
        value = RNG.uniform(0.5, 1.5, v.shape) if "variance" in v.path else RNG.normal(size=v.shape)
        v.assign(value.astype(v.dtype))
    return model, x


def _names(model: keras.Model) -> list[str]:
    """Variable paths without the model's own name (present or not depending on how it was built)."""
    prefix = model.name + "/"
    return [v.path[len(prefix) :] if v.path.startswith(prefix) else v.path for v in model.weights]


def test_every_registered_model_is_covered():
    registered = {c.__name__ for c, _, _ in CASES.values()}
    exported = {n for n in models.__all__ if issubclass(getattr(models, n), keras.Model)}
    assert exported == registered


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_round_trip_rebuilds_the_same_model(name):
    model, x = _built(name)
    config = model.get_config()
    twin = type(model).from_config(config)
    twin(x[:1])
    assert twin.get_config() == config
    assert _names(twin) == _names(model)
    twin.set_weights(model.get_weights())
    np.testing.assert_array_equal(twin(x, training=False), model(x, training=False))


@pytest.mark.parametrize("name", sorted(CASES))
def test_keras_file_round_trip_is_exact(name, tmp_path):
    model, x = _built(name)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    assert _names(loaded) == _names(model)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


# ---------------------------------------------------------------- the article's BatchNorm claim
def _moving_stats(model: keras.Model) -> dict[str, np.ndarray]:
    return {
        n: v.numpy() for n, v in zip(_names(model), model.weights, strict=True) if "moving" in n
    }


@pytest.mark.parametrize("first_call_training", [False, True])
def test_batchnorm_statistics_are_saved_whatever_the_first_call(first_call_training, tmp_path):
    """The article: BN statistics "will not be serialized if training=True is not set to call
    once". On Keras 3 any first call builds them and .keras stores them; training=True only
    moves them one momentum step on that batch."""
    x = RNG.normal(2.0, 3.0, size=(32, 10)).astype("float32")
    model = models.CustomBatchNormModel(units=4)
    model(x, training=first_call_training)
    stats = _moving_stats(model)
    assert set(stats) == {"bn/moving_mean", "bn/moving_variance"}
    at_init = np.all(stats["bn/moving_mean"] == 0) and np.all(stats["bn/moving_variance"] == 1)
    assert at_init != first_call_training  # training=True moved them; False left them at init
    model.save(tmp_path / "bn.keras")
    loaded = keras.models.load_model(tmp_path / "bn.keras", safe_mode=True)
    for key, value in _moving_stats(loaded).items():
        np.testing.assert_array_equal(value, stats[key])
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


def test_batchnorm_trained_statistics_survive_a_model_built_with_training_false(tmp_path):
    x = RNG.normal(2.0, 3.0, size=(32, 10)).astype("float32")
    model = models.CustomBatchNormModel(units=4)
    model(x[:1], training=False)
    for _ in range(5):
        model(x, training=True)  # what a training loop does: update the moving statistics
    model.save(tmp_path / "bn.keras")
    loaded = keras.models.load_model(tmp_path / "bn.keras", safe_mode=True)
    assert _moving_stats(loaded).keys() == _moving_stats(model).keys()
    for key, value in _moving_stats(loaded).items():
        np.testing.assert_array_equal(value, _moving_stats(model)[key])
        assert not np.all(value == (0 if "mean" in key else 1))


def test_an_unbuilt_subclassed_model_saves_no_weights(tmp_path):
    """What does lose state on Keras 3: saving before any call (Keras only warns)."""
    model = models.CustomBatchNormModel(units=4)
    with pytest.warns(UserWarning, match="not yet been built"):
        model.save(tmp_path / "unbuilt.keras")
    loaded = keras.models.load_model(tmp_path / "unbuilt.keras", safe_mode=True)
    assert loaded.weights == []
    x = tf.constant(RNG.normal(size=(4, 10)).astype("float32"))
    assert not np.array_equal(loaded(x), model(x))  # each built with fresh random weights
