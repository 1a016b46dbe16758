"""A latent ODE for time series: torchdiffeq's `examples/latent_ode.py`.

The data are the demo's noisy 2-D spirals: Archimedean spirals turning
counter-clockwise about (5, 0) and hyperbolic ones turning clockwise about
(-5, 0), each observed at 100 times from a random start with Gaussian noise
of standard deviation 0.3. A variational autoencoder (Chen et al. 2018,
section 5) learns them:

- an RNN reads the observations backwards in time and gives the posterior
  `q(z0 | x) = N(mean, exp(log_var))` of a 4-dimensional latent state;
- a `NeuralODE` carries a draw of `z0` to the observation times
  (`save_at`), with Dormand-Prince at rtol = atol = 1e-5 (the demo keeps
  torchdiffeq's defaults, 1e-7 and 1e-9);
- a decoder maps each latent state to the plane.

`model.fit` maximises the evidence lower bound (ELBO) with Adam, on the
whole training set each iteration, as the demo does: the loss is the
Gaussian negative log-likelihood of the observations (noise 0.3, summed over
times and coordinates) plus the KL divergence of the posterior from
`N(0, I)`. Every `--print-every` iterations it prints the ELBO; at the end
it reports, on held-out spirals and against the noiseless truth, the error
of the reconstruction (the 100 observed times) and of the extrapolation (the
100 times after them), and writes `latent_ode.json` and `latent_ode.png`
into `--out`:

    python -m examples.latent_ode --iterations 2000

Until the run ends, `--out` also holds `backup/`, a checkpoint at every
printed iteration: after a kill, the same command resumes from it (with a
larger `--iterations`, it trains on to that total). A finished run's
`--out` holds no checkpoint, and a new run there starts anew.
"""

import argparse
import json
import pathlib
import time

import keras
import numpy as np

from examples.options import (check_out_folder, check_ranges,
                              check_same_run, seed_option)
from examples.spirals_data import (NOISE_STD, NUM_OBSERVED, held_out_errors,
                                   spiral_curves, spirals)
from keras_node import NeuralODE, callbacks
from keras_node.training import (CheckpointError, ResumableCheckpoint,
                                 write_atomic)

LATENT_DIM, HIDDEN, RNN_UNITS = 4, 20, 25  # the demo's sizes
TOL = 1e-5  # rtol and atol of the solves
# What a resumed run must repeat (`--iterations` may grow).
RUN_OPTIONS = ("series", "learning_rate", "gradient", "seed")
# A printed point of the history (`train_time_s`: training up to it, over
# all the runs of a resumed one, without writing the history and the
# checkpoints: torchdiffeq's demo, timed alike, writes neither).
POINT_KEYS = ("iteration", "elbo", "nfe_forward", "nfe_backward",
              "train_time_s")


@keras.saving.register_keras_serializable(package="keras_node_examples")
class Posterior(keras.layers.Layer):
    """From `(batch, 2 * latent)` statistics, the mean and log-variance of
    `q(z0 | x)`, gives a reparameterised draw of `z0` in training (the mean
    otherwise) and adds `KL(q || N(0, I))`, summed over the latent
    dimensions and averaged over the batch, to the model's losses."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, statistics, training=None):
        mean, log_var = keras.ops.split(statistics, 2, axis=-1)
        self.add_loss(keras.ops.mean(0.5 * keras.ops.sum(
            keras.ops.exp(log_var) + mean ** 2 - 1.0 - log_var, axis=-1)))
        if not training:
            return mean
        noise = keras.random.normal(keras.ops.shape(mean),
                                    seed=self.seed_generator)
        return mean + keras.ops.exp(0.5 * log_var) * noise

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] // 2)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def negative_log_likelihood(observed, decoded):
    """`-log N(observed; decoded, NOISE_STD^2)`, summed over the times and
    coordinates of each series."""
    variance = NOISE_STD ** 2
    return keras.ops.sum(
        0.5 * (np.log(2.0 * np.pi * variance)
               + (observed - decoded) ** 2 / variance), axis=(1, 2))


def build_models(times, gradient="backprop", seed=0):
    """The training model (decoding at the 100 observed `times`) and the
    extrapolating one (all 200), sharing the encoder, the latent dynamics and
    the decoder."""
    dense = keras.layers.Dense
    encoder = keras.Sequential(
        [keras.layers.SimpleRNN(RNN_UNITS, go_backwards=True),
         dense(2 * LATENT_DIM)], name="encoder")
    posterior = Posterior(seed=seed, name="posterior")
    dynamics = keras.Sequential(
        [dense(HIDDEN, activation="elu"), dense(HIDDEN, activation="elu"),
         dense(LATENT_DIM)], name="dynamics")
    decoder = keras.Sequential(  # for any number of times
        [keras.Input((None, LATENT_DIM)), dense(HIDDEN, activation="relu"),
         dense(2)], name="decoder")

    def model(save_at, name, ode_name):
        observed = keras.Input((NUM_OBSERVED, 2))
        ode = NeuralODE(dynamics, t0=0.0, t1=save_at[-1], save_at=save_at,
                        rtol=TOL, atol=TOL, gradient=gradient, name=ode_name)
        latent_path = ode(posterior(encoder(observed)))
        return keras.Model(observed, decoder(latent_path), name=name)

    # The models share layers, so their graphs join and the training logs
    # name the counts after the layer: `ode_nfe_forward`, ...
    times = [float(t) for t in times]
    return (model(times[:NUM_OBSERVED], "latent_ode", "ode"),
            model(times, "extrapolation", "extrapolation_ode"))


def plot(observed, truth, decoded, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, clockwise, counter = spiral_curves()
    num = min(4, len(observed))  # the first held-out series
    fig, axes = plt.subplots(1, num, figsize=(3.4 * num, 3.4),
                             squeeze=False)
    for k, ax in enumerate(axes[0]):
        for curve in (clockwise, counter):
            ax.plot(curve[:, 0], curve[:, 1], color="0.85", lw=0.8)
        ax.plot(truth[k, :, 0], truth[k, :, 1], "g-", lw=1, label="truth")
        ax.scatter(observed[k, :, 0], observed[k, :, 1], s=3,
                   label="observed")
        ax.plot(decoded[k, :NUM_OBSERVED, 0], decoded[k, :NUM_OBSERVED, 1],
                "r-", label="reconstructed")
        ax.plot(decoded[k, NUM_OBSERVED:, 0], decoded[k, NUM_OBSERVED:, 1],
                "r--", label="extrapolated")
        ax.set(xlim=(-10, 12), ylim=(-8, 8), aspect="equal",
               title=f"held-out series {k}")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000,
                        help="training iterations, each on the whole "
                        "training set (default: %(default)s, the demo's)")
    parser.add_argument("--print-every", type=int, default=50,
                        help="print the ELBO every N iterations (default: "
                        "%(default)s)")
    parser.add_argument("--series", type=int, default=1000,
                        help="training series (default: %(default)s, the "
                        "demo's); as many again, other draws, are held out")
    parser.add_argument("--learning-rate", type=float, default=0.01,
                        help="Adam's (default: %(default)s, the demo's)")
    parser.add_argument("--gradient", default="backprop",
                        choices=["backprop", "adjoint"],
                        help="backprop is the demo's default (odeint), "
                        "adjoint its --adjoint: its backward solve restarts "
                        "at each of the 100 times (default: %(default)s)")
    parser.add_argument("--seed", type=seed_option, default=0)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("runs/latent_ode"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    check_ranges(parser, args, positive=("iterations", "print_every",
                                         "series", "learning_rate"))
    check_out_folder(parser, args.out)

    observed, _, times = spirals(args.series, seed=args.seed)
    test_observed, test_truth, _ = spirals(args.series, seed=args.seed + 1)
    keras.utils.set_random_seed(args.seed)
    model, extrapolation = build_models(times, args.gradient, seed=args.seed)
    model.compile(keras.optimizers.Adam(args.learning_rate),
                  negative_log_likelihood)

    # The checkpoint holds the weights, Adam's state and the posterior's
    # seed generator; the history the printed points and the training time
    # to each, written first so that it never lags behind the checkpoint.
    checkpoint = ResumableCheckpoint(args.out / "backup",
                                     save_every=args.print_every)
    checkpoint.set_model(model)
    args.out.mkdir(parents=True, exist_ok=True)
    check_same_run(args.out, args, RUN_OPTIONS,
                   started=bool(checkpoint.iterations()))
    try:
        done = checkpoint.restore()
    except CheckpointError as error:
        raise SystemExit(str(error))
    if done > args.iterations:
        raise SystemExit(
            f"{checkpoint.directory} holds a run at iteration {done}, past "
            f"--iterations {args.iterations}: resume it with --iterations "
            f"{done} or more, or pass another --out to train anew.")
    history = checkpoint.directory / "history.json"
    elbos = resume_elbos(history, done)
    if done:
        print(f"Resuming from the checkpoint in {checkpoint.directory} at "
              f"iteration {done}.")
    trained_before = elbos[-1]["train_time_s"] if elbos else 0.0
    writing = {"since": None, "total": 0.0}  # the history's and checkpoints'

    def report(batch, logs):
        iteration = int(model.optimizer.iterations.numpy())
        if iteration % args.print_every and iteration != args.iterations:
            return
        writing["since"] = time.perf_counter()
        elbos.append(dict(zip(POINT_KEYS, (
            iteration, -logs["loss"], logs["ode_nfe_forward"],
            logs["ode_nfe_backward"], trained_before + writing["since"]
            - started - writing["total"]))))
        history.parent.mkdir(exist_ok=True)
        write_atomic(history, json.dumps(elbos))
        print(f"Iter: {iteration}, elbo: {-logs['loss']:.4f}", flush=True)

    def written(batch, logs):
        if writing["since"] is not None:
            writing["total"] += time.perf_counter() - writing["since"]
            writing["since"] = None

    # The whole training set is one batch: an epoch is an iteration.
    started = time.perf_counter()
    if done < args.iterations:
        model.fit(observed, observed, batch_size=len(observed),
                  initial_epoch=done, epochs=args.iterations, shuffle=False,
                  verbose=0, callbacks=[
                      callbacks.LogEvaluationCounts(),  # JAX's counts
                      keras.callbacks.LambdaCallback(
                          on_train_batch_end=report),
                      checkpoint,  # after the history
                      keras.callbacks.LambdaCallback(
                          on_train_batch_end=written)])
    train_time = elbos[-1]["train_time_s"] if elbos else 0.0
    # The posterior means, decoded at the observed times and after them.
    decoded = extrapolation.predict(test_observed,
                                    batch_size=len(test_observed), verbose=0)
    errors = held_out_errors(decoded, test_observed, test_truth)
    result = {**errors, "train_time_s": train_time,
              "iterations": int(model.optimizer.iterations.numpy()),
              "series": args.series,
              "seed": args.seed, "gradient": args.gradient,
              "backend": keras.backend.backend(), "elbos": elbos}
    write_atomic(args.out / "latent_ode.json", json.dumps(result, indent=1))
    if not args.no_plot:
        plot(test_observed, test_truth, decoded, args.out / "latent_ode.png")
    print(f"Held out, against the noiseless spirals (root-mean-square): "
          f"reconstruction {errors['reconstruction_rmse']:.3f}, "
          f"extrapolation {errors['extrapolation_rmse']:.3f}, the "
          f"observations themselves {errors['observation_rmse']:.3f} "
          f"({train_time:.1f} s of training); wrote {args.out}.")
    checkpoint.delete()  # the results are written
    return result


def resume_elbos(path, done):
    """The printed points up to iteration `done` from the history at
    `path`; none for a new run."""
    if not done:
        return []
    try:
        points = [p for p in json.loads(path.read_text())
                  if p["iteration"] <= done]
        if not all(isinstance(p[key], (int, float)) for p in points
                   for key in POINT_KEYS):
            raise TypeError("a point's figures are not all numbers")
        return points
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"Warning: {path} is missing or damaged ({error}); the ELBO "
              "history and the training time start afresh.")
        return []


if __name__ == "__main__":
    main()
