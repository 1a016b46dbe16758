"""Times a training step of the README's MNIST model and measures its memory.

    python -m benchmarks.train_step [--steps 20] [--tolerances 1e-3 1e-6]
        [--solver rk4 --gradient backprop --num-steps 4 --unroll]
        [--jit-compile]

Each tolerance runs in a fresh process (so that its peak resident memory is
its own): the model of `examples/mnist.py`, batch 128, Adam, on fixed random
images, `--warmup` untimed steps and then `--steps` timed ones. Prints one
JSON object: per tolerance the median and minimum step time, the forward and
backward evaluations of the last step, and the peak resident memory; plus
the settings, the machine, the date, the commit and the versions. A child
that fails stops it with the child's error output. The adjoint's promise is
that peak memory stays flat while the evaluations (solver steps) grow with
a tighter tolerance.
"""

import argparse
import json
import pathlib
import resource
import sys
import time

from benchmarks.machine import describe, provenance
from benchmarks.peers.run import run_json

ROOT = pathlib.Path(__file__).resolve().parents[1]


def measure(tolerance, steps, warmup, batch_size, adjoint_norm="seminorm",
            jit_compile=False, solver="dopri5", gradient="adjoint",
            num_steps=4, unroll=False):
    import keras
    import numpy as np
    import tensorflow as tf
    from examples.mnist_common import (build_model, ode_layer,
                                       solver_and_gradient)

    keras.utils.set_random_seed(0)
    solver_, gradient_ = solver_and_gradient(solver, num_steps, gradient,
                                             adjoint_norm, unroll)
    model = build_model(rtol=tolerance, atol=tolerance, solver=solver_,
                        gradient=gradient_)
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((batch_size, 28, 28, 1), dtype="float32"))
    y = tf.constant(rng.integers(0, 10, batch_size))
    ode = ode_layer(model)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "solver": repr(solver_),
        "gradient": repr(gradient_),
        "tolerance": tolerance if solver_.adaptive else None,
        "adjoint_norm": adjoint_norm,
        # What Keras ran: it declines XLA (with a warning) for a model with
        # a layer that does not support it, such as an adaptive solver's
        # NeuralODE on TensorFlow.
        "jit_compile": bool(model.jit_compile),
        "median_step_s": float(np.median(times)),
        "min_step_s": float(np.min(times)),
        "nfe_forward": float(ode.num_forward_evals),
        "nfe_backward": float(ode.num_backward_evals),
        "steps_accepted": float(ode.steps_accepted),
        "steps_rejected": float(ode.steps_rejected),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,
    }


SOLVE_DEFAULTS = {"solver": "dopri5", "gradient": "adjoint", "num_steps": 4}
# keras_node.solvers' names (not imported here: the parent processes need no
# backend).
SOLVERS = ["dopri5", "tsit5", "bosh3", "adaptive_heun", "euler", "midpoint",
           "rk4"]


def add_solve_arguments(parser):
    """`--solver`, `--gradient` and `--num-steps`: the model's solve, for
    `examples.mnist_common.solver_and_gradient` (defaults: `SOLVE_DEFAULTS`).
    """
    parser.add_argument("--solver", default=SOLVE_DEFAULTS["solver"],
                        choices=SOLVERS)
    parser.add_argument("--gradient", default=SOLVE_DEFAULTS["gradient"],
                        choices=["adjoint", "backprop"])
    parser.add_argument("--num-steps", type=int,
                        default=SOLVE_DEFAULTS["num_steps"],
                        help="steps of a fixed-step solver")


def machine():
    import tensorflow as tf

    return {**describe(),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "tensorflow": tf.__version__}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--tolerances", type=float, nargs="+",
                        default=[1e-3, 1e-6])
    parser.add_argument("--adjoint-norm", default="seminorm",
                        choices=["full", "seminorm"])
    parser.add_argument("--jit-compile", action="store_true",
                        help="ask Keras to compile the train step with XLA "
                        "(the JSON's jit_compile says whether it did)")
    add_solve_arguments(parser)
    parser.add_argument("--unroll", action="store_true",
                        help="unroll a fixed-step solver's steps")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.steps, args.warmup,
                                 args.batch_size, args.adjoint_norm,
                                 args.jit_compile, args.solver,
                                 args.gradient, args.num_steps,
                                 args.unroll)))
        return
    runs = []
    for tolerance in args.tolerances:
        run = run_json(
            [sys.executable, "-m", "benchmarks.train_step", "--child",
             str(tolerance),
             "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--batch-size", str(args.batch_size),
             "--adjoint-norm", args.adjoint_norm, "--solver", args.solver,
             "--gradient", args.gradient, "--num-steps", str(args.num_steps)]
            + ["--jit-compile"] * args.jit_compile
            + ["--unroll"] * args.unroll, f"tolerance {tolerance}")
        if run is None:  # run_json printed the child's stderr
            sys.exit(f"the run at tolerance {tolerance} failed: see above.")
        runs.append(run)
    print(json.dumps({"benchmark": "train_step",
                      "batch_size": args.batch_size, "steps": args.steps,
                      "warmup": args.warmup, "runs": runs,
                      "machine": machine(), **provenance()}, indent=2))


if __name__ == "__main__":
    main()
