"""Runs tests_jax/ on Keras' JAX backend, in the JAX environment.

TensorFlow Probability's JAX substrate needs tfp-nightly, which cannot share
an environment with the tensorflow-probability that the TensorFlow backend
uses; `tools/jax-venv.sh` makes `.venv-jax` (CI does). Without it these tests
are skipped.
"""

import os
import pathlib
import subprocess

import keras
import numpy as np
import pytest

from helpers import small_conv_dynamics
from keras_node import NeuralODE

ROOT = pathlib.Path(__file__).resolve().parents[1]
JAX_PYTHON = pathlib.Path(os.environ.get(
    "KERAS_NODE_JAX_PYTHON", ROOT / ".venv-jax" / "bin" / "python"))


def _mnist_dir():
    return os.environ.get("KERAS_NODE_MNIST_DIR",
                          ROOT.parent / "shared" / "data" / "mnist")


def test_jax_backend(tmp_path):
    if not JAX_PYTHON.exists():
        pytest.skip(f"no JAX environment at {JAX_PYTHON}; run "
                    "tools/jax-venv.sh")
    # A model saved on TensorFlow, for the JAX side to load.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 1)(inputs)
    x = NeuralODE(small_conv_dynamics(3))(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    saved = str(tmp_path / "model.keras")
    model.save(saved)
    images = np.random.default_rng(0).normal(size=(2, 5, 5, 2)).astype(
        "float32")
    np.save(saved + ".x.npy", images)
    np.save(saved + ".y.npy", model.predict(images, verbose=0))
    # The evaluation counts of one gradient, for the JAX side to match.
    ode = next(l for l in model.layers if isinstance(l, NeuralODE))
    import tensorflow as tf
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(images) ** 2)
    tape.gradient(loss, model.trainable_variables)
    np.save(saved + ".nfe.npy", [float(ode.num_forward_evals),
                                 float(ode.num_backward_evals)])

    result = subprocess.run(
        [str(JAX_PYTHON), "-m", "pytest", "-q", str(ROOT / "tests_jax")],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": "jax",
             "KERAS_NODE_TF_SAVED": saved, "JAX_PLATFORMS": "cpu",
             "KERAS_NODE_MNIST_DIR": str(_mnist_dir())})
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout

    # And back: the model trained a step on JAX loads here.
    trained = keras.models.load_model(saved + ".jax.keras", compile=False)
    expected = np.load(saved + ".jax.y.npy")
    assert not np.allclose(expected, np.load(saved + ".y.npy"))
    np.testing.assert_allclose(trained.predict(images, verbose=0), expected,
                               rtol=1e-4, atol=1e-5)
