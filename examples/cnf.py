"""Continuous normalizing flows on 2D toy densities (FFJORD's toy problems).

Fits a `ContinuousNormalizingFlow` to samples of "two moons" and "eight
gaussians" (made here with numpy, no downloads) by maximum likelihood with
`model.fit`, printing the training loss and evaluations as it goes and the
held-out negative log-likelihood (in nats) at the end. Leaves in `--out`
`cnf.json` (the summary and every iteration's figures) and, per dataset,
`cnf_<dataset>.png`: the data, the learnt density and samples from the
model, side by side:

    python -m examples.cnf --iterations 1000

Grathwohl et al. (2019), "FFJORD", Fig. 2; torchdiffeq's `examples/cnf.py`.
"""

import argparse
import json
import math
import pathlib
import time

import keras
import numpy as np

from examples.options import check_out_folder, check_ranges, seed_option
from keras_node import ContinuousNormalizingFlow
from keras_node.callbacks import LogEvaluationCounts


def two_moons(n, seed, noise=0.1):
    """`n` points on two interleaved half circles (as scikit-learn's
    `make_moons`), with Gaussian noise, centred and scaled by 2."""
    rng = np.random.default_rng(seed)
    upper = n // 2
    angle = np.pi * rng.random(n)
    x = np.where(np.arange(n)[:, None] < upper,
                 np.stack([np.cos(angle), np.sin(angle)], axis=1),
                 np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], axis=1))
    x = x + noise * rng.normal(size=(n, 2))
    return (2.0 * (x - [0.5, 0.25])).astype("float32")[rng.permutation(n)]


def eight_gaussians(n, seed, radius=4.0, scale=0.5):
    """`n` points from eight Gaussians (standard deviation `scale`) on a
    circle of `radius`, all divided by sqrt(2), as FFJORD's toy data."""
    rng = np.random.default_rng(seed)
    angle = 2 * np.pi * rng.integers(0, 8, n) / 8
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x = centres + scale * rng.normal(size=(n, 2))
    return (x / math.sqrt(2)).astype("float32")


def eight_gaussians_log_prob(x, radius=4.0, scale=0.5):
    """The true log-density of `eight_gaussians` (with the same
    arguments): its negative mean over held-out points is the best NLL any
    model can reach there, up to sampling noise."""
    angle = 2 * np.pi * np.arange(8) / 8
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    variance = scale ** 2 / 2  # after the division by sqrt(2)
    squared = np.sum((x[:, None, :] - centres / math.sqrt(2)) ** 2, axis=-1)
    exponents = -squared / (2 * variance)
    top = np.max(exponents, axis=1)
    return (top + np.log(np.mean(np.exp(exponents - top[:, None]), axis=1))
            - np.log(2 * np.pi * variance))


DATASETS = {"two_moons": two_moons, "eight_gaussians": eight_gaussians}


@keras.saving.register_keras_serializable(package="keras_node_examples")
class TimeMLP(keras.layers.Layer):
    """`dz/dt = f(t, z)`: an MLP of `[z, t]` with `tanh` hidden layers."""

    def __init__(self, units=64, depth=3, **kwargs):
        super().__init__(**kwargs)
        self.units, self.depth = units, depth
        self.hidden = [keras.layers.Dense(units, activation="tanh")
                       for _ in range(depth)]
        self.out = None

    def build(self, input_shape):
        size = input_shape[-1] + 1
        for layer in self.hidden:
            layer.build((None, size))
            size = self.units
        self.out = keras.layers.Dense(input_shape[-1])
        self.out.build((None, size))

    def call(self, z, t):
        time = keras.ops.zeros_like(z[:, :1]) + keras.ops.cast(t, z.dtype)
        h = keras.ops.concatenate([z, time], axis=-1)
        for layer in self.hidden:
            h = layer(h)
        return self.out(h)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "depth": self.depth}


def build_flow(args):
    return ContinuousNormalizingFlow(
        TimeMLP(args.units, args.depth), t1=args.t1, rtol=args.tol,
        atol=args.tol, trace=args.trace,
        kinetic_energy=args.kinetic_energy, jacobian_norm=args.jacobian_norm,
        seed=args.seed)


def held_out_nll(flow, x, batch_size=4096):
    """The mean negative log-likelihood of `x`, in nats."""
    # `predict` (the flow's call is `log_prob`) compiles the solve once; an
    # eager call on JAX compiles it anew every time.
    return -float(np.mean(flow.predict(x, batch_size=batch_size, verbose=0)))


def train(name, args, verbose=True):
    """Fits a flow to `name`'s data; returns it and per-iteration figures."""
    keras.utils.set_random_seed(args.seed)
    data = DATASETS[name]
    x = data(args.iterations * args.batch_size, args.seed)
    flow = build_flow(args)
    flow.compile(keras.optimizers.Adam(args.learning_rate))
    points, started = [], time.perf_counter()

    def record(batch, logs):
        # Keras logs the epoch's running mean; this batch's own loss is
        # what it added to it.
        k, mean = len(points) + 1, float(logs["loss"])
        previous = points[-1]["mean_loss"] if points else 0.0
        points.append({"iteration": k,
                       "seconds": time.perf_counter() - started,
                       **{key: float(v) for key, v in logs.items()},
                       "mean_loss": mean,
                       "loss": k * mean - (k - 1) * previous})
        if verbose and len(points) % args.print_every == 0:
            p = points[-1]
            print(f"{name} iteration {len(points)}: loss {p['loss']:.4f}, "
                  f"forward evaluations {p['nfe_forward']:.0f}, backward "
                  f"{p['nfe_backward']:.0f}", flush=True)

    flow.fit(x, batch_size=args.batch_size, epochs=1, verbose=0,
             callbacks=[LogEvaluationCounts(),
                        keras.callbacks.LambdaCallback(
                            on_train_batch_end=record)])
    return flow, points


def plot(flow, x, samples, path, title, limit=4.0, size=100):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(-limit, limit, size, dtype="float32")
    points = np.stack(np.meshgrid(grid, grid), axis=-1).reshape(-1, 2)
    density = np.exp(flow.predict(points, batch_size=size, verbose=0))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    extent = [[-limit, limit], [-limit, limit]]
    axes[0].hist2d(x[:, 0], x[:, 1], bins=size, range=extent)
    axes[1].imshow(density.reshape(size, size), origin="lower",
                   extent=[-limit, limit, -limit, limit])
    axes[2].hist2d(samples[:, 0], samples[:, 1], bins=size, range=extent)
    for ax, label in zip(axes, ("data", "learnt density", "samples")):
        ax.set(title=label, xticks=[], yticks=[], aspect="equal")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS),
                        default=sorted(DATASETS))
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--t1", type=float, default=1.0)
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="rtol and atol (default: %(default)s)")
    parser.add_argument("--trace", choices=("exact", "hutchinson"),
                        default="exact")
    parser.add_argument("--kinetic-energy", type=float, default=0.0)
    parser.add_argument("--jacobian-norm", type=float, default=0.0)
    parser.add_argument("--test-points", type=int, default=20000)
    parser.add_argument("--print-every", type=int, default=100)
    parser.add_argument("--seed", type=seed_option, default=0)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("runs/cnf"))
    args = parser.parse_args(argv)
    check_ranges(parser, args,
                 positive=("iterations", "batch_size", "units", "depth",
                           "test_points", "print_every", "learning_rate",
                           "tol", "t1"),
                 non_negative=("kinetic_energy", "jacobian_norm"))
    if len(set(args.datasets)) < len(args.datasets):
        parser.error(f"--datasets names a dataset twice: "
                     f"{' '.join(args.datasets)}")
    check_out_folder(parser, args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary, results = {}, {}
    for name in args.datasets:
        flow, points = train(name, args)
        # Held-out data: another seed's draw.
        test = DATASETS[name](args.test_points, args.seed + 1)
        nll = held_out_nll(flow, test)
        samples = keras.ops.convert_to_numpy(flow.sample(args.test_points))
        plot(flow, test, samples, args.out / f"cnf_{name}.png",
             f"{name}: held-out NLL {nll:.3f} nats after "
             f"{args.iterations} iterations")
        last = points[-20:]
        summary[name] = {
            "held_out_nll": nll,
            "loss_last_20": float(np.mean([p["loss"] for p in last])),
            "nfe_forward_last_20": float(np.mean(
                [p["nfe_forward"] for p in last])),
            "nfe_backward_last_20": float(np.mean(
                [p["nfe_backward"] for p in last])),
            "seconds": points[-1]["seconds"],
        }
        if name == "eight_gaussians":
            summary[name]["true_density_nll"] = -float(np.mean(
                eight_gaussians_log_prob(test.astype("float64"))))
        results[name] = points
        print(f"{name}: held-out negative log-likelihood {nll:.4f} nats "
              f"({json.dumps(summary[name])})", flush=True)
    (args.out / "cnf.json").write_text(json.dumps(
        {"summary": summary, "iterations": results,
         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    print(f"Wrote {args.out / 'cnf.json'} and the figures in {args.out}.")
    return summary


if __name__ == "__main__":
    main()
