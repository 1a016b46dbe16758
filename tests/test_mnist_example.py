"""The MNIST example end to end, on a few hundred images of the real files."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import BACKEND, ROOT, jax_only
from examples import mnist, mnist_common, mnist_data, mnist_options
from keras_node import NeuralODE, gradients, solvers

QUICK = ["--limit", "600", "--batch-size", "32", "--eval-every", "10",
         "--train-eval-batches", "2", "--verbose", "0"]
# For the tests of the harness (printing, logs, resuming), the cheapest
# solve: it compiles and steps in a fraction of Dormand-Prince's time, which
# test_quick_run_prints_and_saves runs.
HARNESS = QUICK + ["--solver", "euler", "--num-steps", "1", "--gradient",
                   "backprop"]
ITER_LINE = re.compile(
    r"^Iter: +(\d+) \|\| Train Accuracy: \d+\.\d{3} \|\| "
    r"Test Accuracy: \d+\.\d{3}$", re.M)


def test_split_is_stratified_90_10(full_mnist):
    train_y, held_y = full_mnist["train"][1], full_mnist["held_out"][1]
    assert (len(train_y), len(held_y)) == (54000, 6000)
    assert len(full_mnist["test"][1]) == 10000
    all_y = np.concatenate([train_y, held_y])
    for label in range(10):
        share = np.sum(all_y == label) * 0.1
        assert abs(np.sum(held_y == label) - share) <= 1
    x = full_mnist["train"][0]
    assert x.shape[1:] == (28, 28, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() == 1.0


def test_final_run_trains_on_all_60000(data_args, full_mnist):
    every = mnist_data.load_mnist(data_args[1], data_args[3], hold_out=False)
    assert set(every) == {"train", "test"}
    labels = every["train"][1]
    assert len(labels) == 60000
    split = np.concatenate([full_mnist["train"][1], full_mnist["held_out"][1]])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(split))
    data = mnist_data.make_datasets(every, 128, seed=0)
    assert set(data) == {"train", "train_eval", "test"}


def test_split_is_reproducible_and_disjoint():
    labels = np.arange(1000) % 10
    kept, held = mnist_common.stratified_split(labels, 0.1, seed=3)
    again = mnist_common.stratified_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(kept, again[0])
    assert len(held) == 100 and not set(kept) & set(held)
    assert len(set(kept) | set(held)) == 1000


def test_augmented_stream_is_reproducible_and_resumes_where_it_left():
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.random((256, 28, 28, 1)).astype("float32"),
                        rng.integers(0, 10, 256))}

    def batches(skip):
        data = mnist_data.make_datasets(arrays, 32, seed=0, shift=2,
                                        rotate=10.0, skip_batches=skip)
        return [x.numpy() for x, _ in data["train"].take(6 - skip)]

    whole = batches(0)
    for a, b in zip(whole + whole[3:], batches(0) + batches(3)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shift, rotate", [(0, 0.0), (2, 0.0), (0, 10.0),
                                           (2, 10.0)])
def test_augmentation_moves_training_images_only(shift, rotate):
    image = np.zeros((28, 28, 1), "float32")
    image[8:20, 13:16] = 1.0  # a bar, changed by shifts and rotations
    x = np.repeat(image[None], 64, axis=0)
    y = np.arange(64) % 10
    arrays = {split: (x, y) for split in ("train", "held_out", "test")}
    data = mnist_data.make_datasets(arrays, 64, seed=0, shift=shift, rotate=rotate)
    images, labels = (t.numpy() for t in next(iter(data["train"])))
    np.testing.assert_array_equal(np.sort(labels), np.sort(y))
    moved = np.abs(images - image).max(axis=(1, 2, 3)) > 0.1
    if shift or rotate:
        assert moved.mean() > 0.8  # (a draw of ~0 shift and angle is rare)
        assert len({im.tobytes() for im in images}) > 32  # per image
    else:
        assert not moved.any()
    held_out = next(iter(data["held_out"]))[0].numpy()
    np.testing.assert_array_equal(held_out, x)


def test_missing_file_is_named(manual_dir, tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz"):
        shutil.copy(manual_dir / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.gz "
                       r"is missing from the manual download folder"):
        mnist_data.check_manual_dir(tmp_path)


def test_corrupt_file_is_named(manual_dir, tmp_path, capsys):
    for name in os.listdir(manual_dir):
        shutil.copy(manual_dir / name, tmp_path / name)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not mnist")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz is "
                       r"corrupt: its SHA-256 is [0-9a-f]{64}, expected"):
        mnist_data.check_manual_dir(tmp_path)
    with pytest.raises(SystemExit):  # a usage error, before any training
        mnist_options.parse_args(["--manual-dir", str(tmp_path)])
    assert "train-labels-idx1-ubyte.gz is corrupt" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_prints_and_saves(data_args, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = mnist.main(data_args + QUICK + ["--max-steps", "12",
                                              "--out", str(out)])
    printed = capsys.readouterr().out
    assert [int(i) for i in ITER_LINE.findall(printed)] == [1, 11]
    assert metrics["iterations"] == 12
    assert 0.0 <= metrics["test_accuracy"] <= 100.0
    # Dormand-Prince counts, 2 + 6 per step, every iteration (not a double
    # count, not the mean of two).
    for point in json.loads((out / "history.json").read_text())[
            "iterations"]:
        for key in ("nfe_forward", "nfe_backward"):
            assert point[key] >= 8 and (point[key] - 2) % 6 == 0, point
    assert json.loads((out / "metrics.json").read_text()) == metrics
    history = json.loads((out / "history.json").read_text())
    assert [p["iteration"] for p in history["accuracy"]] == [1, 11]
    assert [p["iteration"] for p in history["iterations"]] == list(
        range(1, 13))
    for name in ("model.keras", "accuracy.png", "nfe.png"):
        assert (out / name).is_file(), name
    if BACKEND == "tensorflow":
        assert f"keras-node serve --model-base-path {out / 'saved_model'} " \
            "--model-name mnist --port 8501" in printed
        assert f"-d @{out / 'request.json'}" in printed
        request = json.loads((out / "request.json").read_text())
        assert np.array(request["instances"]).shape == (1, 28, 28)
        import tensorflow as tf

        served = tf.saved_model.load(str(out / "saved_model/1"))
        assert {"serving_default", "predict_pixels"} <= set(
            served.signatures)
        # The pixel signature gives what the model gives for the images.
        pixels = np.array(request["instances"], "uint8")
        np.testing.assert_allclose(
            served.signatures["predict_pixels"](
                pixels=tf.constant(pixels))["logits"],
            keras.models.load_model(out / "model.keras").predict(
                pixels[..., None] / np.float32(255), verbose=0),
            rtol=1e-4, atol=1e-5)
    else:
        assert "No SavedModel: exporting one needs Keras' TensorFlow " \
            "backend (keras-node export --classifier" in printed
        assert not (out / "saved_model").exists()

    # Running a finished run again trains no further.
    again = mnist.main(data_args + QUICK + ["--max-steps", "12",
                                            "--out", str(out)])
    assert "holds a finished run (12 iterations)" in capsys.readouterr().out
    assert again["iterations"] == 12
    assert again["test_accuracy"] == metrics["test_accuracy"]


@pytest.mark.slow
def test_iter_lines_start_their_own_line_beside_the_progress_bar(
        data_args, tmp_path, capsys):
    # (Without the bar, --verbose 0, test_quick_run_prints_and_saves.)
    mnist.main(data_args + HARNESS + ["--max-steps", "5", "--eval-every", "2",
                                      "--verbose", "1", "--out",
                                      str(tmp_path / "run")])
    printed = capsys.readouterr().out
    # Iterations 1, 3 and 5, each at the start of a line of its own.
    assert [int(i) for i in ITER_LINE.findall(printed)] == [1, 3, 5]
    assert printed.count("Iter:") == 3
    assert "━" in printed  # the bar was there


@pytest.mark.slow
def test_tensorboard_logs_the_loss_and_evaluation_counts(data_args,
                                                         tmp_path):
    import tensorflow as tf

    logs = tmp_path / "tb"
    mnist.main(data_args + HARNESS + ["--max-steps", "3", "--tensorboard",
                                    str(logs), "--out", str(tmp_path / "run")])
    tags = set()
    for path in (logs / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    for name in ("loss", "accuracy", "nfe_forward", "nfe_backward"):
        assert f"batch_{name}" in tags, sorted(tags)


@pytest.mark.slow
def test_final_run_watches_the_test_split(data_args, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = mnist.main(data_args + HARNESS + [
        "--max-steps", "1", "--train-on-held-out", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "MNIST: 600 train, 0 held out, 600 test images" in printed
    assert metrics["held_out_accuracy"] is None
    # Printed after the one step, on the weights that are then tested.
    (point,) = json.loads((out / "history.json").read_text())["accuracy"]
    assert point["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert (out / "accuracy.png").is_file()


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint(data_args, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "examples.mnist", *data_args,
               *HARNESS, "--epochs", "3", "--max-steps", "40",
               "--checkpoint-every", "5",
               "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT,
                             stderr=subprocess.STDOUT, text=True)
    backup = out / "backup"
    deadline = time.time() + 300
    while not list(backup.glob("ckpt-*.json")) and first.poll() is None:
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (out / "metrics.json").exists(), "the run was not cut short"

    second = subprocess.run(command, capture_output=True, text=True,
                            check=True, cwd=ROOT)
    resumed = re.search(r"Resuming from the checkpoint in .* at iteration "
                        r"(\d+)\.", second.stdout)
    assert resumed, second.stdout[-2000:]
    start = int(resumed.group(1))
    assert start >= 5 and start % 5 == 0
    printed = [int(i) for i in ITER_LINE.findall(second.stdout)]
    assert printed and all(i > start for i in printed)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 40  # resumed, not restarted nor repeated
    history = json.loads((out / "history.json").read_text())
    assert [p["iteration"] for p in history["iterations"]] == list(
        range(1, 41))


def test_benchmark_recipes_are_valid_options():
    from benchmarks.mnist_recipes import RECIPES

    final = mnist_options.parse_args(RECIPES["final"])
    assert (final.epochs, final.shift, final.learning_rate) == (30, 2, 4e-3)
    assert final.kinetic_energy == 1e-4 and final.train_on_held_out
    for options in RECIPES.values():
        mnist_options.parse_args(options)


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit must be a positive integer, got 0"),
    (["--seed", "-1"], "argument --seed: expected an integer from 0 to "
     "4294967295, received '-1'"),
    (["--learning-rate", "-1"], "--learning-rate must be positive, got -1.0"),
    (["--learning-rate", "nan"], "--learning-rate must be positive, got nan"),
    (["--out", __file__], f"--out must be a folder, but {__file__} is a "
     "file"),
    (["--tensorboard", __file__], f"--tensorboard must be a folder, but "
     f"{__file__} is a file"),
    (["--data-dir", __file__], f"--data-dir must be a folder, but "
     f"{__file__} is a file"),
    (["--manual-dir", "/nonexistent"], "--manual-dir must be a folder "
     "holding the MNIST files; /nonexistent is not a folder"),
    (["--strategy", "tpu"], "invalid choice: 'tpu'"),
    (["--ema", "1"], "--ema must be in [0, 1), got 1.0"),
    (["--shift", "14"], "--shift must be in [0, 13] pixels, got 14"),
    (["--weight-decay", "-1"], "--weight-decay must be at least 0, got -1.0"),
    (["--kinetic-energy", "nan"],
     "--kinetic-energy must be at least 0, got nan"),
    (["--rotate", "-5"], "--rotate must be in [0, 180] degrees, got -5.0"),
    (["--augment-dim", "-1"], "--augment-dim must be at least 0, got -1"),
    (["--solver", "rk45"], "invalid choice: 'rk45'"),
    (["--solver", "rk4", "--num-steps", "0"],
     "--num-steps must be a positive integer, got 0"),
    (["--num-steps", "4"], "--num-steps is for the fixed-step solvers "
     "(euler, midpoint, rk4), not --solver dopri5"),
    (["--unroll"], "--unroll is for the fixed-step solvers "
     "(euler, midpoint, rk4), not --solver dopri5"),
    (["--solver", "rk4", "--adjoint-norm", "full"],
     "--adjoint-norm is for --gradient adjoint with an adaptive solver"),
    (["--gradient", "backprop", "--adjoint-norm", "full"],
     "--adjoint-norm is for --gradient adjoint with an adaptive solver"),
    pytest.param(["--strategy", "mirrored"], "--strategy mirrored needs "
                 "Keras' TensorFlow backend; on jax use auto",
                 marks=jax_only("TensorFlow runs it")),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        mnist_options.parse_args(argv)
    assert message in capsys.readouterr().err


def test_only_fixed_step_solvers_unroll():
    with pytest.raises(ValueError, match=r"Only fixed-step solvers unroll\. "
                       r"Received: solver='dopri5', unroll=True"):
        mnist_common.solver_and_gradient("dopri5", None, "adjoint", None,
                                         True)


@pytest.mark.slow
def test_solver_and_gradient_options_reach_the_model(data_args, tmp_path):
    out = tmp_path / "run"
    metrics = mnist.main(data_args + QUICK + [
        "--max-steps", "2", "--out", str(out), "--solver", "rk4",
        "--num-steps", "3", "--unroll", "--gradient", "backprop",
        "--augment-dim", "2"])
    # RK4: four evaluations a step, each differentiated once.
    assert metrics["nfe_forward_last_20"] == 12
    assert metrics["nfe_backward_last_20"] == 12
    model = keras.models.load_model(out / "model.keras")
    ode = next(l for l in model.layers if isinstance(l, NeuralODE))
    assert ode.solver == solvers.RK4(num_steps=3, unroll=True)
    assert ode.gradient == gradients.Backprop()
    assert ode.augment_dim == 2 and ode.dynamics.output_shape[-1] == 66


def killed_before_saving_the_model(argv, monkeypatch):
    """Runs the example with `argv`, killed after `fit` returned, before
    model.keras is written (the checkpoint is still there)."""
    def killed(model, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(mnist, "save_model_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        mnist.main(argv)
    monkeypatch.undo()


@pytest.mark.slow
def test_crash_after_training_resumes_at_the_end(data_args, tmp_path,
                                                 monkeypatch, capsys):
    # Killed after `fit` returned, before model.keras was written: the
    # checkpoint is still there, so the next run trains no further.
    out = tmp_path / "run"
    argv = data_args + HARNESS + ["--max-steps", "7", "--checkpoint-every",
                                  "5", "--out", str(out)]

    killed_before_saving_the_model(argv, monkeypatch)
    assert not (out / "model.keras").exists()
    assert (out / "backup" / "ckpt-7.json").exists()
    # A history truncated by an older version's in-place write.
    history = out / "history.json"
    history.write_text(history.read_text()[:50])
    capsys.readouterr()
    metrics = mnist.main(argv)
    printed = capsys.readouterr().out
    assert "Resuming from the checkpoint" in printed and "iteration 7." \
        in printed
    assert "history.json is damaged" in printed
    assert metrics["iterations"] == 7
    assert not (out / "backup").exists()  # removed once all is written
    artifacts = ["model.keras", "metrics.json"]
    if BACKEND == "tensorflow":
        artifacts.append("saved_model/1")
    for name in artifacts:
        assert (out / name).exists(), name


def test_averaged_weights_survive_a_crash_after_training(
        data_args, tmp_path, monkeypatch):
    # With --ema, a run killed before model.keras was written resumes to
    # the averaged weights, as the uninterrupted run ends with (its last
    # checkpoint, at the end of `fit`, holds the raw weights).
    argv = data_args + HARNESS + ["--max-steps", "4", "--checkpoint-every",
                                  "2", "--ema", "0.9", "--out"]
    whole = mnist.main(argv + [str(tmp_path / "whole")])
    killed_before_saving_the_model(argv + [str(tmp_path / "cut")],
                                   monkeypatch)
    resumed = mnist.main(argv + [str(tmp_path / "cut")])
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"],
                                                 rel=1e-6)
    models = [keras.models.load_model(tmp_path / run / "model.keras")
              for run in ("whole", "cut")]
    for a, b in zip(*(m.get_weights() for m in models)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_resuming_with_other_options_is_refused(data_args, tmp_path,
                                                monkeypatch):
    # A run killed after its first checkpoint, resumed with another solver
    # and batch size.
    out = tmp_path / "run"
    argv = data_args + HARNESS + ["--max-steps", "7", "--checkpoint-every",
                                  "5", "--out", str(out)]

    killed_before_saving_the_model(argv, monkeypatch)
    with pytest.raises(SystemExit, match=(
            rf"{out} holds a run with other options: --batch-size 32 \(this "
            r"command: 64\), --solver euler \(this command: midpoint\)\. "
            r"Resume it with its own options, or pass another --out")):
        mnist.main(argv + ["--batch-size", "64", "--solver", "midpoint"])
    assert (out / "backup" / "ckpt-7.json").exists()  # nothing lost


def test_a_limit_with_no_image_held_out_is_refused(data_args, tmp_path):
    with pytest.raises(SystemExit, match=r"--limit 5 holds no image out"):
        mnist.main(data_args + QUICK[2:] + ["--limit", "5", "--out",
                                            str(tmp_path / "run")])


def test_damaged_checkpoints_stop_with_a_message(data_args, tmp_path,
                                                 capsys):
    out = tmp_path / "run"
    (out / "backup").mkdir(parents=True)
    (out / "backup" / "ckpt-5.json").write_text("")
    with pytest.raises(SystemExit, match=r"No checkpoint in .*backup can be "
                       r"restored: .*ckpt-5.json is damaged .* Remove "
                       r".*backup to start the run over from iteration 0."):
        mnist.main(data_args + QUICK + ["--max-steps", "7", "--out",
                                        str(out)])


@pytest.mark.parametrize("kwargs, name", [(dict(every=0), "every"),
                                          (dict(train_batches=1.5),
                                           "train_batches")])
def test_accuracy_monitor_arguments(kwargs, name):
    import tensorflow as tf

    from examples.mnist_common import AccuracyMonitor

    data = tf.data.Dataset.from_tensor_slices((np.zeros((2, 2)), [0, 1]))
    with pytest.raises(ValueError, match=rf"argument `{name}`, expected a "
                       rf"positive integer. Received: {name}="):
        AccuracyMonitor(data, data, **kwargs)


@pytest.mark.slow
@jax_only("benchmarks/gpu_jax.py runs on Keras' JAX backend")
def test_gpu_benchmark_script_runs_on_cpu(manual_dir, tmp_path):
    """benchmarks/gpu_jax.py, three iterations on the CPU."""
    from benchmarks import gpu_jax

    result = gpu_jax.main(["--manual-dir", str(manual_dir), "--max-steps", "3",
                           "--batch-size", "16", "--test-images", "500",
                           "--json-out",
                           str(tmp_path / "out.json"), "--progress-file",
                           str(tmp_path / "progress.txt")])
    assert result["iterations"] == 3
    assert result["train_images"] == 54000
    assert (result["nfe_backward_last_step"] - 2) % 6 == 0
    assert "iteration 1: " in (tmp_path / "progress.txt").read_text()
    assert 0.0 <= result["test_accuracy"] <= 100.0
    assert result["nfe_forward_test_batch"] >= 8
    assert (result["nfe_forward_test_batch"] - 2) % 6 == 0
    assert (tmp_path / "out.json").exists()
    assert result["jit_compile"]


@jax_only("benchmarks/gpu_jax.py runs on Keras' JAX backend")
@pytest.mark.parametrize("option", ["--batch-size", "--test-images"])
def test_gpu_benchmark_refuses_non_positive_sizes(option, manual_dir,
                                                  capsys):
    from benchmarks import gpu_jax

    with pytest.raises(SystemExit):
        gpu_jax.main(["--manual-dir", str(manual_dir), option, "0"])
    assert f"{option} must be positive" in capsys.readouterr().err


@pytest.mark.slow
@jax_only("benchmarks/gpu_jax.py runs on Keras' JAX backend")
def test_gpu_benchmark_long_recipe_compiles_its_step(manual_dir, tmp_path):
    """gpu_jax.py --long: augmentation in the step, still compiled by XLA.

    RandomTranslation declares that it does not support XLA; left so, Keras
    trains eagerly, 300 times slower on a GPU.
    """
    from benchmarks import gpu_jax

    result = gpu_jax.main(["--manual-dir", str(manual_dir), "--long", "--epochs",
                           "2", "--max-steps", "2", "--batch-size", "16",
                           "--train-on-held-out", "--test-images", "500"])
    assert result["jit_compile"]
    assert result["train_images"] == 60000
    assert result["options"]["shift"] == 2
    assert result["options"]["weight_decay"] == 0.05
    assert result["iterations"] == 4
    assert len(result["test_accuracy_per_epoch"]) == 2
