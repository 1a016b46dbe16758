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


def gradients(ode, h0, loss_fn):
    """`[dL/dh0] + dL/d(weights)` by TensorFlow's tape."""
    import tensorflow as tf

    h0 = tf.constant(h0)
    with tf.GradientTape() as tape:
        tape.watch(h0)
        loss = loss_fn(ode(h0))
    return tape.gradient(loss, [h0] + ode.trainable_variables)


def finite_difference_check(ode, h0, loss_fn, eps=1e-6, samples=6, seed=0,
                            rtol=1e-4, atol=1e-6):
    """Compares each gradient with central differences on a few entries."""
    import tensorflow as tf

    analytic = gradients(ode, h0, loss_fn)
    rng = np.random.default_rng(seed)
    loss_of = tf.function(lambda h: loss_fn(ode(h)))
    loss = lambda: float(loss_of(tf.constant(h0)))
    for variable, grad in zip(ode.trainable_variables, analytic[1:]):
        flat = variable.numpy().reshape(-1)
        for index in rng.choice(flat.size, min(samples, flat.size),
                                replace=False):
            shifted = flat.copy()
            shifted[index] += eps
            variable.assign(shifted.reshape(variable.shape))
            up = loss()
            shifted[index] -= 2 * eps
            variable.assign(shifted.reshape(variable.shape))
            down = loss()
            variable.assign(flat.reshape(variable.shape))
            np.testing.assert_allclose(
                np.reshape(grad, -1)[index], (up - down) / (2 * eps),
                rtol=rtol, atol=atol, err_msg=variable.path)
    flat = h0.reshape(-1)
    for index in rng.choice(flat.size, samples, replace=False):
        shifted = flat.copy()
        shifted[index] += eps
        up = float(loss_of(tf.constant(shifted.reshape(h0.shape))))
        shifted[index] -= 2 * eps
        down = float(loss_of(tf.constant(shifted.reshape(h0.shape))))
        np.testing.assert_allclose(
            np.reshape(analytic[0], -1)[index], (up - down) / (2 * eps),
            rtol=rtol, atol=atol, err_msg="initial state")
