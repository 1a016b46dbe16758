"""The convolutional neural-ODE MNIST classifier of DiffEqFlux, in Keras.

Rebuilds the DiffEqFlux tutorial "Convolutional Neural ODE MNIST Classifier
on GPU" on `keras_node.NeuralODE`, trains it with `model.fit` under a
`tf.distribute` strategy, and leaves in `--out`:

    model.keras            the trained model
    saved_model/1/         a SavedModel for TF Serving (`serving_default`)
    metrics.json           the run's figures (test accuracy, NFE, timing)
    history.json           accuracy points and per-iteration logs
    accuracy.png, nfe.png  their plots
    backup/                the checkpoint a killed run resumes from

Offline (no download), hand tfds the folder with the four canonical files:

    python examples/mnist.py --manual-dir ../shared/data/mnist

Run `python examples/mnist.py --help` for every option.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from mnist_common import (build_model, make_optimizer, solver_and_gradient,
                          stratified_split)

from keras_node.callbacks import AccuracyMonitor, LogEvaluationCounts
from keras_node.distribute import patch_keras_multi_worker_fit
from keras_node.serving import export_classifier
from keras_node.training import (CheckpointError, ResumableCheckpoint,
                                 save_model_atomic, write_atomic)

MANUAL_DIR_ENV = "KERAS_NODE_MNIST_DIR"
# On the JAX backend, tf.data still feeds the data; tf.distribute and the
# SavedModel export are TensorFlow's alone.
TENSORFLOW = keras.backend.backend() == "tensorflow"
FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4")
HELD_OUT_FRACTION = 0.1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--epochs", type=int, default=1, help="passes over the 54,000 "
        "training images (60,000 with --train-on-held-out) "
        "(default: %(default)s)")
    add("--batch-size", type=int, default=128,
        help="global mini-batch size (default: %(default)s)")
    add("--learning-rate", type=float, default=1e-2,
        help="Adam's peak learning rate; it warms up over the first 5%% of "
        "the steps and decays to zero on a cosine (default: %(default)s)")
    add("--weight-decay", type=float, default=0.0,
        help="Adam's decoupled weight decay: each step shrinks the weights "
        "by this times the learning rate (default: %(default)s, none)")
    add("--solver", default="dopri5",
        choices=["dopri5", "tsit5", "bosh3", "euler", "midpoint", "rk4"],
        help="the ODE solver; tsit5 is the DiffEqFlux tutorial's "
        "(default: %(default)s)")
    add("--num-steps", type=int, default=None,
        help="steps of a fixed-step solver (euler, midpoint, rk4) "
        "(default: 4)")
    add("--gradient", default="adjoint", choices=["adjoint", "backprop"],
        help="adjoint: memory flat in the solver's steps; backprop: the "
        "exact gradient of the discrete solve (default: %(default)s)")
    add("--adjoint-norm", default=None, choices=["full", "seminorm"],
        help="error norm of the adjoint's backward solve, for adaptive "
        "solvers (default: seminorm)")
    add("--kinetic-energy", type=float, default=0.0,
        help="weight of the kinetic-energy regulariser (Finlay et al. "
        "2020), which keeps the dynamics straight and the solver's steps "
        "few (default: %(default)s, off)")
    add("--ema", type=float, default=0.0,
        help="keep an exponential moving average of the weights with this "
        "momentum (e.g. 0.99) and end with the averaged weights; 0 turns it "
        "off (default: %(default)s)")
    add("--shift", type=int, default=0,
        help="augment: shift training images by up to this many pixels at "
        "random (default: %(default)s, no augmentation)")
    add("--rotate", type=float, default=0.0,
        help="augment: rotate training images by up to this many degrees "
        "either way at random (default: %(default)s, no rotation)")
    add("--train-on-held-out", action="store_true",
        help="train on all 60,000 training images, the held-out 10%% "
        "included: for a final run once the recipe is chosen on the held-out "
        "split; the accuracy printed during training is then the official "
        "test split's (nothing is chosen on it)")
    add("--max-steps", type=int, default=None,
        help="stop after this many iterations in all (default: the epochs')")
    add("--limit", type=int, default=None,
        help="use only the first N training and N test images, for quick "
        "runs (default: all)")
    add("--out", type=pathlib.Path, default=pathlib.Path("runs/mnist"),
        help="output folder; a run with the folder of an interrupted run "
        "resumes it (default: %(default)s)")
    add("--seed", type=int, default=0,
        help="seed of the split, the shuffling and the initial weights "
        "(default: %(default)s)")
    add("--manual-dir", type=pathlib.Path,
        default=os.environ.get(MANUAL_DIR_ENV),
        help="folder holding the four canonical MNIST .gz files, for use "
        f"without internet (default: ${MANUAL_DIR_ENV}, else download)")
    add("--data-dir", type=pathlib.Path, default=None,
        help="tensorflow-datasets cache (default: tfds' own, "
        "~/tensorflow_datasets)")
    add("--strategy", default="auto",
        choices=["auto", "default", "mirrored", "multiworker"],
        help="auto: MirroredStrategy over all GPUs if any, else the default "
        "strategy; mirrored: all GPUs (all logical CPUs without GPUs); "
        "multiworker: MultiWorkerMirroredStrategy from TF_CONFIG "
        "(default: %(default)s)")
    add("--eval-every", type=int, default=10,
        help="print train and test accuracy every N iterations "
        "(default: %(default)s, the tutorial's)")
    add("--train-eval-batches", type=int, default=100,
        help="training batches measured at each print "
        "(default: %(default)s, the tutorial's)")
    add("--checkpoint-every", type=int, default=50,
        help="save the resumable checkpoint every N iterations "
        "(default: %(default)s)")
    add("--verbose", type=int, default=1, choices=[0, 1, 2],
        help="Keras' progress output: 0 none, 1 bar, 2 a line per epoch "
        "(default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "eval_every", "train_eval_batches",
                 "checkpoint_every", "max_steps", "limit", "num_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive "
                         f"integer, got {value}")
    fixed = args.solver in FIXED_STEP_SOLVERS
    if args.num_steps is not None and not fixed:
        parser.error(f"--num-steps is for the fixed-step solvers "
                     f"({', '.join(FIXED_STEP_SOLVERS)}), not --solver "
                     f"{args.solver}")
    if args.adjoint_norm is not None and (fixed or args.gradient != "adjoint"):
        parser.error("--adjoint-norm is for --gradient adjoint with an "
                     "adaptive solver (dopri5, tsit5, bosh3)")
    if not TENSORFLOW and args.gradient == "backprop" and not fixed:
        parser.error(f"--gradient backprop needs a fixed-step solver on "
                     f"Keras' {keras.backend.backend()} backend, not --solver "
                     f"{args.solver}")
    if not TENSORFLOW and args.strategy not in ("auto", "default"):
        parser.error(f"--strategy {args.strategy} needs Keras' TensorFlow "
                     f"backend; on {keras.backend.backend()} use auto")
    if not 0 <= args.ema < 1:
        parser.error(f"--ema must be in [0, 1), got {args.ema}")
    if not 0 <= args.shift < 14:
        parser.error(f"--shift must be in [0, 13] pixels, got {args.shift}")
    if not 0 <= args.rotate <= 180:
        parser.error(f"--rotate must be in [0, 180] degrees, got "
                     f"{args.rotate}")
    for name in ("weight_decay", "kinetic_energy"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0, "
                         f"got {getattr(args, name)}")
    if args.learning_rate <= 0:
        parser.error(f"--learning-rate must be positive, got "
                     f"{args.learning_rate}")
    return args


# ---------------------------------------------------------------- data


def check_manual_dir(manual_dir):
    """Fails clearly unless `manual_dir` holds the four files tfds expects."""
    checksums = pathlib.Path(tfds.__file__).parent / "url_checksums/mnist.txt"
    manual_dir = pathlib.Path(manual_dir)
    for line in checksums.read_text().split("\n"):
        if not line.strip():
            continue
        url, size, sha256, name = line.split("\t")
        path = manual_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"The MNIST file {name} is missing from the manual download "
                f"folder {manual_dir}. Put the four canonical MNIST files "
                f"there (from {url.rsplit('/', 1)[0]}/), or leave "
                f"--manual-dir and ${MANUAL_DIR_ENV} unset to download them."
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise ValueError(
                f"The MNIST file {path} is corrupt: its SHA-256 is {digest}, "
                f"expected {sha256} ({size} bytes). Replace it with the "
                f"canonical file from {url}."
            )


def load_mnist(manual_dir=None, data_dir=None, limit=None, seed=0,
               hold_out=True):
    """MNIST as numpy arrays: `{"train", "held_out", "test"}: (x, y)`.

    `x` is float32 in [0, 1] of shape (n, 28, 28, 1), `y` int labels. The
    60,000 training images are split 90/10, stratified by label; with
    `hold_out=False` they are all "train", and there is no "held_out".
    """
    kwargs = {}
    if manual_dir is not None:
        check_manual_dir(manual_dir)
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(
                manual_dir=str(manual_dir))
        }
    train, test = tfds.as_numpy(tfds.load(
        "mnist", split=["train", "test"], batch_size=-1, as_supervised=True,
        data_dir=None if data_dir is None else str(data_dir), **kwargs,
    ))
    scale = lambda xy: ((xy[0][:limit] / np.float32(255)).astype("float32"),
                        xy[1][:limit].astype("int64"))
    (x, y), test = scale(train), scale(test)
    if not hold_out:
        return {"train": (x, y), "test": test}
    kept, held_out = stratified_split(y, HELD_OUT_FRACTION, seed)
    return {"train": (x[kept], y[kept]),
            "held_out": (x[held_out], y[held_out]),
            "test": test}


def make_datasets(arrays, batch_size, seed, shift=0, rotate=0.0,
                  skip_batches=0):
    """tf.data pipelines: an endless training stream and the eval sets.

    The training stream is reshuffled every epoch, reproducibly from `seed`,
    its images shifted at random by up to `shift` pixels and rotated by up
    to `rotate` degrees, and it starts `skip_batches` batches in (where a
    resumed run left off).
    """
    x, y = arrays["train"]
    train = (tf.data.Dataset.from_tensor_slices((x, y))
             .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
             .batch(batch_size)
             .repeat())
    augmentations = []
    if shift:
        augmentations.append(keras.layers.RandomTranslation(
            shift / 28, shift / 28, fill_mode="constant", seed=seed))
    if rotate:
        augmentations.append(keras.layers.RandomRotation(
            rotate / 360, fill_mode="constant", seed=seed))
    if augmentations:
        augment = keras.Sequential(augmentations)
        train = train.map(lambda x, y: (augment(x, training=True), y),
                          num_parallel_calls=tf.data.AUTOTUNE)
    train = train.skip(skip_batches).prefetch(tf.data.AUTOTUNE)
    evaluate = lambda split: (tf.data.Dataset
                              .from_tensor_slices(arrays[split])
                              .batch(batch_size)
                              .prefetch(tf.data.AUTOTUNE))
    data = {split: evaluate(split) for split in arrays}
    data["train_eval"], data["train"] = data["train"], train
    return data


# --------------------------------------------------------------- model


def choose_strategy(name):
    """A `tf.distribute` strategy; None on other backends (one device)."""
    if not TENSORFLOW:
        return None
    if name == "multiworker":
        # From TF_CONFIG, before anything starts TensorFlow's runtime. A
        # worker that dies makes the others fail (TF's peer health check)
        # instead of waiting forever in a collective.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        patch_keras_multi_worker_fit()  # keras-team/keras#20585
        return strategy
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if gpus else "default"
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()  # "default"


def worker_folder(strategy, out):
    """`out` for the chief (or a single worker), a scratch folder for others.

    As the TensorFlow guide prescribes for multi-worker training, only the
    chief writes checkpoints and results where the user looks; the other
    workers write theirs (which they need to resume) to `out/.worker-<id>`.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return out
    task_type, task_id = resolver.task_type, resolver.task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if task_type == "chief" or (task_type == "worker" and task_id == 0
                                and not has_chief):
        return out
    return out / f".{task_type}-{task_id}"


def _multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def agree_on_checkpoint(strategy, model, checkpoint):
    """The iteration to resume from, the same on every worker.

    Each worker restores its own checkpoint. Training is synchronous, so they
    hold the same step, unless a worker died while writing one: then those
    ahead step back to their previous checkpoint (`keep=2`).
    """
    done = int(model.optimizer.iterations.numpy())
    if not _multi_worker(strategy):
        return done

    @tf.function
    def everyone():
        return strategy.run(lambda: tf.distribute.get_replica_context()
                            .all_gather(tf.constant([done]), axis=0))

    agreed = int(tf.reduce_min(
        strategy.experimental_local_results(everyone())[0]))
    if done > agreed and agreed in checkpoint.iterations():
        done = checkpoint.restore(agreed)
    if done != agreed:
        raise SystemExit(
            f"This worker's checkpoint is at iteration {done}, another's at "
            f"{agreed}: the workers cannot resume together. Remove every "
            "worker's backup/ folder to start over.")
    return done


@contextlib.contextmanager
def peers_watched(strategy, out):
    """Turns a lost peer's collective error into a clear exit (multi-worker)."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError, tf.errors.AbortedError) as error:
        if not _multi_worker(strategy):
            raise
        raise SystemExit(
            f"Training stopped: a worker of the cluster is gone "
            f"({type(error).__name__}: {error.message.strip().splitlines()[-1]}"
            f"). Start every worker again with the same command and --out "
            f"{out} to resume from the last checkpoint.") from error


# ------------------------------------------------------------ training


def main(argv=None):
    args = parse_args(argv)
    # First: a multi-worker strategy must exist before TensorFlow runs ops.
    strategy = choose_strategy(args.strategy)
    keras.utils.set_random_seed(args.seed)
    out = worker_folder(strategy, args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = load_mnist(args.manual_dir, args.data_dir, args.limit, args.seed,
                        hold_out=not args.train_on_held_out)
    # What the accuracy printed during training is measured on.
    watched = "test" if args.train_on_held_out else "held_out"
    n_train = len(arrays["train"][0])
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    n_held_out = len(arrays["held_out"][0]) if "held_out" in arrays else 0
    print(f"MNIST: {n_train} train, {n_held_out} held out, "
          f"{len(arrays['test'][0])} test images; {steps_per_epoch} "
          f"iterations per epoch, {total_steps} in all.")

    finished = (out / "model.keras").exists()
    with strategy.scope() if strategy else contextlib.nullcontext():
        if finished:
            model = keras.models.load_model(out / "model.keras")
        else:
            solver, gradient = solver_and_gradient(
                args.solver, args.num_steps, args.gradient, args.adjoint_norm)
            model = build_model(solver=solver, gradient=gradient,
                                kinetic_energy=args.kinetic_energy)
            model.compile(
                optimizer=make_optimizer(args.learning_rate, total_steps,
                                         args.weight_decay, args.ema),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                metrics=["accuracy"],
            )
        # Two checkpoints: a kill while writing one, or a damaged file,
        # steps back to the other.
        checkpoint = ResumableCheckpoint(
            out / "backup", save_every=args.checkpoint_every, keep=2)
        # Restore now, before fit, to know where the data stream resumes.
        checkpoint.set_model(model)
        try:
            checkpoint.restore()
        except CheckpointError as error:
            raise SystemExit(str(error))
        done = agree_on_checkpoint(strategy, model, checkpoint)
    if finished:
        print(f"{out} holds a finished run ({done} iterations): evaluating "
              "and exporting it again. Use a new --out to train anew.")
        total_steps = done
    elif done:
        print(f"Resuming from the checkpoint in {out / 'backup'} at "
              f"iteration {done}.")

    data = make_datasets(arrays, args.batch_size, args.seed,
                         args.shift, args.rotate, skip_batches=done)
    monitor = AccuracyMonitor(data["train_eval"], data[watched],
                              every=args.eval_every,
                              train_batches=args.train_eval_batches)
    monitor.set_model(model)  # also used after training, for held-out figures
    history_path = out / "history.json"
    if done and history_path.exists():
        try:
            saved = json.loads(history_path.read_text())
            monitor.history = [p for p in saved["accuracy"]
                               if p["iteration"] <= done]
            monitor.iteration_logs = [p for p in saved["iterations"]
                                      if p["iteration"] <= done]
        except (ValueError, KeyError, TypeError) as error:
            print(f"Warning: {history_path} is damaged ({error}); the "
                  "accuracy and evaluation-count history starts afresh.")
    save_history = lambda: write_atomic(history_path, json.dumps(
        {"accuracy": monitor.history, "iterations": monitor.iteration_logs}))

    started = time.time()
    if done < total_steps:
        with peers_watched(strategy, args.out):
            model.fit(
                data["train"],
                initial_epoch=done // steps_per_epoch,
                epochs=math.ceil(total_steps / steps_per_epoch),
                steps_per_epoch=steps_per_epoch,
                callbacks=[
                    LogEvaluationCounts(),  # NFE in the logs, also on JAX
                    monitor,
                    _EveryIterations(args.checkpoint_every, save_history),
                    # After the history, so a checkpoint never leads it.
                    checkpoint,
                    _StopAtIteration(total_steps),
                ],
                shuffle=False,  # the stream is shuffled, reproducibly, above
                verbose=args.verbose,
            )
    train_time = time.time() - started
    save_history()

    test = model.evaluate(data["test"], verbose=0, return_dict=True)
    # Every artifact is written atomically, and the checkpoint stays until
    # they all are: a kill at any moment leaves a run that resumes.
    save_model_atomic(model, out / "model.keras")
    if TENSORFLOW and not (out / "saved_model" / "1").exists():
        export_classifier(model, out / "saved_model", version=1)
    recent = monitor.iteration_logs[-20:]
    metrics = {
        "test_accuracy": 100.0 * test["accuracy"],
        "test_loss": test["loss"],
        "held_out_accuracy": (monitor.accuracy(data["held_out"])
                              if "held_out" in data else None),
        "iterations": int(model.optimizer.iterations.numpy()),
        "train_time_s_this_run": train_time,
        "nfe_forward_last_20": float(np.mean(
            [p["nfe_forward"] for p in recent])) if recent else None,
        "nfe_backward_last_20": float(np.mean(
            [p["nfe_backward"] for p in recent])) if recent else None,
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v
                 for k, v in vars(args).items()},
    }
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    plot_history(monitor.history, monitor.iteration_logs, out,
                 watched.replace("_", "-"))
    print(f"Test accuracy (official 10,000-image split, or --limit): "
          f"{metrics['test_accuracy']:.3f}%")
    print(f"Saved {out / 'model.keras'}; figures in {out / 'metrics.json'}.")
    if not TENSORFLOW:
        print("No SavedModel: exporting one needs Keras' TensorFlow backend "
              f"(keras-node export {out / 'model.keras'} {out / 'saved_model'}"
              " under KERAS_BACKEND=tensorflow exports this model).")
        checkpoint.delete()
        return metrics
    print(f"Exported the SavedModel {out / 'saved_model' / '1'}.")
    # A ready request: the first official test image, as stored (uint8).
    pixels = np.round(arrays["test"][0][:1, ..., 0] * 255).astype(int)
    write_atomic(out / "request.json", json.dumps(
        {"signature_name": "predict_pixels", "instances": pixels.tolist()}))
    checkpoint.delete()
    print("Serve the SavedModel with TF Serving's REST API, and query it "
          f"with the first test image (a {arrays['test'][1][0]}):\n"
          f"  keras-node serve --model-base-path {out / 'saved_model'} "
          "--model-name mnist --port 8501\n"
          "  curl -s -X POST localhost:8501/v1/models/mnist:predict "
          f"-d @{out / 'request.json'}")
    return metrics


class _EveryIterations(keras.callbacks.Callback):
    """Calls `fn` every `n` iterations."""

    def __init__(self, n, fn):
        super().__init__()
        self.n, self.fn = n, fn

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) % self.n == 0:
            self.fn()


class _StopAtIteration(keras.callbacks.Callback):
    """Ends training once the optimizer has taken `total` steps in all."""

    def __init__(self, total):
        super().__init__()
        self.total = total

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.total:
            self.model.stop_training = True


def plot_history(accuracy, iterations, out, watched="held-out"):
    """Writes `accuracy.png` and `nfe.png` into `out`.

    `watched` names the split of the accuracy measured during training.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    figures = [
        ("accuracy.png", accuracy, "accuracy (%)", "Neural-ODE MNIST classifier",
         {"train_accuracy": "train", "test_accuracy": watched}),
        ("nfe.png", iterations, "function evaluations",
         "Solver cost per iteration",
         {"nfe_forward": "forward", "nfe_backward": "backward"}),
    ]
    for filename, points, ylabel, title, series in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series.items():
            ax.plot([p["iteration"] for p in points],
                    [p.get(key, float("nan")) for p in points], label=label)
        ax.set(xlabel="iteration", ylabel=ylabel, title=title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
