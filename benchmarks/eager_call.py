"""Eager calls of a NeuralODE (outside `fit`, `predict` and `jax.jit`); JSON.

    python -m benchmarks.eager_call [--calls 10]
    KERAS_BACKEND=jax .venv-jax/bin/python -m benchmarks.eager_call

What a notebook does: `model(x)` on a batch, again and again. Two models
on the Keras backend of the environment: `mlp`, a `NeuralODE` of an MLP
(2 -> 50 tanh -> 2) at batch 64, and `mnist`, the README's MNIST model at
batch 32. For each, the first call (which builds, traces and compiles what
it needs) and the median of the `--calls` after it. Prints one JSON object
with the machine.
"""

import argparse
import pathlib
import time

from benchmarks.machine import describe, provenance
from benchmarks.peers.run import print_json


def models():
    """`{name: (model, input)}`."""
    import keras
    import numpy as np

    from examples.mnist_common import build_model
    from keras_node import NeuralODE

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    mlp = NeuralODE(keras.Sequential([
        keras.layers.Dense(50, activation="tanh"), keras.layers.Dense(2)]))
    return {
        "mlp": (mlp, rng.normal(size=(64, 2)).astype("float32")),
        "mnist": (build_model(),
                  rng.uniform(size=(32, 28, 28, 1)).astype("float32")),
    }


def measure(model, x, calls):
    import numpy as np

    times = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        np.asarray(model(x))  # waits for the result
        times.append(time.perf_counter() - start)
    return {"first_call_s": times[0],
            "median_call_s": float(np.median(times[1:]))}


def main(argv=None):
    import keras

    from examples.options import check_ranges

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10,
                        help="calls timed after the first (default: "
                        "%(default)s)")
    parser.add_argument("--json-out", type=pathlib.Path)
    args = parser.parse_args(argv)
    check_ranges(parser, args, positive=("calls",))
    result = {"benchmark": "eager_call", "backend": keras.backend.backend(),
              "calls": args.calls,
              "models": {name: measure(model, x, args.calls)
                         for name, (model, x) in models().items()},
              "machine": describe(), **provenance()}
    print_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
