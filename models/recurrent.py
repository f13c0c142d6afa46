"""A GRU for sequences (batch, time, features): recurrent weights and state handling."""

import keras


@keras.saving.register_keras_serializable(package="resumable_trainer")
class GRURegressor(keras.Model):
    """GRU(units) over the sequence -> Dense(output_units) on the last state."""

    def __init__(self, units: int = 32, output_units: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.output_units = int(output_units)
        self.gru = keras.layers.GRU(self.units, name="gru")
        self.head = keras.layers.Dense(self.output_units, name="head")

    def call(self, inputs, training=False):
        return self.head(self.gru(inputs, training=training))

    def get_config(self):
        return {**super().get_config(), "units": self.units, "output_units": self.output_units}
