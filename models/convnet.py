"""A small convnet for image data; flat inputs are reshaped to `image_shape` first."""

import keras


@keras.saving.register_keras_serializable(package="resumable_trainer")
class SmallConvNet(keras.Model):
    """Reshape -> Conv2D -> BatchNorm -> Conv2D -> GlobalAveragePooling -> Dropout -> Dense."""

    def __init__(
        self,
        filters: int = 16,
        image_shape: tuple[int, int, int] | list[int] = (8, 8, 1),
        rate: float = 0.1,
        output_units: int = 10,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.rate = float(rate)
        self.output_units = int(output_units)
        self.reshape = keras.layers.Reshape(self.image_shape, name="reshape")
        self.conv1 = keras.layers.Conv2D(self.filters, 3, padding="same", name="conv1")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.conv2 = keras.layers.Conv2D(
            2 * self.filters, 3, padding="same", activation="relu", name="conv2"
        )
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.drop = keras.layers.Dropout(self.rate, name="dropout")
        self.head = keras.layers.Dense(self.output_units, name="head")

    def call(self, inputs, training=False):
        x = self.reshape(inputs)
        x = keras.activations.relu(self.bn(self.conv1(x), training=training))
        x = self.pool(self.conv2(x))
        return self.head(self.drop(x, training=training))

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "image_shape": list(self.image_shape),
            "rate": self.rate,
            "output_units": self.output_units,
        }
