"""Augmented neural ODEs on the concentric annuli of Dupont et al. (2019).

Points of the plane with `|x| < r1` are one class, points with
`r2 < |x| < r3` the other. A neural ODE's flow is a homeomorphism of the
plane: it cannot move the inner disc out of the ring, so a linear read-out
after it cannot separate them; it can only squeeze the ring through gaps,
and its dynamics get stiffer (the solver's evaluations climb) as it tries.
With `augment_dim`, the state gains zero channels that give the flow a
third dimension to lift the disc out. (Dupont, Doucet & Teh, "Augmented
Neural ODEs", NeurIPS 2019, Figs. 1, 4 and 7.)

Trains a plain and an augmented `NeuralODE` with the same dynamics network
and read-out, prints the loss, the accuracy and the forward evaluations as
training goes, and leaves in `--out` `annuli.json` (every iteration's
figures) and `annuli.png` (their curves):

    python -m examples.annuli --iterations 600
"""

import argparse
import json
import pathlib

import keras
import numpy as np

from examples.options import check_out_folder, check_ranges, seed_option
from keras_node import NeuralODE
from keras_node.callbacks import LogEvaluationCounts
from keras_node.training import StopAtIteration

RADII = (0.5, 1.0, 1.5)  # r1, r2, r3: the paper's


def annuli(n, seed, radii=RADII):
    """`n` points, half in the disc `|x| < r1` (label 0), half in the ring
    `r2 < |x| < r3` (label 1), uniform in area."""
    r1, r2, r3 = radii
    rng = np.random.default_rng(seed)
    inner = n // 2
    radius = np.concatenate([
        r1 * np.sqrt(rng.random(inner)),
        np.sqrt(rng.uniform(r2 ** 2, r3 ** 2, n - inner))])
    angle = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    y = (np.arange(n) >= inner).astype("float32")
    order = rng.permutation(n)
    return x[order].astype("float32"), y[order]


def build_model(augment_dim, hidden=32):
    """2D points to a logit: a `NeuralODE` and a linear read-out."""
    width = 2 + augment_dim
    dynamics = keras.Sequential([
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(width),
    ], name="dynamics")
    inputs = keras.Input((2,))
    h = NeuralODE(dynamics, augment_dim=augment_dim, name="ode")(inputs)
    # The layer drops the augmented channels: the read-out sees the plane
    # only, where the augmented flow (through a third dimension) can put
    # the disc outside the ring.
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def train(augment_dim, x, y, iterations, batch_size, seed, verbose=True):
    """Trains one model; returns its per-iteration figures."""
    keras.utils.set_random_seed(seed)
    model = build_model(augment_dim)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)])
    points, running = [], {}

    def record(batch, logs):
        # Keras logs the loss and the accuracy as running means over the
        # epoch's examples; this batch's own are the difference of two.
        before = batch * batch_size
        seen = min(before + batch_size, len(x))
        point = {"iteration": len(points) + 1}
        for key, value in logs.items():
            if key in ("loss", "binary_accuracy"):
                mean = running.get(key, 0.0) if batch else 0.0
                point[key] = (seen * value - before * mean) / (seen - before)
                running[key] = value
            else:
                point[key] = float(value)
        points.append(point)
        if verbose and len(points) % 50 == 0:
            p = points[-1]
            print(f"augment_dim={augment_dim} iteration {len(points)}: loss "
                  f"{p['loss']:.4f}, accuracy {100 * p['binary_accuracy']:.1f}%"
                  f", forward evaluations {p['nfe_forward']:.0f}", flush=True)

    steps = -(-len(x) // batch_size)
    model.fit(x, y, batch_size=batch_size, verbose=0,
              epochs=-(-iterations // steps),
              callbacks=[LogEvaluationCounts(),
                         keras.callbacks.LambdaCallback(
                             on_train_batch_end=record),
                         StopAtIteration(iterations)])
    return model, points


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, points in results.items():
        iterations = [p["iteration"] for p in points]
        for ax, key in zip(axes, ("loss", "binary_accuracy", "nfe_forward")):
            ax.plot(iterations, [p[key] for p in points], label=name)
    for ax, title in zip(axes, ("loss", "training accuracy",
                                "forward evaluations")):
        ax.set(xlabel="iteration", title=title)
        ax.legend()
    fig.suptitle("Concentric annuli (Dupont et al. 2019): NODE vs ANODE")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--points", type=int, default=1024)
    parser.add_argument("--augment-dims", type=int, nargs="+", default=[0, 1],
                        help="the models to train (default: %(default)s)")
    parser.add_argument("--seed", type=seed_option, default=0)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("runs/annuli"))
    args = parser.parse_args(argv)
    check_ranges(parser, args,
                 positive=("iterations", "batch_size", "points"))
    check_out_folder(parser, args.out)
    if min(args.augment_dims) < 0:
        parser.error("--augment-dims must be at least 0")
    if len(set(args.augment_dims)) < len(args.augment_dims):
        parser.error(f"--augment-dims names a model twice: "
                     f"{' '.join(map(str, args.augment_dims))}")

    x, y = annuli(args.points, args.seed)
    test_x, test_y = annuli(args.points, args.seed + 1)
    results, summary = {}, {}
    for augment_dim in args.augment_dims:
        name = "NODE" if augment_dim == 0 else f"ANODE (+{augment_dim})"
        model, points = train(augment_dim, x, y, args.iterations,
                              args.batch_size, args.seed)
        logits = model.predict(test_x, verbose=0)[:, 0]
        last = points[-20:]
        summary[name] = {
            "augment_dim": augment_dim,
            "test_accuracy": 100.0 * float(np.mean((logits > 0) == test_y)),
            "loss_last_20": float(np.mean([p["loss"] for p in last])),
            "nfe_forward_first_20": float(np.mean(
                [p["nfe_forward"] for p in points[:20]])),
            "nfe_forward_last_20": float(np.mean(
                [p["nfe_forward"] for p in last])),
        }
        results[name] = points
        print(f"{name}: {json.dumps(summary[name])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "annuli.json").write_text(json.dumps(
        {"summary": summary, "iterations": results,
         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    plot(results, args.out / "annuli.png")
    print(f"Wrote {args.out / 'annuli.json'} and {args.out / 'annuli.png'}.")
    return summary


if __name__ == "__main__":
    main()
