"""The Keras layer contract: shapes, config, saving, training, distribution."""

import contextlib
import gc
import json
import os
import subprocess
import sys
import warnings
import weakref

import keras
import numpy as np
import pytest
import scipy.linalg

from conftest import BACKEND, ROOT, jax_only, tensorflow_only

from helpers import (Linear, OdeRnnCell, Square, kinetic_energy_after_fit,
                     mlp_dynamics, small_conv_dynamics)
from helpers import gradients as tape_gradients
from keras_node import NeuralODE, gradients, solvers
from keras_node.callbacks import LogEvaluationCounts


def conv_model(name_a="neural_ode", two_odes=False):
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 1)(inputs)
    x = NeuralODE(small_conv_dynamics(4), name=name_a)(x)
    if two_odes:
        x = NeuralODE(small_conv_dynamics(4), name="second_ode")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6, 6, 2)).astype("float32"),
            rng.integers(0, 3, n))


def test_output_shape_and_unknown_batch():
    model = conv_model()
    assert model.output_shape == (None, 3)
    ode = model.get_layer("neural_ode")
    assert ode.compute_output_shape((None, 6, 6, 4)) == (None, 6, 6, 4)
    for batch in (1, 5):
        x, _ = data(batch)
        assert model(x).shape == (batch, 3)


def test_a_functional_call_may_pass_training():
    # As a Keras layer's: `NeuralODE(f)(x, training=False)` in a graph (it
    # failed: compute_output_spec took no `training`).
    inputs = keras.Input((2,))
    ode = NeuralODE(Linear(np.array([[-0.3, 1.0], [0.2, 0.5]])))
    model = keras.Model(inputs, ode(inputs, training=False))
    x = np.ones((3, 2), "float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), ode(x),
                               rtol=1e-6)


def test_config_round_trip():
    ode = NeuralODE(mlp_dynamics(5, 3), t0=0.5, t1=-2.0, rtol=1e-4,
                    atol=1e-5,
                    solver=solvers.Tsit5(first_step_size=0.1,
                                         max_num_steps=77),
                    gradient=gradients.Adjoint(rtol=1e-2, atol=1e-3,
                                               norm="full"),
                    kinetic_energy=0.01, save_at=[0.0, -1.0, -2.0],
                    name="ode")
    config = ode.get_config()
    json.dumps(config)  # serializable as JSON
    restored = NeuralODE.from_config(config)
    assert restored.get_config() == config
    for key in ("t0", "t1", "rtol", "atol", "solver", "gradient",
                "kinetic_energy", "save_at"):
        assert getattr(restored, key) == getattr(ode, key)
    assert restored.solver.max_num_steps == 77
    assert restored.gradient.norm == "full"
    assert isinstance(restored.dynamics, keras.Sequential)


@pytest.mark.slow
def test_save_at_adds_a_time_axis_and_saves(tmp_path):
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 1)(inputs)
    hs = NeuralODE(small_conv_dynamics(4), save_at=[0.5, 1.0])(h)
    assert hs.shape == (None, 2, 6, 6, 4)
    # A per-time head, as a latent ODE or a time-series model would use.
    outputs = keras.layers.Dense(3)(keras.layers.Reshape((2, 144))(hs))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "mse")
    x, _ = data(8)
    model.fit(x, np.zeros((8, 2, 3), "float32"), verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-6)


def test_adjoint_tolerances_default_to_forward():
    ode = NeuralODE(mlp_dynamics(5, 3), rtol=1e-4, atol=1e-6)
    _, adjoint = ode._solve_options()
    assert (adjoint["rtol"], adjoint["atol"]) == (1e-4, 1e-6)
    ode = NeuralODE(mlp_dynamics(5, 3), rtol=1e-4, atol=1e-6,
                    gradient=gradients.Adjoint(rtol=1e-2))
    _, adjoint = ode._solve_options()
    assert (adjoint["rtol"], adjoint["atol"]) == (1e-2, 1e-6)


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_fit_logs_evaluation_counts(steps_per_execution):
    # With steps_per_execution, the steps run in a loop of the trainer's:
    # the layer counts there (it is no loop of the layer's call).
    model = conv_model()
    model.compile(model.optimizer, model.loss,
                  steps_per_execution=steps_per_execution)
    x, y = data()
    batches = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batches.append(dict(logs)))
    # LogEvaluationCounts: needed on JAX, without effect on TensorFlow.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LogEvaluationCounts(), record])
    assert len(batches) == 2 // steps_per_execution
    for logs in batches:
        # Dormand-Prince: the first derivative and Hairer's first-step
        # heuristic, then six evaluations a step, accepted or rejected.
        steps = logs["steps_accepted"] + logs["steps_rejected"]
        assert logs["steps_accepted"] >= 1
        assert logs["nfe_forward"] == 2 + 6 * steps
        # The adjoint's one backward solve counts alike (a double count
        # would leave a remainder of 2).
        assert logs["nfe_backward"] >= 8
        assert (logs["nfe_backward"] - 2) % 6 == 0
    # The logged counts are the last step's: the layer's own counters.
    ode = model.get_layer("neural_ode")
    assert float(ode.num_forward_evals) == batches[-1]["nfe_forward"]
    assert float(ode.num_backward_evals) == batches[-1]["nfe_backward"]


def test_epoch_logs_keep_the_train_counts_past_validation():
    # dh/dt = h^2 from 0.9 nears its blow-up at t = 1.1: many more steps
    # than from 0.1, the validation batch.
    hard, easy = np.full((8, 1), 0.9, "float32"), np.full((8, 1), 0.1,
                                                          "float32")
    inputs = keras.Input((1,))
    ode = NeuralODE(Square(), rtol=1e-6, atol=1e-6)
    model = keras.Model(inputs, keras.layers.Dense(1)(ode(inputs)))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    batches = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batches.append(dict(logs)))
    history = model.fit(hard, hard, verbose=0, validation_data=(easy, easy),
                        callbacks=[LogEvaluationCounts(), record])
    assert history.history["nfe_forward"] == [batches[-1]["nfe_forward"]]
    assert float(ode.num_forward_evals) < batches[-1]["nfe_forward"] / 2
    # The validation solve's own counts, as `evaluate`'s.
    assert history.history["val_nfe_forward"] == [
        float(ode.num_forward_evals)]
    # No backward solve in validation and `evaluate`: no backward count
    # (the counter still holds the last training step's).
    assert "nfe_backward" in history.history
    assert "val_nfe_backward" not in history.history
    tested = []
    model.evaluate(hard, hard, verbose=0, callbacks=[
        LogEvaluationCounts(), keras.callbacks.LambdaCallback(
            on_test_batch_end=lambda batch, logs: tested.append(dict(logs)),
            on_test_end=lambda logs: tested.append(dict(logs)))])
    assert tested[-1]["nfe_forward"] == batches[-1]["nfe_forward"]
    assert tested[-1]["steps_accepted"] == float(ode.steps_accepted)
    assert not any("nfe_backward" in logs for logs in tested)


@pytest.mark.parametrize("training", [False, True])
def test_a_forced_training_flag_does_not_change_which_counts_are_logged(
        training):
    # Dynamics kept in inference mode in training (training=False), or
    # random in evaluation (training=True, "MC dropout"): a train step
    # still solves backward, a test step still does not.
    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.ode = NeuralODE(keras.Sequential([
                keras.layers.Dense(4, activation="tanh"),
                keras.layers.Dropout(0.1), keras.layers.Dense(2)]))

        def call(self, x):
            return self.ode(x, training=training)

    x = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
    model = Model()
    model.compile("sgd", "mse")
    logs = model.fit(x, x, verbose=0, validation_data=(x, x),
                     callbacks=[LogEvaluationCounts()]).history
    assert logs["nfe_backward"][0] > 0
    assert "val_nfe_forward" in logs and "val_nfe_backward" not in logs


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_dynamics_named_with_a_leading_underscore_train(gradient):
    # TensorFlow's graph-mode gradient starts at the root name scope, which
    # refuses a name starting with "_" (Keras names `_Dynamics` "_dynamics").
    model = keras.Sequential([
        keras.Input((2,)),
        NeuralODE(keras.layers.Dense(2, name="_dynamics"), gradient=gradient)])
    model.compile("sgd", "mse")
    history = model.fit(np.ones((4, 2)), np.zeros((4, 2)), verbose=0)
    assert np.isfinite(history.history["loss"][0])


@contextlib.contextmanager
def shared_model_warnings():
    """Collects the "shares its model" warnings given inside, repeats
    included; other warnings are filtered as usual."""
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield messages
    messages.extend(str(w.message) for w in caught
                    if "shares its model" in str(w.message))


@pytest.mark.slow
def test_two_layers_get_prefixed_counts():
    # The layer without a name warns (once) that its keys changed; the
    # named one chose its keys.
    model = conv_model(name_a=None, two_odes=True)
    first = model.layers[2].name
    x, y = data()
    with shared_model_warnings() as messages:
        logs = model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                         callbacks=[LogEvaluationCounts()]).history
    assert messages == [
        f"NeuralODE '{first}' shares its model with other NeuralODE layers: "
        f"its counts are logged as '{first}_nfe_forward', "
        f"'{first}_nfe_backward', '{first}_steps_accepted' and "
        f"'{first}_steps_rejected' (alone in a model, a layer logs "
        "'nfe_forward', ...). Name the layers to choose the keys."]
    assert {f"{first}_nfe_forward", f"{first}_nfe_backward",
            "second_ode_nfe_forward", "second_ode_nfe_backward"} <= set(logs)
    assert "nfe_forward" not in logs


class _TwoODEs(keras.Model):
    """A subclassed model (no functional graph) with two NeuralODE layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = NeuralODE(mlp_dynamics(8, 3), name="first_ode")
        self.second = NeuralODE(mlp_dynamics(8, 3), t1=3.0,
                                name="second_ode")

    def call(self, x):
        return self.second(self.first(x))


@pytest.mark.slow
def test_two_layers_in_a_subclassed_model_log_distinct_counts():
    keras.utils.set_random_seed(3)
    model = _TwoODEs(name="two_odes")
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x = np.random.default_rng(3).normal(size=(8, 3)).astype("float32")
    batches = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batches.append(dict(logs)))
    with shared_model_warnings() as messages:
        if BACKEND == "jax":
            model(x)  # builds the layers (Keras' JAX trainer cannot, in fit)
        model.fit(x, x, batch_size=8, epochs=1, verbose=0,
                  callbacks=[LogEvaluationCounts(), record])
    assert messages == []  # named layers chose their keys
    logs = batches[-1]
    assert "nfe_forward" not in logs
    # Each layer's own count: the second solves a span three times longer.
    for name in ("first_ode", "second_ode"):
        layer = getattr(model, name.split("_")[0])
        assert logs[f"{name}_nfe_forward"] == float(layer.num_forward_evals)
        assert logs[f"{name}_nfe_backward"] == float(
            layer.num_backward_evals)
    assert logs["second_ode_nfe_forward"] > logs["first_ode_nfe_forward"]


def test_a_context_trains_and_saves(tmp_path):
    # A class label, embedded, conditions the dynamics: `fit` reaches the
    # embedding through the solve (only the rows of labels seen move), and
    # the .keras file loads with the same outputs.
    keras.utils.set_random_seed(0)
    state, label = keras.Input((2,)), keras.Input((), dtype="int32")
    embedding = keras.layers.Embedding(4, 3)
    inputs = [keras.Input((2,)), keras.Input((3,))]
    dynamics = keras.Model(inputs, keras.layers.Dense(2, activation="tanh")(
        keras.layers.Concatenate()(inputs)))
    model = keras.Model([state, label],
                        NeuralODE(dynamics)([state, embedding(label)]))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2)).astype("float32")
    labels = rng.integers(0, 3, 64)  # never 3
    y = x + 0.5 * labels[:, None].astype("float32")
    before = keras.ops.convert_to_numpy(embedding.embeddings)
    history = model.fit([x, labels], y, batch_size=16, epochs=4, verbose=0,
                        callbacks=[LogEvaluationCounts()]).history
    assert history["loss"][-1] < history["loss"][0]
    assert history["nfe_backward"][-1] > 0
    after = keras.ops.convert_to_numpy(embedding.embeddings)
    assert np.all(np.abs(after[:3] - before[:3]).max(axis=1) > 1e-3)
    np.testing.assert_array_equal(after[3], before[3])
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict([x, labels], verbose=0),
                               model.predict([x, labels], verbose=0),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_keras_save_load_reproduces_and_keeps_training(tmp_path):
    model = conv_model()
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    # The counters are saved with the layer's weights.
    counters = lambda m: [float(m.get_layer("neural_ode").num_forward_evals),
                          float(m.get_layer("neural_ode").num_backward_evals)]
    assert counters(loaded) == counters(model)
    assert all(c >= 8 and (c - 2) % 6 == 0 for c in counters(model))
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  loaded.predict(x, verbose=0))
    config = loaded.get_layer("neural_ode").get_config()
    original = model.get_layer("neural_ode").get_config()
    assert [layer["class_name"] for layer in config.pop("dynamics")[
        "config"]["layers"]] == ["InputLayer", "Conv2D", "Conv2D"]
    original.pop("dynamics")
    assert config == original
    before = [keras.ops.convert_to_numpy(w) for w in loaded.trainable_weights]
    logs = loaded.fit(x, y, batch_size=8, epochs=1, verbose=0,
                      callbacks=[LogEvaluationCounts()]).history
    assert np.isfinite(logs["loss"][0])
    # The counters work after loading: a fresh count, not the saved one.
    assert logs["nfe_forward"][0] == 2 + 6 * (logs["steps_accepted"][0]
                                              + logs["steps_rejected"][0])
    after = [keras.ops.convert_to_numpy(w) for w in loaded.trainable_weights]
    assert any(not np.array_equal(b, a) for b, a in zip(before, after))


def test_dynamics_shared_by_two_layers_load_as_one_model(tmp_path):
    # Keras marks an object met twice only in the second config: without
    # our mark the first layer's dynamics loaded as a model of its own, and
    # the second's layers found no weights ("Layer 'dense' expected 2
    # variables, but received 0").
    dynamics = mlp_dynamics(8, 3)
    inputs = keras.Input((3,))
    h = NeuralODE(dynamics, t1=0.5, name="first")(inputs)
    outputs = NeuralODE(dynamics, t0=0.5, name="second")(h)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    path = tmp_path / "shared.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("first").dynamics is \
        loaded.get_layer("second").dynamics
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)),
                                  keras.ops.convert_to_numpy(loaded(x)))
    # Outside saving the config is unmarked, as Keras' own.
    assert "shared_object_id" not in model.get_layer("first").get_config()[
        "dynamics"]


def test_dynamics_also_a_layer_of_the_model_load(tmp_path):
    # The layer's build calls the dynamics symbolically: a node that took
    # the index of the model's own call of them on loading ("Graph
    # disconnected").
    dynamics = mlp_dynamics(8, 3)
    inputs = keras.Input((3,))
    h = NeuralODE(dynamics, name="ode")(inputs)
    model = keras.Model(inputs, dynamics(h))
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    path = tmp_path / "reused.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("ode").dynamics is \
        loaded.get_layer(dynamics.name)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)),
                                  keras.ops.convert_to_numpy(loaded(x)))


@pytest.mark.slow
@tensorflow_only("exporting a SavedModel")
def test_savedmodel_serves_in_fresh_process(tmp_path):
    model = conv_model()
    x, _ = data(4)
    export_dir = str(tmp_path / "exported")
    model.export(export_dir, verbose=False)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({export_dir!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "print(repr(m.serve(tf.constant(x)).numpy().tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True,
                         capture_output=True, text=True).stdout
    served = np.array(eval(out.strip().splitlines()[-1]))
    np.testing.assert_allclose(served, model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


@jax_only("JAX's default of no float64 (the suite turns float64 on)")
def test_jax_without_float64_trains_without_warnings():
    # An adaptive solve built a float64 constant: JAX warned at every trace.
    env = {**os.environ, "JAX_ENABLE_X64": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/jax_float32_fit.py")],
        capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained without warnings" in result.stdout


@pytest.mark.slow
@tensorflow_only("tf.distribute")
def test_mirrored_strategy_on_two_cpu_devices():
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = conv_model()
    x, y = data(32)
    logs = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert logs["loss"][1] < logs["loss"][0]
    # Each replica solves its own half-batch: `nfe_*` is the mean of their
    # counts, `nfe_*_max` the larger. Both replicas' counts, recovered from
    # the two, are Dormand-Prince counts (2 + 6 per step).
    for key in ("nfe_forward", "nfe_backward"):
        larger = logs[key + "_max"][-1]
        other = 2 * logs[key][-1] - larger
        assert larger >= other >= 8
        assert (larger - 2) % 6 == 0 and (other - 2) % 6 == 0


def test_mixed_precision_dynamics_keep_float32_state():
    seen = []

    class Recording(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(3, activation="tanh")

        def __call__(self, h, *args, **kwargs):
            outputs = super().__call__(h, *args, **kwargs)
            seen.append((h.dtype, outputs.dtype))  # before autocasting
            return outputs

        def call(self, h):
            return self.dense(h)

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((3,))
        x = keras.layers.Dense(3)(inputs)  # float16 output
        ode = NeuralODE(Recording())
        outputs = ode(x)
        model = keras.Model(inputs, outputs)
        model.compile("adam", "mse")
        logs = model.fit(np.ones((8, 3)), np.zeros((8, 3)), verbose=0).history
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(logs["loss"][0])
    assert outputs.dtype == "float16"
    # The solver hands the dynamics a float32 state; they compute in float16.
    assert len(seen) > 10
    standard = keras.backend.standardize_dtype
    assert {(standard(a), standard(b)) for a, b in seen[1:]} == {
        ("float32", "float16")}


def test_dynamics_get_the_training_flag():
    class Decay(keras.layers.Layer):  # dh/dt = -h in training, else h
        def call(self, h, training=None):
            return -h if training else h

    inputs = keras.Input((2,))
    model = keras.Model(inputs, NeuralODE(Decay(), solver="rk4")(inputs))
    x = np.ones((3, 2), "float32")
    for training, rate in ((True, -1.0), (False, 1.0)):
        np.testing.assert_allclose(model(x, training=training),
                                   x * np.exp(rate), rtol=1e-5)


class RandomRate(keras.layers.Layer):
    """`dh/dt = u h`, `u` the mean of two uniform draws on [0, 1) per
    element (two draws an evaluation, from one generator)."""

    def __init__(self, seed):
        super().__init__()
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, h):
        return h * sum(keras.random.uniform(keras.ops.shape(h),
                                            seed=self.seed_generator)
                       for _ in range(2)) / 2


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_random_layers_draw_once_per_solve(solver, gradient):
    # One draw per solve: h(1) = h0 e^u with the generator's first two
    # draws, then each solve draws the next two: a second eager call (on
    # JAX a compiled solve that it reuses), then a gradient's (e^u).
    tolerances = dict(rtol=1e-6, atol=1e-6) if solver == "dopri5" else {}
    ode = NeuralODE(RandomRate(seed=3), solver=solver, gradient=gradient,
                    **tolerances)
    h0 = np.random.default_rng(0).uniform(0.5, 1.5, (3, 4)).astype("float32")
    draws = keras.random.SeedGenerator(3)
    d = [np.asarray(keras.random.uniform(h0.shape, seed=draws))
         for _ in range(6)]
    for i in (0, 2):
        np.testing.assert_allclose(ode(h0), h0 * np.exp((d[i] + d[i + 1]) / 2),
                                   rtol=1e-4)
    dh0 = tape_gradients(ode, h0, keras.ops.sum)[0]
    np.testing.assert_allclose(dh0, np.exp((d[4] + d[5]) / 2), rtol=1e-4)


@pytest.mark.parametrize("own", [True, False])
def test_eager_calls_read_the_weights_as_they_are(own):
    # h(1) = h0 expm(K) for the kernel K at each call, the dynamics' own or
    # another layer's (read by a `Lambda`), also once it is frozen (on JAX
    # each call's weights are arguments of a compiled solve, which it
    # keeps for the next call).
    layer = keras.layers.Dense(2, use_bias=False)
    layer.build((None, 2))
    ode = NeuralODE(layer if own else keras.layers.Lambda(
        lambda h: keras.ops.matmul(h, layer.kernel), output_shape=(2,)),
        rtol=1e-7, atol=1e-7)
    h0 = np.array([[1.0, 0.5], [-0.3, 2.0]], "float32")
    rng = np.random.default_rng(4)
    for trainable in (True, True, False):
        layer.trainable = trainable
        k = rng.normal(size=(2, 2))
        layer.kernel.assign(k.astype("float32"))
        np.testing.assert_allclose(ode(h0), h0 @ scipy.linalg.expm(k),
                                   rtol=1e-5, atol=1e-6)


class TracedRate(keras.layers.Layer):
    """`dh/dt = -h`, counting how often it is traced or run (its `call`)."""

    calls = 0

    def call(self, h):
        TracedRate.calls += 1
        return -h


@jax_only("TensorFlow runs an eager call's dynamics op by op")
def test_eager_calls_on_jax_compile_the_solve_once():
    # An eager call compiled TFP's loops anew (their bodies were new
    # functions): 0.36-0.43 s a call for a small MLP's solve
    # (`benchmarks/eager_call.py`). The compiled solve holds the dynamics
    # weakly (JAX's own caches hold them until cleared).
    import jax
    ode = NeuralODE(TracedRate())
    h0 = np.ones((2, 3), "float32")
    ode(h0)
    traced = TracedRate.calls
    for _ in range(2):
        np.testing.assert_allclose(ode(h0), np.exp(-1.0) * h0, rtol=1e-3)
    assert TracedRate.calls == traced
    dynamics = weakref.ref(ode.dynamics)
    del ode
    jax.clear_caches()
    gc.collect()
    assert dynamics() is None


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_a_dropped_model_is_freed(gradient):
    # On TensorFlow each graph's custom gradients (the adjoint, the backward
    # count) stayed in TensorFlow's global registry, holding the graph and
    # the dynamics: every model that ran `predict` stayed in memory, 7,456
    # objects and 6.9 MiB each (`benchmarks/dropped_models.py`). (After `fit`
    # Keras' own all-reduce keeps the train graph so, as for any model.)
    ode = NeuralODE(mlp_dynamics(8, 2), gradient=gradient)
    model = keras.Sequential([keras.Input((2,)), ode])
    model.compile("adam", "mse")
    x = np.ones((4, 2), "float32")
    model.predict(x, verbose=0)
    model.evaluate(x, x, verbose=0)
    freed = [weakref.ref(model), weakref.ref(ode)]
    del model, ode
    if BACKEND == "jax":  # JAX keeps the last one until cleared
        import jax
        jax.clear_caches()
    gc.collect()
    assert [ref() for ref in freed] == [None, None]


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_dropout_masks_the_gradient_as_the_solve(gradient):
    # dh/dt = m h / (1 - p): h(1) = h0 e^(2m) at p = 0.5 and the gradient
    # e^(2m) with the same mask m, also in the adjoint's backward solve,
    # which runs after the call (Dropout draws only when training).
    ode = NeuralODE(keras.layers.Dropout(0.5, seed=2), solver="rk4",
                    gradient=gradient)
    h0 = np.ones((4, 6), "float32")
    draws = keras.random.SeedGenerator(2)
    masks = [np.asarray(keras.random.dropout(h0, 0.5, seed=draws)) > 0
             for _ in range(2)]
    np.testing.assert_allclose(ode(h0, training=True),
                               np.exp(2.0 * masks[0]), rtol=1e-4)
    dh0 = tape_gradients(ode, h0, keras.ops.sum, training=True)[0]
    np.testing.assert_allclose(dh0, np.exp(2.0 * masks[1]), rtol=1e-4)


def test_training_may_be_a_boolean_array():
    # As given to a Keras layer: a numpy or backend boolean (on JAX it
    # crashed an eager call, unhashable in its compiled solve's key).
    h0 = np.ones((4, 6), "float32")
    outputs = [
        NeuralODE(keras.layers.Dropout(0.5, seed=2), solver="rk4")(
            h0, training=training)
        for training in (True, np.bool_(True), keras.ops.convert_to_tensor(
            True), np.array(False))]
    for output in outputs[1:3]:
        np.testing.assert_allclose(output, outputs[0])
    assert np.any(np.asarray(outputs[0]) == 1.0)  # some dropped: e^0
    np.testing.assert_allclose(outputs[3], np.exp(1.0) * h0, rtol=1e-4)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_dropout_in_the_dynamics_trains(gradient):
    # Each training step solves with one dropout mask (its seed advances
    # once per step, also in JAX's jitted step); inference keeps it all.
    keras.utils.set_random_seed(0)
    dropout = keras.layers.Dropout(0.5, seed=1)
    dynamics = keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                                 dropout, keras.layers.Dense(4)])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, NeuralODE(dynamics, gradient=gradient)(
        inputs))
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    start = np.copy(dropout.seed_generator.state.numpy())
    history = model.fit(x, 2 * x, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    np.testing.assert_array_equal(dropout.seed_generator.state.numpy(),
                                  start + [0, 8])
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    # Inference draws nothing, and leaves the seed as it was.
    np.testing.assert_array_equal(dropout.seed_generator.state.numpy(),
                                  start + [0, 8])


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_dynamics_with_a_frozen_layer_train_the_rest(solver, gradient):
    # Non-trainable weights in the dynamics (a frozen layer): `fit` (jitted
    # on JAX) trains the others and leaves them as they were.
    keras.utils.set_random_seed(0)
    frozen = keras.layers.Dense(8, activation="tanh")
    dynamics = keras.Sequential([frozen, keras.layers.Dense(4)])
    inputs = keras.Input((4,))
    model = keras.Model(inputs, NeuralODE(dynamics, solver=solver,
                                          gradient=gradient)(inputs))
    frozen.trainable = False
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [np.copy(w.numpy()) for w in dynamics.weights]
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    model.fit(x, 2 * x, batch_size=16, verbose=0)
    after = [np.copy(w.numpy()) for w in dynamics.weights]
    for w0, w1, variable in zip(before, after, dynamics.weights):
        assert np.array_equal(w0, w1) is not variable.trainable


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_loss_scale_overflow_skips_the_step(gradient):
    # Keras' LossScaleOptimizer raises its scale until the float16
    # gradients overflow, then skips that step and halves the scale: the
    # adjoint's backward solve must let the overflow through, not fail.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        h = NeuralODE(mlp_dynamics(16, 4), gradient=gradient)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(3)(h))
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=2.0**40)
        model.compile(optimizer, "mse")
        before = [np.copy(w.numpy()) for w in model.trainable_weights]
        x = np.random.default_rng(0).normal(size=(8, 4))
        model.fit(x, np.zeros((8, 3)), batch_size=8, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert float(np.asarray(optimizer.dynamic_scale)) == 2.0**39
    for w0, w1 in zip(before, model.trainable_weights):
        np.testing.assert_array_equal(w0, w1.numpy())


@tensorflow_only("SavedModels are TensorFlow's")
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_gradients_through_a_reloaded_savedmodel(gradient, tmp_path):
    # Fine-tuning an exported model differentiates its loaded function: as
    # the live model (backprop's gradients were 60 times too small).
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    inputs = keras.Input((2,))
    model = keras.Model(inputs, NeuralODE(mlp_dynamics(4, 2),
                                          gradient=gradient)(inputs))
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 2)), "float32")
    model.export(str(tmp_path), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path))
    results = []
    for call, variables in ((model, model.trainable_variables),
                            (loaded.serve, loaded.trainable_variables)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(call(x) ** 2)
        results.append(tape.gradient(loss, variables))
    for live, reloaded in zip(*results):
        np.testing.assert_allclose(reloaded, live, rtol=1e-5, atol=1e-6)


@tensorflow_only("on JAX a failed backward solve gives NaN, unprinted")
def test_a_failed_float16_backward_solve_warns(capfd):
    # With float16 dynamics the backward solve does not raise (a loss-scale
    # overflow must reach the optimizer), but a failure it cannot tell from
    # an overflow, here too few steps, is printed at each step.
    keras.utils.set_random_seed(1)
    ode = NeuralODE(mlp_dynamics(8, 2, dtype="mixed_float16"),
                    dtype="mixed_float16",
                    solver=solvers.DormandPrince(max_num_steps=20),
                    gradient=gradients.Adjoint(rtol=1e-9, atol=1e-9),
                    name="half")
    x = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
    grads = tape_gradients(ode, x, lambda h: keras.ops.sum(h ** 2))
    assert not np.isfinite(grads[0]).any()
    assert ("WARNING: NeuralODE 'half' (adjoint solve from t1=1.0 "
            "back to t0=0.0) did not finish (it met inf or NaN, or took "
            "max_num_steps steps), so this step's gradients are NaN. Under "
            "mixed_float16 a loss-scale overflow does this, and "
            "LossScaleOptimizer skips the step; if it repeats at every "
            "step, raise max_num_steps or loosen the adjoint's tolerances."
            in capfd.readouterr().err)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_dynamics_keep_their_own_precision_under_mixed_precision(gradient):
    # A float64 layer in a mixed_float16 NeuralODE reads its weights in
    # float64, not rounded to float16 (0.2 and 0.3 are not float16 numbers).
    a = np.array([[-0.3, 1.0], [0.2, 0.5]])
    h0 = np.random.default_rng(0).normal(size=(5, 2)).astype("float32")
    ode = NeuralODE(Linear(a, dtype="float64"), rtol=1e-7, atol=1e-7,
                    gradient=gradient, dtype="mixed_float16")
    np.testing.assert_allclose(ode(h0), h0 @ scipy.linalg.expm(a).T,
                               rtol=1e-5, atol=1e-6)


def test_jit_compile_auto_trains_without_xla_on_tensorflow():
    # TensorFlow's XLA cannot compile the adaptive loop; Keras' JAX trainer
    # always compiles (the loop is JAX's own).
    model = conv_model()
    x, y = data(8)
    model.fit(x, y, verbose=0)
    assert model.jit_compile is (BACKEND == "jax")
    # Asked for XLA, Keras declines it on TensorFlow, with a warning (the
    # docs say so; a benchmark "with XLA" would otherwise time the graph).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(model.optimizer, model.loss, jit_compile=True)
    assert model.jit_compile is (BACKEND == "jax")
    assert any("jit_compile" in str(w.message) for w in caught) is (
        BACKEND == "tensorflow")


def weight_values(model):
    return [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]


def data_parallel():
    """Replicas on the two CPU devices (conftest): a `MirroredStrategy` on
    TensorFlow, Keras' `DataParallel` distribution on JAX."""
    if BACKEND == "jax":
        return keras.distribution.DataParallel(
            devices=keras.distribution.list_devices("cpu")[:2])
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")][:2])


@pytest.mark.slow
@pytest.mark.parametrize("kinetic_energy", [0.0, 0.1])
def test_data_parallel_training_matches_single_device(kinetic_energy):
    """Two replicas on half-batches vs one device on the whole batch.

    On TensorFlow each replica's adaptive solver chooses its own steps for
    its sub-batch (the error norm is over the solver's own state), so the
    solutions, and the gradients, differ from the single-device ones by up
    to the solver tolerance; JAX's sharded program takes one norm over the
    whole batch. At rtol = atol = 1e-7 that is far below what three Adam
    steps of 1e-2 move the weights (about 3e-2), hence the 1e-4 bound. The
    kinetic-energy loss, added by each replica, must count once.
    """
    x, y = data(32, seed=3)
    weights = {}
    for name, scope in (("single", contextlib.nullcontext),
                        ("replicas", data_parallel().scope)):
        keras.utils.set_random_seed(7)
        with scope():
            inputs = keras.Input((6, 6, 2))
            h = keras.layers.Conv2D(4, 1)(inputs)
            h = NeuralODE(small_conv_dynamics(4), rtol=1e-7, atol=1e-7,
                          kinetic_energy=kinetic_energy)(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
            model = keras.Model(inputs, keras.layers.Dense(3)(h))
            model.compile(
                keras.optimizers.Adam(1e-2),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            initial = weight_values(model)
            model.fit(x, y, batch_size=32, epochs=3, shuffle=False,
                      verbose=0)
        if BACKEND == "jax":  # replicated on both devices
            assert len(model.trainable_weights[0].value.devices()) == (
                2 if name == "replicas" else 1)
        weights[name] = weight_values(model)
    moved = max(np.max(np.abs(a - b))
                for a, b in zip(weights["single"], initial))
    assert moved > 1e-2  # training moved the weights far beyond the bound
    for a, b in zip(weights["single"], weights["replicas"]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@tensorflow_only("a training loop over tf.range in a tf.function")
def test_a_training_loop_in_a_while_loop_counts():
    # The gradient is taken inside the loop's body: there the layer can
    # record the backward count (only a loop's own gradient cannot).
    import tensorflow as tf

    model = conv_model()
    ode = model.get_layer("neural_ode")
    x, y = data()
    model.optimizer.build(model.trainable_variables)

    @tf.function
    def train(steps):
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                loss = model.loss(y, model(x, training=True))
            model.optimizer.apply(
                tape.gradient(loss, model.trainable_variables),
                model.trainable_variables)

    train(tf.constant(2))
    for count in (ode.num_forward_evals, ode.num_backward_evals):
        assert float(count) >= 8 and (float(count) - 2) % 6 == 0


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_a_recurrent_model_trains_in_the_loop_as_unrolled(run_eagerly):
    # `keras.layers.RNN` runs the cell in `while_loop` or `scan`, in a
    # compiled train step or op by op.
    x = np.random.default_rng(2).normal(size=(8, 3, 2)).astype("float32")
    weights = {}
    for unroll in (False, True):
        keras.utils.set_random_seed(4)
        inputs = keras.Input((3, 2))
        ode = NeuralODE(mlp_dynamics(8, 2), rtol=1e-6, atol=1e-6)
        model = keras.Model(inputs, keras.layers.RNN(
            OdeRnnCell(ode), unroll=unroll)(inputs))
        model.compile(keras.optimizers.SGD(0.1), "mse",
                      run_eagerly=run_eagerly)
        initial = weight_values(model)
        model.fit(x, x[:, -1], batch_size=4, epochs=1, shuffle=False,
                  verbose=0)
        weights[unroll] = weight_values(model)
    assert max(np.max(np.abs(a - b))
               for a, b in zip(weights[True], initial)) > 1e-3
    for a, b in zip(weights[False], weights[True]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fit_with_kinetic_energy_straightens_the_dynamics():
    regularised = kinetic_energy_after_fit(0.1)
    assert regularised < 0.9 * kinetic_energy_after_fit(0.0)
