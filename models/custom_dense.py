"""The article's first example: a custom dense layer and a two-layer subclassed model.

Faithful to the article's design (weights made in `build`, the activation kept in the
config) but correct on Keras 3: the activation is stored by name, because
`keras.activations.serialize` raises on a plain string and the article's `from_config`
would pass a function back into the config.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="resumable_trainer")
class CustomDense(keras.layers.Layer):
    """y = activation(x @ w + b), with `w` and `b` created on first call."""

    def __init__(self, units: int, activation: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation_name = activation
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        self.w = self.add_weight(
            name="w", shape=(input_shape[-1], self.units), initializer="random_normal"
        )
        self.b = self.add_weight(name="b", shape=(self.units,), initializer="zeros")

    def call(self, inputs):
        return self.activation(tf.matmul(inputs, self.w) + self.b)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "activation": self.activation_name}


@keras.saving.register_keras_serializable(package="resumable_trainer")
class MySubclassedModel(keras.Model):
    """The article's model: CustomDense(num_units, activation) -> CustomDense(output_units)."""

    def __init__(
        self, num_units: int = 32, activation: str | None = "relu", output_units: int = 1, **kwargs
    ):
        super().__init__(**kwargs)
        self.num_units = int(num_units)
        self.activation_name = activation
        self.output_units = int(output_units)
        self.dense_1 = CustomDense(self.num_units, activation=activation, name="dense_1")
        self.dense_2 = CustomDense(self.output_units, name="dense_2")

    def call(self, inputs):
        return self.dense_2(self.dense_1(inputs))

    def get_config(self):
        return {
            **super().get_config(),
            "num_units": self.num_units,
            "activation": self.activation_name,
            "output_units": self.output_units,
        }
