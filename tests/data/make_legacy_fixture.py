"""Saves tests/data/legacy_v0_1_0.keras with keras-node 0.1.0's flat config."""
import os
os.environ["KERAS_BACKEND"] = "tensorflow"
import keras, numpy as np
from keras_node import NeuralODE
keras.utils.set_random_seed(0)
inputs = keras.Input((3,))
dyn = keras.Sequential([keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
ode = NeuralODE(dyn, t0=0.0, t1=1.5, rtol=1e-5, atol=1e-6, adjoint_rtol=1e-4,
                adjoint_atol=1e-5, adjoint_norm="full", first_step_size=0.01,
                max_num_steps=500, save_at=[0.5, 1.5], name="ode")
model = keras.Model(inputs, ode(inputs))
x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
y = model.predict(x, verbose=0)
model.save("tests/data/legacy_v0_1_0.keras")
np.savez("tests/data/legacy_v0_1_0.npz", x=x, y=y)
print(ode.get_config())
