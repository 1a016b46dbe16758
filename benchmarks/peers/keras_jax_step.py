"""Times a training step of ours on Keras' JAX backend (for GPUs).

    KERAS_BACKEND=jax python -m benchmarks.peers.keras_jax_step \
        [--steps 10] [--warmup 3] [--batch-size 128]
        [--solver rk4 --gradient backprop --num-steps 4 --unroll]

`benchmarks/train_step.py --child` times ours on TensorFlow, which the
borrowed GPU machines lack; this is the same measurement on the JAX backend,
where Keras compiles the whole train step with XLA: the model of
`examples/mnist_common.py: build_model`, Adam 1e-3, logit cross-entropy,
`train_on_batch` on the fixed random images of the peers (numpy seed 0).
Prints one JSON line with the fields of the peer scripts; `peak_device_mib`
is the accelerator's peak memory in use (null on the CPU).
"""

import argparse
import json
import os
import pathlib
import resource
import time

from benchmarks.machine import versions
from benchmarks.train_step import add_solve_arguments

ROOT = pathlib.Path(__file__).resolve().parents[2]


def measure(steps, warmup, batch_size, solver="dopri5", gradient="adjoint",
            num_steps=4, unroll=False):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras
    import numpy as np
    from examples.mnist_common import (build_model, ode_layer,
                                       solver_and_gradient)

    keras.utils.set_random_seed(0)
    solver_, gradient_ = solver_and_gradient(solver, num_steps, gradient,
                                             unroll=unroll)
    model = build_model(solver=solver_, gradient=gradient_)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ode = ode_layer(model)
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, 28, 28, 1), dtype="float32")
    y = rng.integers(0, 10, batch_size)
    times, losses, compile_s = [], [], None
    for step in range(warmup + steps):
        start = time.perf_counter()
        # Returns the loss as a Python float: the step has finished.
        losses.append(float(model.train_on_batch(x, y)))
        elapsed = time.perf_counter() - start
        if step == 0:
            compile_s = elapsed
        if step >= warmup:
            times.append(elapsed)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return {
        "library": "keras_node",
        "backend": "jax",
        "solver": repr(solver_),
        "gradient": repr(gradient_),
        "device": device.device_kind,
        "median_step_s": float(np.median(times)),
        "min_step_s": float(np.min(times)),
        "nfe_forward": float(ode.num_forward_evals),
        "nfe_backward": float(ode.num_backward_evals),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,
        "peak_device_mib": (stats["peak_bytes_in_use"] / 2**20
                            if stats else None),
        "compile_s": compile_s,
        "losses": losses,
        "versions": versions(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    add_solve_arguments(parser)
    parser.add_argument("--unroll", action="store_true",
                        help="unroll a fixed-step solver's steps")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step compiles)")
    print(json.dumps(measure(args.steps, args.warmup, args.batch_size,
                             args.solver, args.gradient, args.num_steps,
                             args.unroll)))


if __name__ == "__main__":
    main()
