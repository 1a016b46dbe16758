"""Test set-up: the backend, quiet logs, two CPU devices.

The suite runs on Keras' TensorFlow backend by default and unchanged on JAX
(`KERAS_BACKEND=jax .venv-jax/bin/python -m pytest`, see tools/jax-venv.sh).
Tests that mean something on one backend only carry `tensorflow_only` or
`jax_only` (below), with the reason.
"""

import gc
import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ["KERAS_BACKEND"] == "jax":
    # Data-parallel tests need two devices: XLA splits the CPU in two (JAX
    # still places arrays and runs programs on the first one by default).
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"),
        "--xla_force_host_platform_device_count=2"]))

import keras  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()
ROOT = pathlib.Path(__file__).resolve().parents[1]

if BACKEND == "tensorflow":
    import tensorflow as tf

    # MirroredStrategy tests need two devices; split the CPU before TF
    # starts.
    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    # What a failed solve raises (an op's assertion).
    SOLVE_ERROR = tf.errors.InvalidArgumentError
else:
    import jax

    # The float64 tests compare with ground truth to 1e-10 and below.
    jax.config.update("jax_enable_x64", True)
    SOLVE_ERROR = RuntimeError  # raised after an eager solve


@pytest.fixture(autouse=True, scope="module")
def _earlier_modules_frozen():
    """Keeps what earlier test modules left alive out of the garbage
    collector's passes: collects it once, then freezes it (`gc.freeze`).
    TensorFlow keeps every model that `fit` trained (its train graph,
    tensorflow/tensorflow#97697), millions of objects late in the suite,
    which every full collection scanned: most of the time of the tests
    that trace large graphs there (a SavedModel export's, profiled in a
    full run on 2026-12-07)."""
    gc.collect()
    gc.freeze()


def xla(layer):
    """`layer`'s call compiled by XLA, where assertions cannot raise:
    `tf.function(jit_compile=True)` or `jax.jit` of its stateless call."""
    if BACKEND == "tensorflow":
        return tf.function(layer, jit_compile=True)
    call = jax.jit(lambda trainable, others, x: layer.stateless_call(
        trainable, others, x)[0])
    return lambda x: call([v.value for v in layer.trainable_variables],
                          [v.value for v in layer.non_trainable_variables],
                          keras.ops.convert_to_tensor(x))


def graph(layer):
    """`layer`'s call traced: `tf.function` (graph mode, assertions raise),
    or on JAX the eager call (a traced JAX function cannot raise)."""
    return tf.function(layer) if BACKEND == "tensorflow" else layer


def tensorflow_only(reason):
    """Marks a test (or, as `pytestmark`, a module) as TensorFlow's alone."""
    return pytest.mark.skipif(BACKEND != "tensorflow",
                              reason=f"TensorFlow backend only: {reason}")


def jax_only(reason):
    return pytest.mark.skipif(BACKEND != "jax",
                              reason=f"JAX backend only: {reason}")


@pytest.fixture(scope="session")
def manual_dir():
    path = pathlib.Path(os.environ.get("KERAS_NODE_MNIST_DIR",
                                       ROOT.parent / "shared/data/mnist"))
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the canonical MNIST files are not in {path}; set "
                    "KERAS_NODE_MNIST_DIR")
    return path


@pytest.fixture(scope="session")
def data_args(manual_dir, tmp_path_factory):
    """Example options for the canonical files and a prepared tfds cache."""
    from examples.mnist_data import load_mnist

    data_dir = tmp_path_factory.mktemp("tfds")
    load_mnist(manual_dir, data_dir, limit=10)  # prepare it once
    return ["--manual-dir", str(manual_dir), "--data-dir", str(data_dir)]


@pytest.fixture(scope="session")
def full_mnist(manual_dir, data_args):
    from examples.mnist_data import load_mnist

    return load_mnist(manual_dir, data_args[3])
