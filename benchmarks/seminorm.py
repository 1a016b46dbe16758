"""Backward evaluations of the full-norm and the seminorm adjoint in training.

    python -m benchmarks.seminorm [--steps 300] [--tolerance 1e-3] [--atol A]

The problem is torchdiffeq's `ode_demo`: learn the dynamics of the spiral
`dy/dt = A y^3` from its trajectory. Each batch holds 20 pairs
`(y(s), y(s + span))` from the true trajectory, and a `NeuralODE` with an MLP
(2 -> 50 tanh -> 2 on `y^3`, torchdiffeq's) maps the first to the second;
the loss is the mean absolute error. Both norms train from the same
initialisation on the same batches, one after the other in this process,
and the JSON gives each one's mean forward and backward NFE per step over
the run, its final loss and the ratio of the seminorm's backward NFE to the
full norm's.

The MNIST model's figures come from `mnist_recipes.py one-epoch
--adjoint-norm {full,seminorm}` (see the README here): there the two norms
take the same steps.
"""

import argparse
import json
import time

import keras
import numpy as np

from benchmarks.machine import describe, provenance
from keras_node import NeuralODE, gradients

A = np.array([[-0.1, 2.0], [-2.0, -0.1]])


def spiral(num_points=1000, t_end=25.0):
    """The true trajectory at `num_points` times in `[0, t_end]` (float64)."""
    from scipy.integrate import solve_ivp

    times = np.linspace(0.0, t_end, num_points)
    solution = solve_ivp(lambda t, y: (y ** 3) @ A, (0.0, t_end), [2.0, 0.0],
                         t_eval=times, rtol=1e-10, atol=1e-10)
    return times, solution.y.T


class Cubed(keras.layers.Layer):
    def call(self, y):
        return y ** 3


def train(norm, pairs, span, rtol, atol, steps, batch_size, seed):
    keras.utils.set_random_seed(seed)
    dynamics = keras.Sequential([
        keras.Input((2,)), Cubed(),
        keras.layers.Dense(50, activation="tanh"), keras.layers.Dense(2)])
    ode = NeuralODE(dynamics, t1=span, rtol=rtol, atol=atol,
                    gradient=gradients.Adjoint(norm=norm))
    model = keras.Sequential([keras.Input((2,)), ode])
    model.compile(keras.optimizers.RMSprop(1e-3), loss="mae")
    start, end = pairs
    batches = np.random.default_rng(seed).integers(
        0, len(start), size=(steps, batch_size))
    forward, backward, losses = [], [], []
    began = time.perf_counter()
    for index in batches:
        logs = model.train_on_batch(start[index], end[index], return_dict=True)
        forward.append(float(logs["nfe_forward"]))
        backward.append(float(logs["nfe_backward"]))
        losses.append(float(logs["loss"]))
    return {
        "adjoint_norm": norm,
        "nfe_forward_mean": float(np.mean(forward)),
        "nfe_backward_mean": float(np.mean(backward)),
        "loss_first_20": float(np.mean(losses[:20])),
        "loss_last_20": float(np.mean(losses[-20:])),
        "seconds": time.perf_counter() - began,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--span", type=int, default=40,
                        help="trajectory points between a pair's two states")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="rtol, and atol unless --atol is given")
    parser.add_argument("--atol", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    times, states = spiral()
    pairs = (states[:-args.span].astype("float32"),
             states[args.span:].astype("float32"))
    span = float(times[args.span] - times[0])
    atol = args.tolerance if args.atol is None else args.atol
    runs = [train(norm, pairs, span, args.tolerance, atol, args.steps,
                  args.batch_size, args.seed)
            for norm in ("full", "seminorm")]
    print(json.dumps({
        "benchmark": "seminorm", "problem": "spiral (torchdiffeq ode_demo)",
        "steps": args.steps, "batch_size": args.batch_size,
        "seed": args.seed, "span": span, "rtol": args.tolerance,
        "atol": atol,
        "runs": runs,
        "backward_ratio_seminorm_to_full":
            runs[1]["nfe_backward_mean"] / runs[0]["nfe_backward_mean"],
        "machine": describe(), **provenance(),
    }, indent=2))


if __name__ == "__main__":
    main()
