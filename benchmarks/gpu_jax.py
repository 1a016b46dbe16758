"""The README's MNIST classifier trained on Keras' JAX backend; JSON.

    KERAS_BACKEND=jax python -m benchmarks.gpu_jax --manual-dir DIR \\
        [--max-steps N]
    KERAS_BACKEND=jax python -m benchmarks.gpu_jax --manual-dir DIR --long

For machines with JAX (CUDA or CPU) and no TensorFlow: the MNIST files are
read from `--manual-dir` (the four canonical .gz files) with numpy, the
model is `examples/mnist_common.py`'s, trained with `model.fit` (batch 128,
Adam with the example's schedule, shuffled each epoch) on the 54,000-image
stratified split of `examples/mnist.py` (same seed, same split; all 60,000
with `--train-on-held-out`). One epoch
by default; `--long` is `benchmarks/mnist_recipes.py`'s long recipe (30
epochs, shifts of up to 2 pixels, learning rate 4e-3, weight decay 0.05),
and the options below change any part of it. Prints JSON: the device, the
median step time, the training time (with the per-epoch test evaluations
of a run of several epochs), the forward NFE of a test batch after
training, the accuracy on the official test split and, per epoch, the test
accuracy (also written, as it comes, to `--progress-file`).
"""

import argparse
import gzip
import json
import os
import pathlib
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
from benchmarks.machine import describe, provenance  # noqa: E402
from examples.mnist_common import (build_model, make_optimizer,  # noqa: E402
                                  ode_layer, stratified_split)
from examples.options import check_ranges  # noqa: E402

from keras_node.callbacks import LogEvaluationCounts  # noqa: E402


def read_idx(path):
    """An IDX file (MNIST's format) as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
             for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


class StepTimes(keras.callbacks.Callback):
    """Times each step and prints progress as it goes (a lease can end).

    Progress also goes, flushed line by line, to `progress_file` if given:
    what a killed run leaves tells whether compiling or stepping took the
    time.
    """

    def __init__(self, progress_file=None):
        super().__init__()
        self.times = []
        self.progress_file = progress_file
        self.test_accuracy = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.last_logs = dict(logs)
        if len(self.times) == 1 or len(self.times) % 10 == 0:
            self.report(f"iteration {len(self.times)}: {self.times[-1]:.3f} "
                        f"s, loss {float(logs['loss']):.4f}, NFE forward "
                        f"{logs.get('nfe_forward', 0):.0f} backward "
                        f"{logs.get('nfe_backward', 0):.0f}")

    def on_epoch_end(self, epoch, logs=None):
        if "val_accuracy" in logs:
            self.test_accuracy.append(100.0 * logs["val_accuracy"])
            self.report(f"epoch {epoch + 1}: test accuracy "
                        f"{self.test_accuracy[-1]:.2f}%")

    def report(self, line):
        print(line, flush=True)
        if self.progress_file:
            with open(self.progress_file, "a") as f:
                f.write(line + "\n")


ONE_EPOCH = {"epochs": 1, "learning_rate": 1e-2, "shift": 0,
             "weight_decay": 0.0}
# benchmarks/mnist_recipes.py's "long".
LONG = {"epochs": 30, "learning_rate": 4e-3, "shift": 2, "weight_decay": 0.05}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manual-dir", type=pathlib.Path, required=True)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--long", action="store_true",
                        help="the long recipe's defaults (see above)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--shift", type=int, default=None,
                        help="augment: shift by up to this many pixels")
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--kinetic-energy", type=float, default=0.0)
    parser.add_argument("--train-on-held-out", action="store_true",
                        help="train on all 60,000 images, as mnist.py's")
    parser.add_argument("--test-images", type=int, default=10000,
                        help="evaluate on the first N official test images "
                        "(default: all %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=pathlib.Path, default=None)
    parser.add_argument("--progress-file", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    check_ranges(parser, args, positive=("batch_size", "test_images"))
    recipe = LONG if args.long else ONE_EPOCH
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    load = lambda name: read_idx(args.manual_dir / f"{name}-ubyte.gz")
    x = load("train-images-idx3")[..., None].astype("float32") / 255
    y = load("train-labels-idx1").astype("int64")
    x_test = load("t10k-images-idx3")[:args.test_images, ..., None].astype(
        "float32") / 255
    y_test = load("t10k-labels-idx1")[:args.test_images].astype("int64")
    if not args.train_on_held_out:
        kept, _ = stratified_split(y, 0.1, args.seed)
        x, y = x[kept], y[kept]
    n_images = len(x)
    # Whole batches only (421 of 128): a last, smaller batch would make XLA
    # compile the train step a second time.
    steps = len(x) // args.batch_size
    if args.max_steps:
        steps = min(steps, args.max_steps)
    x, y = x[:steps * args.batch_size], y[:steps * args.batch_size]

    keras.utils.set_random_seed(args.seed)
    model = build_model(kinetic_energy=args.kinetic_energy)
    ode = ode_layer(model)
    encoder = keras.Model(model.input, ode.input)
    trainer = model
    if args.shift:  # as examples/mnist.py's pipeline, here in the step
        shift = keras.layers.RandomTranslation(
            args.shift / 28, args.shift / 28, fill_mode="constant",
            seed=args.seed)
        # It declares `supports_jit = False` (it may run in tf.data), which
        # makes Keras train eagerly, op by op: 3 s a step on an H200 instead
        # of 0.01. It compiles fine on JAX.
        shift.supports_jit = True
        trainer = keras.Sequential([keras.Input((28, 28, 1)), shift, model])
    trainer.compile(
        optimizer=make_optimizer(args.learning_rate, steps * args.epochs,
                                 args.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    timer = StepTimes(args.progress_file)
    print(f"{args.epochs} x {steps} iterations on {jax.devices()[0]}",
          flush=True)
    start = time.perf_counter()
    trainer.fit(x, y, batch_size=args.batch_size, epochs=args.epochs,
                shuffle=True, callbacks=[LogEvaluationCounts(), timer],
                validation_data=(x_test, y_test) if args.epochs > 1 else None,
                validation_batch_size=500, verbose=2)
    train_time = time.perf_counter() - start
    test = trainer.evaluate(x_test, y_test, batch_size=500, verbose=0,
                            return_dict=True)
    ode(encoder(x_test[:args.batch_size]))  # one eager solve, to count
    result = {
        "benchmark": "gpu_jax", "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "train_images": n_images,
        "iterations": len(timer.times),
        "median_step_s": float(np.median(timer.times[1:] or timer.times)),
        "first_step_s (compiles)": timer.times[0],
        "options": {name: getattr(args, name) for name in
                    ["epochs", "learning_rate", "shift", "weight_decay",
                     "kinetic_energy", "train_on_held_out", "seed",
                     "batch_size", "max_steps", "test_images"]},
        "jit_compile": trainer.jit_compile,
        "train_s": train_time,
        "nfe_forward_test_batch": float(ode.num_forward_evals),
        "nfe_forward_last_step": timer.last_logs.get("nfe_forward"),
        "nfe_backward_last_step": timer.last_logs.get("nfe_backward"),
        "test_accuracy": 100.0 * test["accuracy"],
        "test_accuracy_per_epoch": timer.test_accuracy,
        "machine": describe(), **provenance(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    return result


if __name__ == "__main__":
    main()
