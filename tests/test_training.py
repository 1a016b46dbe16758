"""Checkpoints that survive kills and damage, against uninterrupted runs."""

import json
import pathlib

import keras
import numpy as np
import pytest

from conftest import BACKEND
from helpers import mlp_dynamics
from keras_node import NeuralODE
from keras_node.training import (CheckpointError, ResumableCheckpoint,
                                 StopAtIteration, agree_on_checkpoint,
                                 distribution_strategy, peers_watched,
                                 save_model_atomic, worker_folder,
                                 write_atomic)


def model_and_data(seed=0, dropout=False):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    # Dropout draws from its seed generator, seeded by `seed`.
    hidden = keras.layers.Dropout(0.5)(inputs) if dropout else inputs
    model = keras.Model(inputs, NeuralODE(mlp_dynamics(8, 3), solver="rk4",
                                          gradient="backprop")(hidden))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x = np.random.default_rng(seed).normal(size=(40, 3)).astype("float32")
    return model, x, 2 * x


def train(model, x, y, steps, callbacks=(), initial=0):
    # One batch of 4 an iteration, the same stream whatever the start.
    for i in range(initial, steps):
        rows = slice(4 * (i % 10), 4 * (i % 10) + 4)
        model.train_on_batch(x[rows], y[rows])
        for callback in callbacks:  # as `fit`: the index in this call
            callback.on_train_batch_end(i - initial)


def checkpointed_run(folder, steps, save_every=5, dropout=False):
    model, x, y = model_and_data(dropout=dropout)
    checkpoint = ResumableCheckpoint(folder, save_every=save_every)
    checkpoint.set_model(model)
    train(model, x, y, steps, [checkpoint])
    return model, checkpoint


def fresh(folder, dropout=False):
    _, x, y = model_and_data()
    # Other initial weights, and another seed for Dropout.
    model, _, _ = model_and_data(seed=1, dropout=dropout)
    checkpoint = ResumableCheckpoint(folder)
    checkpoint.set_model(model)
    return model, checkpoint, x, y


@pytest.mark.parametrize("dropout", [False, True])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, dropout):
    # With Dropout, the same only if the checkpoint holds the state of its
    # seed generator: the masks of iterations 11 to 14 depend on it.
    whole, _ = checkpointed_run(tmp_path / "a", 14, dropout=dropout)
    checkpointed_run(tmp_path / "b", 12, dropout=dropout)  # killed after 12
    model, checkpoint, x, y = fresh(tmp_path / "b", dropout=dropout)
    assert checkpoint.restore() == 10
    train(model, x, y, 14, [checkpoint], initial=10)
    for a, b in zip(whole.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.iterations() == [10, 5]  # the last two kept


def test_resume_takes_the_batches_of_skipped_mixed_precision_steps(
        tmp_path):
    # Under mixed_float16 the optimizer is a LossScaleOptimizer: it skips,
    # without counting, a step whose gradients overflow float16 (here each
    # batch 3 of 10, whose targets are 1e4 times larger). The data position
    # is the batches taken; fit's batch index starts again at 0 each epoch.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype("float32")
    y = 2 * x
    y[12:16] *= 1e4

    def run(folder, start, total, save_every=5):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(
            3, dtype="float32")(hidden))
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        checkpoint = ResumableCheckpoint(folder, save_every=save_every)
        checkpoint.set_model(model)
        done = checkpoint.restore()
        assert done == start

        def stream(i):
            while True:
                yield x[4 * (i % 10):][:4], y[4 * (i % 10):][:4]
                i += 1

        model.fit(stream(checkpoint.batches), steps_per_epoch=4, epochs=20,
                  shuffle=False, verbose=0,
                  callbacks=[checkpoint, StopAtIteration(total)])
        return model, checkpoint

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        whole, checkpoint = run(tmp_path / "a", 0, 20)
        assert checkpoint.batches > 20  # steps were skipped
        run(tmp_path / "b", 0, 13)  # saves its end: step 13
        model, checkpoint = run(tmp_path / "b", 13, 20)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for a, b in zip(whole.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


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


def test_checkpoints_without_seed_states_restore_the_weights(tmp_path):
    # As written before checkpoints held the seed generators' states and
    # the batches taken.
    whole, _ = checkpointed_run(tmp_path, 10, dropout=True)
    for meta in tmp_path.glob("ckpt-*.json"):
        record = json.loads(meta.read_text())
        del record["seed_states"], record["batches"]
        meta.write_text(json.dumps(record))
    model, checkpoint, _, _ = fresh(tmp_path, dropout=True)
    assert checkpoint.restore() == 10
    assert checkpoint.batches == 10
    for a, b in zip(whole.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("states, message", [
    ([], "holds 0 seed-generator states, the model has 1 seed generators"),
    ("[[0, 1]]", "holds no list of seed-generator states, the model has 1"),
    ([[0, 1, 2]], "holds seed-generator state 0, which is not an array of "),
    ([[1.5, 2.5]], "holds seed-generator state 0, which is not an array of "),
    ([[2**70, 0]], "holds seed-generator state 0, which is not an array of "),
    ([[1, 2], [3]], "holds 2 seed-generator states, the model has 1"),
    ([[[1], 2]], "holds seed-generator state 0, which is not an array of "),
])
def test_seed_states_that_do_not_fit_fall_back(tmp_path, caplog, states,
                                               message):
    # The JSON is not covered by the weights' checksum.
    checkpointed_run(tmp_path, 10, dropout=True)
    meta = tmp_path / "ckpt-10.json"
    record = json.loads(meta.read_text())
    assert len(record["seed_states"]) == 1  # Dropout's
    record["seed_states"] = states
    meta.write_text(json.dumps(record))
    _, checkpoint, _, _ = fresh(tmp_path, dropout=True)
    assert checkpoint.restore() == 5
    assert f"{meta} {message}" in caplog.text


@pytest.mark.parametrize("batches", [9, 10.5, "12", None])
def test_a_bad_count_of_batches_falls_back(tmp_path, caplog, batches):
    checkpointed_run(tmp_path, 10)
    meta = tmp_path / "ckpt-10.json"
    record = json.loads(meta.read_text())
    assert record["batches"] == 10
    record["batches"] = batches
    meta.write_text(json.dumps(record))
    _, checkpoint, _, _ = fresh(tmp_path)
    assert checkpoint.restore() == 5 and checkpoint.batches == 5
    assert (f"{meta} holds {batches!r} batches taken, not an integer of at "
            "least its iteration, 10") in caplog.text


def test_a_damaged_checkpoint_is_written_anew(tmp_path):
    # Resumed from 5 past a damaged 10: reaching 10 replaces it, so the
    # next resume starts there, with the uninterrupted run's weights.
    whole, _ = checkpointed_run(tmp_path / "whole", 10)
    checkpointed_run(tmp_path / "run", 10)
    weights = tmp_path / "run" / "ckpt-10.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100])
    model, checkpoint, x, y = fresh(tmp_path / "run")
    assert checkpoint.restore() == 5
    train(model, x, y, 10, [checkpoint], initial=5)
    checkpoint.on_train_end()  # saves at 10
    model, checkpoint, _, _ = fresh(tmp_path / "run")
    assert checkpoint.restore() == 10
    for a, b in zip(whole.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_run_that_steps_back_drops_the_later_checkpoints(tmp_path):
    checkpointed_run(tmp_path, 10)
    (tmp_path / "ckpt-999.json").write_text("{}")  # a foreign file
    model, checkpoint, x, y = fresh(tmp_path)
    assert checkpoint.restore(iteration=5) == 5
    train(model, x, y, 8, [checkpoint], initial=5)
    checkpoint.save()  # at 8: 10 and 999 are another run's
    assert checkpoint.iterations() == [8, 5]


def test_a_run_that_steps_back_writes_over_what_it_restored(tmp_path):
    # Restored at 10, stepped back to 5, trained to 10 on other data: its
    # own checkpoint at 10 replaces the one it first restored.
    checkpointed_run(tmp_path, 10)
    model, checkpoint, x, y = fresh(tmp_path)
    assert checkpoint.restore() == 10
    assert checkpoint.restore(iteration=5) == 5
    train(model, x, -y, 10, [checkpoint], initial=5)
    checkpoint.on_train_end()  # as `fit` ends
    resumed, again, _, _ = fresh(tmp_path)
    assert again.restore() == 10
    for a, b in zip(model.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_restore_needs_a_built_compiled_model(tmp_path):
    checkpointed_run(tmp_path, 5)
    checkpoint = ResumableCheckpoint(tmp_path)
    checkpoint.set_model(keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(ValueError, match=r"ResumableCheckpoint.restore needs "
                       r"a built and compiled model"):
        checkpoint.restore()


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


@pytest.mark.parametrize("kwargs, name, error", [
    (dict(save_every=0), "save_every", ValueError),
    (dict(keep=1.5), "keep", TypeError)])
def test_checkpoint_arguments(tmp_path, kwargs, name, error):
    with pytest.raises(error, match=rf"argument `{name}`, expected a "
                       rf"positive integer. Received: {name}="):
        ResumableCheckpoint(tmp_path, **kwargs)
    with pytest.raises(TypeError, match=r"argument `directory`, expected a "
                       r"folder's path \(a str or an os.PathLike\). "
                       r"Received: directory=None"):
        ResumableCheckpoint(None)


def test_atomic_writes_leave_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    write_atomic(path, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]  # no partial file left
    model, _, _ = model_and_data()
    with pytest.raises(KeyboardInterrupt):
        save_model_atomic(model, tmp_path / "model.keras")
    assert list(tmp_path.iterdir()) == [path]  # no partial model left
    monkeypatch.undo()
    save_model_atomic(model, tmp_path / "model.keras")
    assert keras.models.load_model(
        tmp_path / "model.keras", compile=False).count_params() \
        == model.count_params()


def test_stop_at_iteration_counts_the_optimizer_steps(tmp_path):
    # A run resumed at step 6 stops at step 10, as the whole run would.
    model, x, y = model_and_data()
    model.fit(x[:24], y[:24], batch_size=4, epochs=1, verbose=0)  # 6 steps
    model.fit(x, y, batch_size=4, epochs=5, verbose=0,
              callbacks=[StopAtIteration(10)])
    assert int(model.optimizer.iterations.numpy()) == 10


def test_numpy_integers_are_integers(tmp_path):
    assert StopAtIteration(np.int64(5)).total == 5
    assert ResumableCheckpoint(tmp_path, save_every=np.int32(3)).save_every \
        == 3


@pytest.mark.parametrize("total, error", [
    (0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_stop_at_iteration_argument(total, error):
    with pytest.raises(error, match=r"argument `total`, expected a "
                       rf"positive integer. Received: total={total!r}"):
        StopAtIteration(total)


def test_distribution_strategy_names():
    with pytest.raises(ValueError, match=r"argument `name`, expected one of "
                       r"\('auto', 'default', 'mirrored', 'multiworker'\). "
                       r"Received: name='tpu'"):
        distribution_strategy("tpu")
    strategy = distribution_strategy("default")
    if BACKEND == "jax":
        assert strategy is None
        with pytest.raises(ValueError, match=r"argument `name`, expected "
                           r"'auto' or 'default' on Keras' jax backend .* "
                           r"Received: name='mirrored'"):
            distribution_strategy("mirrored")
    else:
        import tensorflow as tf

        assert strategy is tf.distribute.get_strategy()
        mirrored = distribution_strategy("mirrored")  # the 2 logical CPUs
        assert mirrored.num_replicas_in_sync == 2


class _Resolver:
    def __init__(self, cluster, task_type, task_id):
        self.task_type, self.task_id = task_type, task_id
        self._cluster = cluster

    def cluster_spec(self):
        return type("Spec", (), {"as_dict": lambda _: self._cluster})()


@pytest.mark.parametrize("cluster, task, folder", [
    ({}, ("worker", 0), "out"),  # not a cluster
    ({"worker": ["a", "b"]}, ("worker", 0), "out"),  # the first worker leads
    ({"worker": ["a", "b"]}, ("worker", 1), "out/.worker-1"),
    ({"chief": ["c"], "worker": ["a"]}, ("chief", 0), "out"),
    ({"chief": ["c"], "worker": ["a"]}, ("worker", 0), "out/.worker-0"),
])
def test_worker_folder_only_the_chief_writes_to_out(cluster, task, folder):
    strategy = type("Strategy", (), {})()
    strategy.cluster_resolver = _Resolver(cluster, *task)
    assert worker_folder(strategy, "out") == pathlib.Path(folder)
    assert worker_folder(None, "out") == pathlib.Path("out")


def test_single_worker_resume_and_peers_watched_pass_through(tmp_path):
    model, x, y = model_and_data()
    checkpoint = ResumableCheckpoint(tmp_path, save_every=3)
    checkpoint.set_model(model)
    with peers_watched(None):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[checkpoint, StopAtIteration(7)])
    fresh_model, _, _ = model_and_data()
    again = ResumableCheckpoint(tmp_path, save_every=3)
    again.set_model(fresh_model)
    again.restore()
    assert agree_on_checkpoint(None, again) == 7  # saved at the end of fit
    with pytest.raises(KeyError):  # other errors pass unchanged
        with peers_watched(None):
            raise KeyError("x")


class _DisagreeingWorkers:
    """A strategy whose other worker's checkpoint is at iteration 4."""

    def run(self, fn):
        return None

    def experimental_local_results(self, _):
        import tensorflow as tf

        return [tf.constant([7, 4])]


def test_workers_that_cannot_agree_on_a_checkpoint_exit(tmp_path,
                                                        monkeypatch):
    from keras_node import training

    model, x, y = model_and_data()
    checkpoint = ResumableCheckpoint(tmp_path, save_every=100)
    checkpoint.set_model(model)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0,
              callbacks=[checkpoint, StopAtIteration(7)])
    fresh_model, _, _ = model_and_data()
    again = ResumableCheckpoint(tmp_path, save_every=100)
    again.set_model(fresh_model)
    again.restore()  # iteration 7; this worker has none at 4
    monkeypatch.setattr(training, "_multi_worker", lambda strategy: True)
    with pytest.raises(SystemExit, match=(
            r"This worker's checkpoint is at iteration 7, another's at 4: "
            r"the workers cannot resume together. Remove every worker's "
            r"checkpoint folder \(.*\) to start over.")):
        agree_on_checkpoint(_DisagreeingWorkers(), again)
