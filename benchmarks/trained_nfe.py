"""A trained MNIST model under today's solver: NFE and accuracy. Prints JSON.

    python -m benchmarks.trained_nfe --manual-dir ../shared/data/mnist \
        --model runs/long/model.keras [--first-step-size 0.3]

Solves the trained model's ODE again with today's Dormand-Prince solver in
place of the one saved with the model: a fresh `DormandPrince` (today's
error control, the automatic first step unless `--first-step-size` gives
one, the saved solver's `max_num_steps`) with the layer's own tolerances,
over the official 10,000-image test split in batches of `--batch-size`
(128). Reports the test accuracy, the forward NFE per batch (mean and
largest) and the backward NFE of one cross-entropy gradient on the first
batch, with both solvers (`solver`, `saved_solver`). A model trained by an
older version of the package thus shows what the current solver makes of
it.
"""

import argparse
import json
import pathlib

import keras
import numpy as np
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
from benchmarks.machine import describe, provenance  # noqa: E402
from examples import mnist_data  # noqa: E402
from examples.mnist_common import ode_layer  # noqa: E402

from keras_node import solvers  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manual-dir", type=pathlib.Path, default=None)
    parser.add_argument("--model", type=pathlib.Path, required=True)
    parser.add_argument("--first-step-size", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    x, y = mnist_data.load_mnist(args.manual_dir)["test"]
    model = keras.models.load_model(args.model)
    ode = ode_layer(model)
    saved_solver = ode.solver
    # Read at each (eager) call, so this changes the solves below.
    ode.solver = solvers.DormandPrince(
        first_step_size=args.first_step_size,
        max_num_steps=saved_solver.max_num_steps)
    forward, correct = [], 0
    for start in range(0, len(x), args.batch_size):
        logits = model(x[start:start + args.batch_size])
        forward.append(float(ode.num_forward_evals))
        correct += int(np.sum(np.argmax(logits, -1)
                              == y[start:start + args.batch_size]))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y[:args.batch_size], model(x[:args.batch_size]), from_logits=True))
    tape.gradient(loss, model.trainable_variables)
    result = {
        "benchmark": "trained_nfe", "model": str(args.model),
        "first_step_size": args.first_step_size,
        "batch_size": args.batch_size,
        "solver": repr(ode.solver), "saved_solver": repr(saved_solver),
        "rtol": ode.rtol, "atol": ode.atol, "gradient": repr(ode.gradient),
        "test_accuracy": 100.0 * correct / len(x),
        "nfe_forward_mean": float(np.mean(forward)),
        "nfe_forward_max": max(forward),
        "nfe_backward_first_batch": float(ode.num_backward_evals),
        "machine": describe(), **provenance(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
