"""The article's third example: a layer with its own `add_weight` variable.

`num_features=None` takes the size from the input on first call, so the model fits any
data; the variable is created with `add_weight`, so checkpoints and `.keras` files hold it.
"""

import keras


@keras.saving.register_keras_serializable(package="resumable_trainer")
class CustomVariableLayer(keras.layers.Layer):
    """Multiplies its input feature-wise by a trainable scale vector (initialised to ones)."""

    def __init__(self, num_features: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_features = None if num_features is None else int(num_features)

    def build(self, input_shape):
        n = self.num_features or int(input_shape[-1])
        if n != int(input_shape[-1]):
            raise ValueError(
                f"CustomVariableLayer: num_features={n} but the input has {input_shape[-1]} features"
            )
        self.custom_var = self.add_weight(name="custom_var", shape=(n,), initializer="ones")

    def call(self, inputs):
        return inputs * self.custom_var

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features}


@keras.saving.register_keras_serializable(package="resumable_trainer")
class CustomModelWithVariableLayer(keras.Model):
    """CustomVariableLayer -> Dense(output_units), as in the article."""

    def __init__(self, num_features: int | None = None, output_units: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.num_features = None if num_features is None else int(num_features)
        self.output_units = int(output_units)
        self.custom_layer = CustomVariableLayer(self.num_features, name="custom_layer")
        self.dense = keras.layers.Dense(self.output_units, name="dense")

    def call(self, inputs):
        return self.dense(self.custom_layer(inputs))

    def get_config(self):
        return {
            **super().get_config(),
            "num_features": self.num_features,
            "output_units": self.output_units,
        }
