"""Trains small models on JAX without float64 (JAX's default), every
UserWarning an error: the solvers must not ask JAX for float64."""

import warnings

import keras
import numpy as np

from keras_node import ContinuousNormalizingFlow, NeuralODE
from keras_node.callbacks import LogEvaluationCounts

warnings.simplefilter("error", UserWarning)
x = np.random.default_rng(0).normal(size=(16, 2)).astype("float32")


def dynamics(width=2):
    return keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(width)])


for kwargs in [{}, dict(solver="tsit5", gradient="backprop"),
               dict(solver="bosh3", save_at=[0.5, 1.0]),
               dict(solver="rk4", gradient="backprop"),
               dict(augment_dim=1, kinetic_energy=0.1)]:
    inputs = keras.Input((2,))
    ode = NeuralODE(dynamics(2 + kwargs.get("augment_dim", 0)), **kwargs)
    outputs = ode(inputs)
    if "save_at" in kwargs:
        outputs = outputs[:, -1]
    model = keras.Model(inputs, outputs)
    model.compile("adam", "mse")
    model.fit(x, x, epochs=1, verbose=0, callbacks=[LogEvaluationCounts()])
flow = ContinuousNormalizingFlow(dynamics(), trace="hutchinson")
flow.compile("adam")
flow.fit(x, epochs=1, verbose=0)
flow.sample(4)
print("trained without warnings")
