"""keras-node: neural ODE layers for Keras 3."""

from keras_node.neural_ode import NeuralODE

__all__ = ["NeuralODE"]
__version__ = "0.1.0"
