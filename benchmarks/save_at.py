"""Train steps of a small NeuralODE against its number of output times; JSON.

    python -m benchmarks.save_at [--times 1 10 40] \\
        [--solver rk4 --num-steps 20]
    KERAS_BACKEND=jax .venv-jax/bin/python -m benchmarks.save_at

The model: `NeuralODE` of an MLP (2 -> 50 tanh -> 2) from t0 = 0, saved at
`n` evenly spaced times in (0, 1] (`save_at`), batch 20, mean squared error,
Adam, `train_on_batch`, on the Keras backend of the environment. Each `n`
runs in a fresh process: the first step (which traces and compiles the
step, and grows with whatever the program repeats per output time) and the
median of the `--steps` after it. `--solver`, `--gradient` and `--num-steps`
(over the whole span) as in `train_step.py`. Prints one JSON object with the
machine.
"""

import argparse
import json
import pathlib
import sys
import time

from benchmarks.machine import describe, provenance
from benchmarks.peers.run import print_json, run_json
from benchmarks.train_step import SOLVE_DEFAULTS, add_solve_arguments


def measure(n, solve, steps):
    import keras
    import numpy as np

    from examples.mnist_common import solver_and_gradient
    from keras_node import NeuralODE

    keras.utils.set_random_seed(0)
    dynamics = keras.Sequential([keras.layers.Dense(50, activation="tanh"),
                                 keras.layers.Dense(2)])
    solver, gradient = solver_and_gradient(
        solve["solver"], solve["num_steps"], solve["gradient"])
    ode = NeuralODE(dynamics, t1=1.0, solver=solver, gradient=gradient,
                    save_at=[float(t) for t in np.linspace(0, 1, n + 1)[1:]])
    inputs = keras.Input((2,))
    model = keras.Model(inputs, ode(inputs))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 2)).astype("float32")
    y = rng.normal(size=(20, n, 2)).astype("float32")
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return {"output_times": n, "first_step_s": times[0],
            "median_step_s": float(np.median(times[1:])),
            "nfe_forward": float(ode.num_forward_evals),
            "nfe_backward": float(ode.num_backward_evals),
            "backend": keras.backend.backend(),
            "keras": keras.__version__}


def main(argv=None):
    from examples.options import check_ranges

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--times", type=int, nargs="+", default=[1, 10, 40],
                        help="numbers of output times (default: "
                        "%(default)s)")
    add_solve_arguments(parser)
    parser.add_argument("--steps", type=int, default=15,
                        help="steps timed after the first (default: "
                        "%(default)s)")
    parser.add_argument("--json-out", type=pathlib.Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_ranges(parser, args, positive=("num_steps", "steps"))
    if min(args.times) < 1:
        parser.error("--times must be positive integers")
    solve = {key: getattr(args, key) for key in SOLVE_DEFAULTS}
    if args.child is not None:
        print(json.dumps(measure(args.child, solve, args.steps)))
        return None
    runs = []
    for n in args.times:
        run = run_json(
            [sys.executable, "-m", "benchmarks.save_at", "--child", str(n),
             "--solver", args.solver, "--gradient", args.gradient,
             "--num-steps", str(args.num_steps), "--steps", str(args.steps)],
            f"{n} output times")
        if run is None:
            sys.exit(f"the run with {n} output times failed: see above.")
        runs.append(run)
    result = {"benchmark": "save_at", **solve, "steps": args.steps,
              "runs": runs,
              "machine": describe(), **provenance()}
    print_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
