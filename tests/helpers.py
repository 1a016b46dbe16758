"""Small dynamics with known solutions, shared by the tests."""

import keras
import numpy as np
import scipy.linalg


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


def kinetic_energy_after_fit(weight, seed=8):
    """The dynamics' kinetic energy after fitting `h(1) = 2 h(0)`.

    Trains a `NeuralODE` regularised with `kinetic_energy=weight` on random
    3-vectors; returns the mean kinetic energy of their paths afterwards.
    The straight path, `h(t) = (1 + t) h(0)`, has the least energy that
    reaches the target, `|h(0)|^2`; without the regulariser nothing favours
    it.
    """
    from keras_node import NeuralODE

    x = np.random.default_rng(seed).normal(size=(64, 3)).astype("float32")
    keras.utils.set_random_seed(seed)
    ode = NeuralODE(mlp_dynamics(16, 3), t1=1.0, kinetic_energy=weight)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, ode(inputs))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(x, 2 * x, batch_size=16, epochs=20, verbose=0)
    probe = NeuralODE(ode.dynamics, t1=1.0, kinetic_energy=1.0)
    probe(x)
    return float(probe.losses[0])


def linear_gradients(a, h0, w, t1):
    """Gradients of `sum(w * h(t1))` for `Linear(a)` from `h0` at time 0.

    `h(t1) = h0 E^T`, `E = expm(a t1)`: dL/dh0 = w E, and dL/da_ij is
    `sum(w * h0 L(a t1, t1 e_ij)^T)`, L the Frechet derivative of expm.
    Returns `(dL/dh0, dL/da^T)` (the layer's weight is `a^T`).
    """
    da = np.zeros_like(a, dtype=float)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            unit = np.zeros_like(a, dtype=float)
            unit[i, j] = t1
            frechet = scipy.linalg.expm_frechet(a * t1, unit,
                                                compute_expm=False)
            da[i, j] = np.sum(w * (h0 @ frechet.T))
    return w @ scipy.linalg.expm(a * t1), da.T
