"""keras-node: neural ODE layers for Keras 3."""

import keras

if keras.backend.backend() not in ("tensorflow", "jax"):
    raise ImportError(
        "keras_node runs on Keras' TensorFlow or JAX backend, but Keras is "
        f"using the {keras.backend.backend()!r} backend. Set the environment "
        "variable KERAS_BACKEND=tensorflow (or jax) before importing keras."
    )

from keras_node import callbacks, gradients, solvers  # noqa: E402
from keras_node.neural_ode import NeuralODE  # noqa: E402
from keras_node.normalizing_flow import ContinuousNormalizingFlow  # noqa: E402

__all__ = ["ContinuousNormalizingFlow", "NeuralODE", "callbacks",
           "gradients", "solvers"]
__version__ = "0.2.0.dev0"
