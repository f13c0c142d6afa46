"""Subclassed models written the way users write them, not the way our models/ are.

Each keeps its layers in a structure that TensorFlow's object graph does not follow on
Keras 3 (lists, tuples, dicts, nested Sequentials, layers made in build()), or holds state a
resume must carry (a non-trainable counter, BatchNorm statistics, Dropout's seed state).
Trained with `model=custom model._target_=user_models.<Class>` (tests put tests/ on
PYTHONPATH). All take `units` and `output_units`, as the config passes them.
"""

from __future__ import annotations

import keras

_PKG = "user_models"


class _Base(keras.Model):
    def __init__(self, units: int = 16, output_units: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.units, self.output_units = units, output_units

    def get_config(self):
        return {**super().get_config(), "units": self.units, "output_units": self.output_units}


@keras.saving.register_keras_serializable(package=_PKG)
class LayerList(_Base):
    """Hidden layers and their BatchNorms in two plain lists."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = [keras.layers.Dense(self.units, activation="relu") for _ in range(2)]
        self.norms = [keras.layers.BatchNormalization() for _ in range(2)]
        self.out = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        for dense, norm in zip(self.hidden, self.norms, strict=True):
            x = norm(dense(x), training=training)
        return self.out(x)


@keras.saving.register_keras_serializable(package=_PKG)
class TupleBlocks(_Base):
    """Residual blocks as a list of (Dense, BatchNormalization, Dropout) tuples: the issue's case."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.layers.Dense(self.units)
        self.blocks = [
            (
                keras.layers.Dense(self.units, activation="relu"),
                keras.layers.BatchNormalization(),
                keras.layers.Dropout(0.2),
            )
            for _ in range(2)
        ]
        self.head = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        x = self.stem(x)
        for dense, norm, drop in self.blocks:
            x = x + drop(norm(dense(x), training=training), training=training)
        return self.head(x)


@keras.saving.register_keras_serializable(package=_PKG)
class LayerDict(_Base):
    """Branches in a dict, one a keras.Sequential holding BatchNormalization and Dropout."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.branches = {
            "wide": keras.layers.Dense(self.units, activation="relu"),
            "deep": keras.Sequential(
                [
                    keras.layers.Dense(self.units, activation="relu"),
                    keras.layers.BatchNormalization(),
                    keras.layers.Dropout(0.2),
                ]
            ),
        }
        self.head = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        return self.head(self.branches["wide"](x) + self.branches["deep"](x, training=training))


@keras.saving.register_keras_serializable(package=_PKG)
class NestedSequential(_Base):
    """A Sequential inside a Sequential inside the model, Dropout and BatchNorm deepest."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        inner = keras.Sequential(
            [keras.layers.BatchNormalization(), keras.layers.Dropout(0.3)], name="inner"
        )
        self.body = keras.Sequential(
            [keras.layers.Dense(self.units, activation="relu"), inner], name="body"
        )
        self.head = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        return self.head(self.body(x, training=training))


@keras.saving.register_keras_serializable(package=_PKG)
class FunctionalInside(_Base):
    """A functional sub-model (with BatchNorm), built in __init__, called by the subclass."""

    def __init__(self, num_features: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.num_features = num_features
        inputs = keras.Input((num_features,))
        h = keras.layers.Dense(self.units, activation="relu")(inputs)
        h = keras.layers.BatchNormalization()(h)
        self.encoder = keras.Model(inputs, h, name="encoder")
        self.head = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        return self.head(self.encoder(x, training=training))

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features}


@keras.saving.register_keras_serializable(package=_PKG)
class MadeInBuild(_Base):
    """Sub-layers created in build(), once the input width is known."""

    def build(self, input_shape):
        width = int(input_shape[-1])
        self.proj = [keras.layers.Dense(width) for _ in range(2)]
        self.norm = keras.layers.BatchNormalization()
        self.head = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        for proj in self.proj:
            x = x + proj(x)
        return self.head(self.norm(x, training=training))


@keras.saving.register_keras_serializable(package=_PKG)
class SharedLayer(_Base):
    """One Dense called twice (its weights once in model.variables), BatchNorm after each."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inp = keras.layers.Dense(self.units)
        self.shared = keras.layers.Dense(self.units, activation="tanh")
        self.norms = [keras.layers.BatchNormalization(), keras.layers.BatchNormalization()]
        self.head = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        x = self.inp(x)
        for norm in self.norms:
            x = norm(self.shared(x), training=training)
        return self.head(x)


@keras.saving.register_keras_serializable(package=_PKG)
class StepCounter(keras.layers.Layer):
    """Counts the training batches it has seen in a non-trainable add_weight variable."""

    def build(self, input_shape):
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")

    def call(self, x, training=False):
        if training:
            self.seen.assign_add(1.0)
        return x * (1.0 + 1e-3 * self.seen)  # the count changes the outputs: it must survive


@keras.saving.register_keras_serializable(package=_PKG)
class CountingModel(_Base):
    """Layers in a list, one of them a counter updated in call()."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stack = [keras.layers.Dense(self.units, activation="relu"), StepCounter()]
        self.head = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        for layer in self.stack:
            x = layer(x, training=training)
        return self.head(x)


PATTERNS = [
    "LayerList",
    "TupleBlocks",
    "LayerDict",
    "NestedSequential",
    "FunctionalInside",
    "MadeInBuild",
    "SharedLayer",
    "CountingModel",
]


@keras.saving.register_keras_serializable(package=_PKG)
class LateCounter(_Base):
    """Wrong on purpose: its counter layer is first called in training, so its variable is
    created after the model was built and the checkpoint laid out (the run must refuse it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(self.output_units)
        self.counter = StepCounter()

    def call(self, x, training=False):
        if training:
            x = self.counter(x, training=True)
        return self.dense(x)


@keras.saving.register_keras_serializable(package=_PKG)
class HiddenInNamespace(_Base):
    """Wrong on purpose: its BatchNormalization sits in a types.SimpleNamespace, which Keras
    does not track. The step uses it, but no checkpoint or export would hold its statistics."""

    def __init__(self, **kwargs):
        import types

        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(self.units, activation="relu")
        self.parts = types.SimpleNamespace(norm=keras.layers.BatchNormalization())
        self.out = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        return self.out(self.parts.norm(self.dense(x), training=training))


@keras.saving.register_keras_serializable(package=_PKG)
class SwallowsEverything(_Base):
    """Its constructor waits for something (a file, a server; here up to 60 s) with a bare
    `except:` around the wait that gives up on any error, as such code often has: a signal
    raised inside it is swallowed."""

    def __init__(self, **kwargs):
        import time

        super().__init__(**kwargs)
        print("waiting for the weights server", flush=True)
        for _ in range(600):
            try:
                time.sleep(0.1)
            except:  # noqa: E722
                break
        self.hidden = keras.layers.Dense(self.units, activation="relu")
        self.out = keras.layers.Dense(self.output_units)

    def call(self, x, training=False):
        return self.out(self.hidden(x))
