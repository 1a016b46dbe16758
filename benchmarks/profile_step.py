"""Where a training step of the README's MNIST model spends its time.

    python -m benchmarks.profile_step [--repeats 20]

Times, each as the median of `--repeats` runs of a compiled `tf.function` on
the same batch of 128 random images: one evaluation of the dynamics (two 3x3
convolutions on 128x6x6x64), one evaluation of the adjoint system (the
dynamics and their vector-Jacobian product), the solver alone (the same
solve, forward and backward, with dynamics `-h * w` that cost almost
nothing), the forward pass of the whole model, the forward and backward pass
(gradients, no optimizer), the same with the ODE taken out (the
down-sampling and head layers alone), and the full train step
(`train_on_batch`). From the evaluation counts it splits the step into
dynamics work (forward NFE x one evaluation + backward NFE x one adjoint
evaluation) and the rest (down-sampling and head layers, the solver's own
arithmetic and loop overhead, the optimizer). `--solver`, `--gradient` and
`--num-steps` choose the model's solve as in `train_step.py`. Prints JSON.

`--trace DIR` also records five train steps with TensorFlow's profiler into
DIR, for TensorBoard's Profile tab (`pip install tensorboard-plugin-profile`,
then `tensorboard --logdir DIR`): its framework op statistics give each
operation's time, the convolutions' and their gradients' among them.
"""

import argparse
import json
import pathlib
import time

from benchmarks.machine import describe, provenance
from benchmarks.train_step import add_solve_arguments

ROOT = pathlib.Path(__file__).resolve().parents[1]


def median_time(fn, repeats):
    fn()  # trace and warm up
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--trace", type=pathlib.Path, metavar="DIR",
                        help="also record five train steps with "
                        "TensorFlow's profiler into DIR, for TensorBoard")
    add_solve_arguments(parser)
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf
    from examples.mnist_common import (build_model, ode_layer,
                                       solver_and_gradient, without_ode)
    from keras_node import NeuralODE

    keras.utils.set_random_seed(0)
    solver, gradient = solver_and_gradient(args.solver, args.num_steps,
                                           args.gradient)
    model = build_model(solver=solver, gradient=gradient)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ode = ode_layer(model)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((args.batch_size, 28, 28, 1), "float32"))
    y = tf.constant(rng.integers(0, 10, args.batch_size))
    h = tf.constant(rng.normal(size=(args.batch_size, 6, 6, 64))
                    .astype("float32"))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def dynamics():
        return ode.dynamics(h)

    @tf.function
    def adjoint_evaluation():
        with tf.GradientTape() as tape:
            tape.watch(h)
            f = ode.dynamics(h)
        return tape.gradient(f, [h] + ode.dynamics.trainable_variables,
                             output_gradients=f)

    # The solver's own cost: the same solve (settings, state shape, forward
    # and backward) with dynamics that cost almost nothing.
    class Scale(keras.layers.Layer):
        """dh/dt = -h * w, one weight per channel."""

        def build(self, input_shape):
            self.w = self.add_weight(shape=input_shape[-1:],
                                     initializer="ones")

        def call(self, h):
            return -h * self.w

    cheap = NeuralODE(Scale(), t0=ode.t0, t1=ode.t1, rtol=ode.rtol,
                      atol=ode.atol, solver=ode.solver, gradient=ode.gradient)
    around = without_ode(model)

    @tf.function
    def solver_only():
        with tf.GradientTape() as tape:
            tape.watch(h)
            out = cheap(h)
        return tape.gradient(out, h, output_gradients=out)

    @tf.function
    def forward():
        return model(x, training=True)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    @tf.function
    def around_forward_backward():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, around(x, training=True))
        return tape.gradient(loss, around.trainable_variables)

    times = {
        "dynamics_evaluation_s": median_time(dynamics, args.repeats),
        "adjoint_evaluation_s": median_time(adjoint_evaluation, args.repeats),
        "solver_only_forward_backward_s": median_time(solver_only,
                                                      args.repeats),
        "model_forward_s": median_time(forward, args.repeats),
        "forward_backward_s": median_time(forward_backward, args.repeats),
        "without_ode_forward_backward_s": median_time(
            around_forward_backward, args.repeats),
        "train_step_s": median_time(
            lambda: model.train_on_batch(x, y), args.repeats),
    }
    if args.trace is not None:
        tf.profiler.experimental.start(str(args.trace))
        for _ in range(5):
            model.train_on_batch(x, y)
        tf.profiler.experimental.stop()
    nfe_forward = float(ode.num_forward_evals)
    nfe_backward = float(ode.num_backward_evals)
    dynamics_work = (nfe_forward * times["dynamics_evaluation_s"]
                     + nfe_backward * times["adjoint_evaluation_s"])
    print(json.dumps({
        "benchmark": "profile_step", "batch_size": args.batch_size,
        "repeats": args.repeats,
        "solver": repr(solver), "gradient": repr(gradient),
        "nfe_forward": nfe_forward, "nfe_backward": nfe_backward,
        **times,
        "dynamics_work_s": dynamics_work,
        "dynamics_share_of_step": dynamics_work / times["train_step_s"],
        "trace": None if args.trace is None else str(args.trace),
        "machine": describe(), **provenance(),
    }, indent=2))


if __name__ == "__main__":
    main()
