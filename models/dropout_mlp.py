"""An MLP with Dropout: its random state (Keras SeedGenerator) must survive a resume."""

import keras


@keras.saving.register_keras_serializable(package="resumable_trainer")
class DropoutMLP(keras.Model):
    """[Dense(units, activation) -> Dropout(rate)] x depth -> Dense(output_units)."""

    def __init__(
        self,
        units: int = 64,
        depth: int = 2,
        rate: float = 0.2,
        activation: str = "relu",
        output_units: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units, self.depth, self.rate = int(units), int(depth), float(rate)
        self.activation_name = activation
        self.output_units = int(output_units)
        self.hidden = [
            keras.layers.Dense(self.units, activation=activation, name=f"dense_{i}")
            for i in range(self.depth)
        ]
        self.drops = [
            keras.layers.Dropout(self.rate, name=f"dropout_{i}") for i in range(self.depth)
        ]
        self.head = keras.layers.Dense(self.output_units, name="head")

    def call(self, inputs, training=False):
        x = inputs
        for dense, drop in zip(self.hidden, self.drops, strict=True):
            x = drop(dense(x), training=training)
        return self.head(x)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "depth": self.depth,
            "rate": self.rate,
            "activation": self.activation_name,
            "output_units": self.output_units,
        }
