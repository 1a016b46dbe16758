"""Learning a trajectory: the spiral of torchdiffeq's `examples/ode_demo.py`.

The true system is `dy/dt = (y^3) A` with `A = [[-0.1, 2.0], [-2.0, -0.1]]`
from `y0 = [2, 0]`, observed at 1,000 times on [0, 25]. A `NeuralODE` whose
dynamics are a 50-unit tanh MLP applied to `y^3` learns it from random
10-point sub-trajectories (20 a batch, `save_at` giving the state at each of
their times) with `model.fit`, RMSprop and the mean absolute error, as
torchdiffeq's demo does. Every `--test-every` iterations it prints the loss
over the whole trajectory; at the end it writes `spiral.json` and
`spiral.png` (the learnt and true trajectories, and the learnt vector field)
into `--out`:

    python -m examples.spiral --iterations 2000
"""

import argparse
import json
import pathlib
import time

import keras
import numpy as np

from examples.options import check_out_folder, check_ranges, seed_option
from keras_node import NeuralODE, gradients

TRUE_A = np.array([[-0.1, 2.0], [-2.0, -0.1]])
TRUE_Y0 = np.array([2.0, 0.0])
DATA_SIZE, T1 = 1000, 25.0
BATCH_TIME, BATCH_SIZE = 10, 20
# torchdiffeq's default tolerances, which its demo uses.
RTOL, ATOL = 1e-7, 1e-9


def true_trajectory():
    """`(t, y)`: the true system at the 1,000 times, solved with scipy's
    DOP853 far below the learnt model's tolerances."""
    import scipy.integrate

    t = np.linspace(0.0, T1, DATA_SIZE)
    solution = scipy.integrate.solve_ivp(
        lambda _, y: (y ** 3) @ TRUE_A, (0.0, T1), TRUE_Y0, t_eval=t,
        method="DOP853", rtol=1e-12, atol=1e-12)
    return t, solution.y.T.astype("float32")


def batches(y, iterations, seed):
    """The demo's random sub-trajectories: `iterations` batches of 20
    initial states `(n, 2)` and their next 10 states `(n, 10, 2)`."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, DATA_SIZE - BATCH_TIME,
                          size=iterations * BATCH_SIZE)
    windows = starts[:, None] + np.arange(BATCH_TIME)
    return y[starts], y[windows]


@keras.saving.register_keras_serializable(package="keras_node_examples")
class Cube(keras.layers.Layer):
    """`y ** 3`, the demo's input transform."""

    def call(self, y):
        return y ** 3


def make_dynamics():
    """The demo's `ODEFunc`: y^3, then 50 tanh units, then 2 outputs, with
    weights from N(0, 0.1) and zero biases."""
    # One initializer each: an unseeded one called twice draws the same
    # numbers, so the two kernels would hold the same values.
    init = lambda: keras.initializers.RandomNormal(stddev=0.1)
    return keras.Sequential([
        Cube(),
        keras.layers.Dense(50, activation="tanh", kernel_initializer=init()),
        keras.layers.Dense(2, kernel_initializer=init()),
    ], name="dynamics")


def build_models(t, gradient="adjoint"):
    """The training model (10 times of a window) and the evaluation model
    (the whole trajectory), sharing one `dynamics`."""
    dynamics = make_dynamics()
    y0 = keras.Input((2,))
    window = NeuralODE(dynamics, t0=0.0, t1=float(t[BATCH_TIME - 1]),
                       save_at=[float(s) for s in t[:BATCH_TIME]],
                       rtol=RTOL, atol=ATOL, gradient=gradient,
                       name="window_ode")
    whole = NeuralODE(dynamics, t0=0.0, t1=T1,
                      save_at=[float(s) for s in t],
                      rtol=RTOL, atol=ATOL, name="trajectory_ode")
    y0_whole = keras.Input((2,))  # a graph of its own: one ODE a model
    return keras.Model(y0, window(y0)), keras.Model(y0_whole, whole(y0_whole))


def plot(t, true_y, learnt_y, dynamics, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (traj, phase, field) = plt.subplots(1, 3, figsize=(13, 4))
    for k, style in ((0, "-"), (1, "--")):
        traj.plot(t, true_y[:, k], "g" + style, label=f"true y{k}")
        traj.plot(t, learnt_y[:, k], "b" + style, label=f"learnt y{k}")
    traj.set(title="Trajectories", xlabel="t", ylabel="x, y")
    traj.legend(fontsize=8)
    phase.plot(true_y[:, 0], true_y[:, 1], "g-", label="true")
    phase.plot(learnt_y[:, 0], learnt_y[:, 1], "b--", label="learnt")
    phase.set(title="Phase portrait", xlabel="x", ylabel="y", xlim=(-2, 2),
              ylim=(-2, 2))
    phase.legend(fontsize=8)
    grid = np.mgrid[-2:2:21j, -2:2:21j].reshape(2, -1).T.astype("float32")
    flow = keras.ops.convert_to_numpy(dynamics(grid))
    speed = np.linalg.norm(flow, axis=1, keepdims=True)
    flow = flow / np.maximum(speed, 1e-12)
    field.quiver(grid[:, 0], grid[:, 1], flow[:, 0], flow[:, 1], color="k")
    field.set(title="Learnt vector field", xlabel="x", ylabel="y",
              xlim=(-2, 2), ylim=(-2, 2))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000,
                        help="training batches (default: %(default)s, "
                        "the demo's)")
    parser.add_argument("--test-every", type=int, default=20,
                        help="print the whole-trajectory loss every N "
                        "iterations (default: %(default)s, the demo's)")
    parser.add_argument("--gradient", default="adjoint",
                        choices=["adjoint", "backprop"],
                        help="backprop is the demo's default (odeint), "
                        "adjoint its --adjoint (default: %(default)s)")
    parser.add_argument("--adjoint-norm", default=None,
                        choices=["seminorm", "full"],
                        help="the adjoint's error norm; full is "
                        "torchdiffeq's default (default: seminorm)")
    parser.add_argument("--seed", type=seed_option, default=0)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("runs/spiral"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    check_ranges(parser, args, positive=("iterations", "test_every"))
    check_out_folder(parser, args.out)
    if args.adjoint_norm is not None and args.gradient != "adjoint":
        parser.error("--adjoint-norm is for --gradient adjoint")

    t, true_y = true_trajectory()
    keras.utils.set_random_seed(args.seed)
    gradient = (gradients.Adjoint(norm=args.adjoint_norm or "seminorm")
                if args.gradient == "adjoint" else "backprop")
    model, trajectory = build_models(t, gradient)
    model.compile(keras.optimizers.RMSprop(1e-3), "mae")
    y0 = TRUE_Y0[None].astype("float32")

    def trajectory_loss():
        if keras.backend.backend() == "jax":
            # Keras' JAX `fit` keeps the weights in its own state: put them
            # back in the variables that the trajectory model reads.
            model.jax_state_sync()
        pred = trajectory.predict(y0, verbose=0)[0]  # compiled once
        return float(np.mean(np.abs(pred - true_y))), pred

    losses, testing = [], [0.0]

    def test(batch, logs):
        iteration = batch + 1
        if iteration % args.test_every == 0 or iteration == args.iterations:
            started = time.perf_counter()
            loss, _ = trajectory_loss()
            testing[0] += time.perf_counter() - started
            losses.append({"iteration": iteration, "loss": loss})
            print(f"Iter {iteration:04d} | Total Loss {loss:.6f}", flush=True)

    x, y = batches(true_y, args.iterations, args.seed)
    started = time.perf_counter()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, shuffle=False,
              verbose=0, callbacks=[keras.callbacks.LambdaCallback(
                  on_train_batch_end=test)])
    # Training alone: the whole-trajectory tests are left out.
    train_time = time.perf_counter() - started - testing[0]
    final, learnt = trajectory_loss()
    result = {"final_loss": final, "train_time_s": train_time,
              "iterations": args.iterations, "seed": args.seed,
              "gradient": args.gradient,
              "adjoint_norm": getattr(gradient, "norm", None),
              "losses": losses}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spiral.json").write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot(t, true_y, learnt, model.layers[-1].dynamics,
             args.out / "spiral.png")
    print(f"Final loss on the whole trajectory: {final:.6f} "
          f"({train_time:.1f} s of training); wrote {args.out}.")
    return result


if __name__ == "__main__":
    main()
