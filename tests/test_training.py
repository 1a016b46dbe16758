"""Checkpoints that survive kills and damage, against uninterrupted runs."""

import json

import keras
import numpy as np
import pytest

from helpers import mlp_dynamics
from keras_node import NeuralODE
from keras_node.training import (CheckpointError, ResumableCheckpoint,
                                 save_model_atomic, write_atomic)


def model_and_data(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, NeuralODE(mlp_dynamics(8, 3), solver="rk4",
                                          gradient="backprop")(inputs))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x = np.random.default_rng(seed).normal(size=(40, 3)).astype("float32")
    return model, x, 2 * x


def train(model, x, y, steps, callbacks=(), initial=0):
    # One batch of 4 an iteration, the same stream whatever the start.
    for i in range(initial, steps):
        rows = slice(4 * (i % 10), 4 * (i % 10) + 4)
        model.train_on_batch(x[rows], y[rows])
        for callback in callbacks:
            callback.on_train_batch_end(i)


def checkpointed_run(folder, steps, save_every=5):
    model, x, y = model_and_data()
    checkpoint = ResumableCheckpoint(folder, save_every=save_every)
    checkpoint.set_model(model)
    train(model, x, y, steps, [checkpoint])
    return model, checkpoint


def fresh(folder):
    _, x, y = model_and_data()
    model, _, _ = model_and_data(seed=1)  # other initial weights
    checkpoint = ResumableCheckpoint(folder)
    checkpoint.set_model(model)
    return model, checkpoint, x, y


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole, _ = checkpointed_run(tmp_path / "a", 14)
    checkpointed_run(tmp_path / "b", 12)  # killed after iteration 12
    model, checkpoint, x, y = fresh(tmp_path / "b")
    assert checkpoint.restore() == 10
    train(model, x, y, 14, [checkpoint], initial=10)
    for a, b in zip(whole.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.iterations() == [10, 5]  # the last two kept


def test_empty_folder_starts_at_zero(tmp_path):
    _, checkpoint, _, _ = fresh(tmp_path / "none")
    assert checkpoint.restore() == 0


def test_kill_during_the_first_write_starts_at_zero(tmp_path):
    checkpointed_run(tmp_path, 5)
    (tmp_path / "ckpt-5.json").unlink()  # the JSON comes last
    _, checkpoint, _, _ = fresh(tmp_path)
    assert checkpoint.restore() == 0


@pytest.mark.parametrize("damage", ["empty json", "flipped bytes",
                                    "truncated weights", "deleted weights",
                                    "other weights"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, damage, caplog):
    checkpointed_run(tmp_path, 10)
    weights, meta = tmp_path / "ckpt-10.weights.h5", tmp_path / "ckpt-10.json"
    if damage == "empty json":
        meta.write_text("")
    elif damage == "flipped bytes":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
        weights.write_bytes(bytes(data))
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "deleted weights":
        weights.unlink()
    else:  # iteration 5's weights under iteration 10's name, checksum fixed
        weights.write_bytes((tmp_path / "ckpt-5.weights.h5").read_bytes())
        record = json.loads(meta.read_text())
        import hashlib
        record.update(size=weights.stat().st_size,
                      sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
        meta.write_text(json.dumps(record))
    model, checkpoint, _, _ = fresh(tmp_path)
    assert checkpoint.restore() == 5
    assert int(model.optimizer.iterations.numpy()) == 5
    assert "Skipped a damaged checkpoint" in caplog.text


def test_no_sound_checkpoint_names_the_files(tmp_path):
    checkpointed_run(tmp_path, 10)
    for iteration in (5, 10):
        path = tmp_path / f"ckpt-{iteration}.weights.h5"
        path.write_bytes(path.read_bytes()[:100])
    _, checkpoint, _, _ = fresh(tmp_path)
    with pytest.raises(CheckpointError, match=(
            rf"No checkpoint in {tmp_path} can be restored: "
            rf".*ckpt-10.weights.h5 is damaged .*; .*ckpt-5.weights.h5 is "
            rf"damaged .* Remove {tmp_path} to start the run over")):
        checkpoint.restore()


@pytest.mark.parametrize("kwargs, name", [(dict(save_every=0), "save_every"),
                                          (dict(keep=1.5), "keep")])
def test_checkpoint_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=rf"argument `{name}`, expected a "
                       rf"positive integer. Received: {name}="):
        ResumableCheckpoint(tmp_path, **kwargs)


def test_atomic_writes_leave_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    write_atomic(path, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    model, _, _ = model_and_data()
    with pytest.raises(KeyboardInterrupt):
        save_model_atomic(model, tmp_path / "model.keras")
    assert not (tmp_path / "model.keras").exists()
    monkeypatch.undo()
    save_model_atomic(model, tmp_path / "model.keras")
    assert keras.models.load_model(tmp_path / "model.keras").count_params() \
        == model.count_params()
