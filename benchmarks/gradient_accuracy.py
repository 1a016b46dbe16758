"""How accurate is the adjoint gradient of the MNIST model? Prints JSON.

    python -m benchmarks.gradient_accuracy --manual-dir ../shared/data/mnist \
        [--model runs/long/model.keras] [--tolerances 1e-3 1e-4]

For one batch of 128 training images, compares three gradients of the loss
with respect to all weights, by cosine similarity and relative error:

- `adjoint`: what training uses, the layer's adjoint at `rtol = atol = tol`;
- `discrete`: `gradient="backprop"`, backpropagation through the forward
  solver's own steps at the same tolerance, the exact gradient of the loss
  as computed;
- `exact`: the adjoint at 1e-7, the gradient of the exact ODE flow.

`--model` takes a trained `.keras` model (the example's output); without it
the model is freshly initialised.
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
from examples.mnist_common import build_model, ode_layer  # noqa: E402


def gradients(model, x, y, tol, gradient="adjoint"):
    """The loss gradient over `model`'s weights, solved at `tol`."""
    copy = build_model(rtol=tol, atol=tol, gradient=gradient)
    copy.set_weights(model.get_weights())
    ode = ode_layer(copy)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, copy(x), from_logits=True))
    grads = tape.gradient(loss, copy.trainable_variables)
    flat = np.concatenate([g.numpy().ravel() for g in grads])
    return flat, float(loss), float(ode.num_backward_evals)


def compare(a, b):
    return {"cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
            "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(b))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manual-dir", type=pathlib.Path, default=None)
    parser.add_argument("--model", type=pathlib.Path, default=None)
    parser.add_argument("--tolerances", type=float, nargs="+",
                        default=[1e-3, 1e-4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    arrays = mnist_data.load_mnist(args.manual_dir, limit=1024, seed=args.seed)
    x, y = arrays["train"][0][:128], arrays["train"][1][:128]
    keras.utils.set_random_seed(args.seed)
    model = (keras.models.load_model(args.model) if args.model
             else build_model())
    exact, loss, _ = gradients(model, x, y, 1e-7)
    rows = []
    for tol in args.tolerances:
        adjoint, _, backward_evals = gradients(model, x, y, tol)
        discrete, _, _ = gradients(model, x, y, tol, gradient="backprop")
        rows.append({
            "tol": tol, "nfe_backward": backward_evals,
            "adjoint_vs_discrete": compare(adjoint, discrete),
            "adjoint_vs_exact": compare(adjoint, exact),
            "discrete_vs_exact": compare(discrete, exact),
        })
    result = {"benchmark": "gradient_accuracy",
              "model": str(args.model or "initial"), "seed": args.seed,
              "loss": loss,
              "rows": rows, "machine": describe(), **provenance()}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
