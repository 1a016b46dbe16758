"""One epoch of the README's MNIST classifier on Keras' JAX backend; JSON.

    KERAS_BACKEND=jax python benchmarks/gpu_jax.py --manual-dir DIR [--max-steps N]

For machines with JAX (CUDA or CPU) and no TensorFlow: the MNIST files are
read from `--manual-dir` (the four canonical .gz files) with numpy, the
model is `examples/mnist_common.py`'s, trained with `model.fit` (batch 128,
Adam with the example's schedule, shuffled each epoch) on the 54,000-image
stratified split of `examples/mnist.py` (same seed, same split). Prints JSON:
the device, the median step time, the epoch time, the forward NFE of a
test batch after training, and the accuracy on the official test split.
"""

import argparse
import gzip
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from mnist_common import (build_model, learning_rate_schedule,  # noqa: E402
                          stratified_split)

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

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.last_logs = dict(logs)
        if len(self.times) == 1 or len(self.times) % 10 == 0:
            line = (f"iteration {len(self.times)}: {self.times[-1]:.3f} s, "
                    f"loss {float(logs['loss']):.4f}, NFE forward "
                    f"{logs.get('nfe_forward', 0):.0f} backward "
                    f"{logs.get('nfe_backward', 0):.0f}")
            print(line, flush=True)
            if self.progress_file:
                with open(self.progress_file, "a") as f:
                    f.write(line + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manual-dir", type=pathlib.Path, required=True)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=pathlib.Path, default=None)
    parser.add_argument("--progress-file", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    load = lambda name: read_idx(args.manual_dir / f"{name}-ubyte.gz")
    x = load("train-images-idx3")[..., None].astype("float32") / 255
    y = load("train-labels-idx1").astype("int64")
    x_test = load("t10k-images-idx3")[..., None].astype("float32") / 255
    y_test = load("t10k-labels-idx1").astype("int64")
    kept, _ = stratified_split(y, 0.1, args.seed)
    x, y = x[kept], y[kept]
    # Whole batches only (421 of 128): a last, smaller batch would make XLA
    # compile the train step a second time.
    steps = len(x) // args.batch_size
    if args.max_steps:
        steps = min(steps, args.max_steps)
    x, y = x[:steps * args.batch_size], y[:steps * args.batch_size]

    keras.utils.set_random_seed(args.seed)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate_schedule(args.learning_rate, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    timer = StepTimes(args.progress_file)
    print(f"{steps} iterations on {jax.devices()[0]}", flush=True)
    start = time.perf_counter()
    model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=True,
              callbacks=[LogEvaluationCounts(), timer], verbose=2)
    epoch_time = time.perf_counter() - start
    test = model.evaluate(x_test, y_test, batch_size=500, verbose=0,
                          return_dict=True)
    ode = next(l for l in model.layers if l.__class__.__name__ == "NeuralODE")
    encoder = keras.Model(model.input, ode.input)
    ode(encoder(x_test[:args.batch_size]))  # one eager solve, to count
    result = {
        "benchmark": "gpu_jax", "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "iterations": len(timer.times),
        "median_step_s": float(np.median(timer.times[1:] or timer.times)),
        "first_step_s (compiles)": timer.times[0],
        "epoch_s": epoch_time,
        "nfe_forward_test_batch": float(ode.num_forward_evals),
        "nfe_forward_last_step": timer.last_logs.get("nfe_forward"),
        "nfe_backward_last_step": timer.last_logs.get("nfe_backward"),
        "test_accuracy": 100.0 * test["accuracy"],
        "versions": {"jax": jax.__version__, "keras": keras.__version__,
                     "python": platform.python_version()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    return result


if __name__ == "__main__":
    main()
