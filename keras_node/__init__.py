"""keras-node: neural ODE layers for Keras 3."""

import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_node runs on Keras' TensorFlow backend, but Keras is using "
        f"the {keras.backend.backend()!r} backend. Set the environment "
        "variable KERAS_BACKEND=tensorflow before importing keras."
    )

from keras_node.neural_ode import NeuralODE  # noqa: E402

__all__ = ["NeuralODE"]
__version__ = "0.1.0"
