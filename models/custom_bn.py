"""The article's second example: Dense + BatchNormalization with `training` passed through.

A head layer maps to the data's output size so the model fits any task. The moving mean
and variance are non-trainable weights: checkpoints and `.keras` files carry them.
"""

import keras


@keras.saving.register_keras_serializable(package="resumable_trainer")
class CustomBatchNormModel(keras.Model):
    """Dense(units) -> BatchNormalization -> activation -> Dense(output_units)."""

    def __init__(
        self, units: int = 32, activation: str | None = "relu", output_units: int = 1, **kwargs
    ):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation_name = activation
        self.output_units = int(output_units)
        self.dense = keras.layers.Dense(self.units, name="dense")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.act = keras.layers.Activation(activation or "linear", name="act")
        self.head = keras.layers.Dense(self.output_units, name="head")

    def call(self, inputs, training=False):
        x = self.dense(inputs)
        x = self.bn(x, training=training)  # batch statistics in training, moving ones otherwise
        return self.head(self.act(x))

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": self.activation_name,
            "output_units": self.output_units,
        }
