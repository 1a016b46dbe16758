"""Small dynamics with known solutions, shared by the tests."""

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="keras_node_tests")
class Linear(keras.layers.Layer):
    """`dh/dt = h A^T`, so `h(t) = h0 expm(A t)^T`."""

    def __init__(self, matrix, **kwargs):
        super().__init__(**kwargs)
        self.matrix = np.asarray(matrix).tolist()

    def build(self, input_shape):
        self.a_transposed = self.add_weight(
            shape=(len(self.matrix), len(self.matrix)),
            initializer=keras.initializers.Constant(np.transpose(self.matrix)),
            name="a_transposed",
        )

    def call(self, h):
        return keras.ops.matmul(h, self.a_transposed)

    def get_config(self):
        return {**super().get_config(), "matrix": self.matrix}


@keras.saving.register_keras_serializable(package="keras_node_tests")
class CosineRate(keras.layers.Layer):
    """`dh/dt = w cos(t) h`, so `h(t1) = h0 exp(w (sin t1 - sin t0))`."""

    def build(self, input_shape):
        self.w = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(0.7), name="w"
        )

    def call(self, h, t):
        return self.w * keras.ops.cos(keras.ops.cast(t, h.dtype)) * h


def small_conv_dynamics(channels=4, dtype=None):
    return keras.Sequential(
        [
            keras.layers.Conv2D(channels, 3, padding="same",
                                activation="tanh", dtype=dtype),
            keras.layers.Conv2D(channels, 3, padding="same",
                                activation="tanh", dtype=dtype),
        ]
    )


def mlp_dynamics(width, dim, dtype=None):
    return keras.Sequential(
        [
            keras.layers.Dense(width, activation="tanh", dtype=dtype),
            keras.layers.Dense(dim, dtype=dtype),
        ]
    )
