"""Test set-up: TensorFlow backend, quiet logs, two logical CPU devices."""

import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# MirroredStrategy tests need two devices; split the CPU before TF starts.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import mnist  # noqa: E402


@pytest.fixture(scope="session")
def manual_dir():
    path = pathlib.Path(os.environ.get(mnist.MANUAL_DIR_ENV,
                                       ROOT.parent / "shared/data/mnist"))
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the canonical MNIST files are not in {path}; set "
                    f"{mnist.MANUAL_DIR_ENV}")
    return path


@pytest.fixture(scope="session")
def data_args(manual_dir, tmp_path_factory):
    """Example options for the canonical files and a prepared tfds cache."""
    data_dir = tmp_path_factory.mktemp("tfds")
    mnist.load_mnist(manual_dir, data_dir, limit=10)  # prepare it once
    return ["--manual-dir", str(manual_dir), "--data-dir", str(data_dir)]


@pytest.fixture(scope="session")
def full_mnist(manual_dir, data_args):
    return mnist.load_mnist(manual_dir, data_args[3])
