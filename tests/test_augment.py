"""`NeuralODE(augment_dim=k)`: augmented neural ODEs (Dupont et al. 2019)."""

import keras
import numpy as np
import pytest
import scipy.linalg

from helpers import Linear, finite_difference_check, mlp_dynamics, sin
from keras_node import NeuralODE

# A 3x3 system on a 2D state augmented by one zero channel: the augmented
# channel feeds back into the state, so it changes the solution.
A = np.array([[-0.3, 1.0, 0.5], [-1.0, -0.2, 0.0], [0.8, 0.0, -0.1]])
H0 = np.array([[1.0, -0.5], [0.3, 2.0]])


def test_the_solution_is_the_augmented_systems_first_channels():
    ode = NeuralODE(Linear(A, dtype="float64"), t1=1.5, augment_dim=1,
                    rtol=1e-10, atol=1e-10, dtype="float64")
    padded = np.concatenate([H0, np.zeros((2, 1))], axis=1)
    expected = (padded @ scipy.linalg.expm(A * 1.5).T)[:, :2]
    np.testing.assert_allclose(ode(H0), expected, rtol=1e-8, atol=1e-8)


def test_images_gain_channels_and_save_at_keeps_the_time_axis():
    seen = []

    class Recording(keras.layers.Layer):
        def build(self, input_shape):
            seen.append(tuple(input_shape))
            self.conv = keras.layers.Conv2D(input_shape[-1], 3,
                                            padding="same")

        def call(self, h):
            return self.conv(h)

    ode = NeuralODE(Recording(), augment_dim=3, save_at=[0.5, 1.0])
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 4)).astype("float32")
    assert ode(x).shape == (2, 2, 5, 5, 4)
    assert seen[0][1:] == (5, 5, 7)  # the dynamics see 4 + 3 channels
    assert ode.compute_output_shape((None, 5, 5, 4)) == (None, 2, 5, 5, 4)


def test_gradients_through_the_augmented_channels():
    keras.utils.set_random_seed(4)
    ode = NeuralODE(mlp_dynamics(6, 5, dtype="float64"), t1=1.0,
                    augment_dim=2, rtol=1e-10, atol=1e-10, dtype="float64")
    h0 = np.random.default_rng(4).normal(size=(3, 3))
    finite_difference_check(ode, h0, lambda h: keras.ops.sum(sin(h)))


def test_config_round_trip_and_saving(tmp_path):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((3,))
    ode = NeuralODE(mlp_dynamics(8, 5), augment_dim=2, name="ode")
    model = keras.Model(inputs, ode(inputs))
    assert ode.get_config()["augment_dim"] == 2
    assert NeuralODE.from_config(ode.get_config()).augment_dim == 2
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    x = np.random.default_rng(5).normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError),
                                          (True, TypeError),
                                          ("2", TypeError)])
def test_bad_augment_dim(value, error):
    with pytest.raises(error, match=r"argument `augment_dim`, expected a "
                       rf"non-negative integer. Received: augment_dim="
                       rf"{value!r}"):
        NeuralODE(mlp_dynamics(4, 2), augment_dim=value)


def test_dynamics_must_output_the_augmented_width():
    with pytest.raises(ValueError, match=r"argument `dynamics`, expected a "
                       r"layer whose output \(the time derivative\) has the "
                       r"shape of its input, the state \(None, 4\) \(3 "
                       r"channels and augment_dim=1\)"):
        NeuralODE(mlp_dynamics(4, 3), augment_dim=1)(keras.Input((3,)))


def test_augment_dim_needs_a_known_number_of_channels():
    with pytest.raises(ValueError, match=r"argument `augment_dim`, expected 0 "
                       r"for inputs whose last axis \(the channels\) has no "
                       r"known size, here \(None, None\). Received: "
                       r"augment_dim=1"):
        NeuralODE(mlp_dynamics(4, 3), augment_dim=1)(keras.Input((None,)))
