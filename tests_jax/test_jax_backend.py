"""NeuralODE on Keras' JAX backend (run by tests/test_jax_backend.py).

Run in an environment with jax and tfp-nightly (see tools/jax-venv.sh), with
KERAS_BACKEND=jax. Small models only: XLA:CPU convolutions are slow.
"""

import os
import pathlib
import sys

assert os.environ.get("KERAS_BACKEND") == "jax"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.integrate  # noqa: E402
import scipy.linalg  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples"),
                str(ROOT / "benchmarks")]
from helpers import (CosineRate, Linear, kinetic_energy_after_fit,  # noqa: E402
                     mlp_dynamics)

from keras_node import NeuralODE, gradients, solvers  # noqa: E402

A = np.array([[-0.5, 2.0], [-2.0, -0.5]])
H0 = np.array([[1.0, 0.0], [0.5, -2.0]], "float32")
W = np.array([[0.3, -1.0], [2.0, 0.5]], "float32")


def grads(ode, h0, loss_fn, jit=True):
    trainable = [v.value for v in ode.trainable_variables]
    others = [v.value for v in ode.non_trainable_variables]

    def loss(trainable, h):
        y, _ = ode.stateless_call(trainable, others, h)
        return loss_fn(y)

    fn = jax.grad(loss, argnums=(0, 1))
    return (jax.jit(fn) if jit else fn)(trainable, jnp.asarray(h0))


def test_linear_solution_and_counts():
    ode = NeuralODE(Linear(A), t1=1.0, rtol=1e-6, atol=1e-6)
    out = np.asarray(ode(H0))
    np.testing.assert_allclose(out, H0 @ scipy.linalg.expm(A).T, atol=1e-5)
    assert float(ode.num_forward_evals) > 8


def test_time_dependent_solution():
    ode = NeuralODE(CosineRate(), t0=0.0, t1=2.0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ode(H0)),
                               H0 * np.exp(0.7 * np.sin(2.0)), rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_linear_gradients_are_analytic(jit):
    ode = NeuralODE(Linear(A), t1=1.0, rtol=1e-6, atol=1e-6)
    ode(H0)
    (da_t,), dh0 = grads(ode, H0, lambda y: jnp.sum(W * y), jit=jit)
    e = scipy.linalg.expm(A)
    np.testing.assert_allclose(dh0, W @ e, atol=1e-4)
    expected = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            unit = np.zeros((2, 2))
            unit[i, j] = 1.0
            frechet = scipy.linalg.expm_frechet(A, unit, compute_expm=False)
            expected[i, j] = np.sum(W * (H0 @ frechet.T))
    np.testing.assert_allclose(da_t, expected.T, atol=1e-4)


@pytest.mark.parametrize("adjoint_norm", ["full", "seminorm"])
def test_mlp_gradients_match_finite_differences(adjoint_norm):
    keras.utils.set_random_seed(1)
    ode = NeuralODE(mlp_dynamics(8, 3), t1=1.0, rtol=1e-6, atol=1e-6,
                    gradient=gradients.Adjoint(norm=adjoint_norm))
    h0 = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
    ode(h0)
    loss_fn = lambda y: jnp.sum(jnp.sin(y))
    trainable, dh0 = grads(ode, h0, loss_fn)
    others = [v.value for v in ode.non_trainable_variables]
    loss = jax.jit(lambda tv, h: loss_fn(ode.stateless_call(tv, others, h)[0]))
    values = [np.asarray(v.value, "float64") for v in ode.trainable_variables]
    eps = 1e-2  # float32: a wide step, checked to 2e-3
    for k, grad in enumerate(trainable):
        flat = values[k].reshape(-1)
        for index in range(min(3, flat.size)):
            shifted = [v.copy() for v in values]
            shifted[k].reshape(-1)[index] += eps
            up = loss([jnp.asarray(v, "float32") for v in shifted], h0)
            shifted[k].reshape(-1)[index] -= 2 * eps
            down = loss([jnp.asarray(v, "float32") for v in shifted], h0)
            np.testing.assert_allclose(np.asarray(grad).reshape(-1)[index],
                                       (up - down) / (2 * eps), atol=2e-3,
                                       rtol=2e-2)


def test_kinetic_energy_and_its_gradients():
    ode = NeuralODE(Linear(A), t1=1.0, rtol=1e-6, atol=1e-6,
                    kinetic_energy=0.3)
    ode(H0)
    others = [v.value for v in ode.non_trainable_variables]

    def energy_jax(trainable, h0):
        _, _, [loss] = ode.stateless_call(trainable, others, h0,
                                          return_losses=True)
        return loss

    def energy(h0, a):  # by quadrature, in float64
        speed2 = lambda t, h: np.sum((h @ scipy.linalg.expm(a * t).T @ a.T)
                                     ** 2)
        return 0.3 * np.mean([scipy.integrate.quad(speed2, 0, 1, args=(h,))[0]
                              for h in h0])

    trainable = [v.value for v in ode.trainable_variables]
    np.testing.assert_allclose(energy_jax(trainable, H0), energy(H0, A),
                               rtol=1e-5)
    (da_t,), dh0 = jax.jit(jax.grad(energy_jax, argnums=(0, 1)))(
        trainable, jnp.asarray(H0))
    eps = 1e-5
    for i in range(2):
        for j in range(2):
            unit = np.zeros((2, 2))
            unit[i, j] = eps
            np.testing.assert_allclose(
                dh0[i, j], (energy(H0 + unit, A) - energy(H0 - unit, A))
                / (2 * eps), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(
                da_t[j, i], (energy(H0, A + unit) - energy(H0, A - unit))
                / (2 * eps), rtol=1e-3, atol=1e-4)


def test_save_at_states_and_gradients():
    save_at = [0.0, 0.5, 1.5]
    ode = NeuralODE(Linear(A), t1=1.5, rtol=1e-6, atol=1e-6, save_at=save_at)
    hs = np.asarray(ode(H0))
    e = [scipy.linalg.expm(A * t) for t in save_at]
    np.testing.assert_allclose(hs, np.stack([H0 @ m.T for m in e], 1),
                               atol=1e-5)
    # loss = sum_k w_k sum(W * h(t_k)): dL/dh0 = sum_k w_k W expm(A t_k).
    weights = np.array([1.0, -2.0, 0.5], "float32")
    _, dh0 = grads(ode, H0, lambda hs: jnp.sum(
        hs * weights[None, :, None] * W[:, None, :]))
    np.testing.assert_allclose(
        dh0, sum(w * W @ m for w, m in zip(weights, e)), atol=1e-4)


def test_fit_with_kinetic_energy_straightens_the_dynamics():
    # Keras' JAX trainer adds the layer's loss too.
    regularised = kinetic_energy_after_fit(0.1)
    assert regularised < 0.9 * kinetic_energy_after_fit(0.0)


def test_loads_a_model_saved_with_tensorflow():
    path = os.environ.get("KERAS_NODE_TF_SAVED")
    if not path:
        pytest.skip("set by tests/test_jax_backend.py")
    model = keras.models.load_model(path)
    x = np.load(path + ".x.npy")
    np.testing.assert_allclose(np.asarray(model(x)), np.load(path + ".y.npy"),
                               rtol=1e-4, atol=1e-5)
    # One training step here, then saved for TensorFlow to load back.
    model.compile("adam", "mse")
    model.fit(x, np.zeros((len(x), 3), "float32"), verbose=0)
    model.save(path + ".jax.keras")
    np.save(path + ".jax.y.npy", np.asarray(model(x)))


def test_counts_match_tensorflow():
    """Forward and backward counts of one gradient, as on TensorFlow."""
    path = os.environ.get("KERAS_NODE_TF_SAVED")
    if not path:
        pytest.skip("set by tests/test_jax_backend.py")
    model = keras.models.load_model(path)
    ode = next(l for l in model.layers if isinstance(l, NeuralODE))
    x = jnp.asarray(np.load(path + ".x.npy"))
    trainable = [v.value for v in model.trainable_variables]
    others = [v.value for v in model.non_trainable_variables]

    def loss(trainable):
        y, others_after = model.stateless_call(trainable, others, x)
        return jnp.sum(y ** 2), others_after

    _, others_after = jax.jit(jax.grad(loss, has_aux=True))(trainable)
    forward = next(value for v, value in zip(model.non_trainable_variables,
                                             others_after)
                   if v is ode._forward_evals)
    jax.effects_barrier()  # the backward count arrives by host callback
    np.testing.assert_array_equal(
        [float(forward), float(ode.num_backward_evals)],
        np.load(path + ".nfe.npy"))


def test_fit_trains_and_logs_counts_through_the_callback():
    from keras_node.callbacks import LogEvaluationCounts

    keras.utils.set_random_seed(2)
    inputs = keras.Input((3,))
    outputs = NeuralODE(mlp_dynamics(8, 3))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(outputs))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    # Compiled, not eager: an eager JAX `fit` recompiles the solver's loops
    # at every step.
    assert model.jit_compile is True
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(dict(logs)))
    x = np.random.default_rng(2).normal(size=(16, 3)).astype("float32")
    logs = model.fit(x, np.arange(16) % 2, batch_size=8, epochs=2, verbose=0,
                     callbacks=[LogEvaluationCounts(), record]).history
    assert np.isfinite(logs["loss"]).all() and logs["loss"][1] < logs["loss"][0]
    assert len(seen) == 4
    for batch_logs in seen:
        # Dormand-Prince: 6 evaluations a step and one for the first step.
        assert batch_logs["nfe_forward"] >= 7
        assert batch_logs["nfe_backward"] >= 7


@pytest.fixture
def manual_dir():
    """The folder of the four MNIST files, from $KERAS_NODE_MNIST_DIR."""
    path = os.environ.get("KERAS_NODE_MNIST_DIR")
    if not path:
        pytest.skip("set KERAS_NODE_MNIST_DIR to the MNIST files")
    return path


def test_gpu_benchmark_script_runs_on_cpu(manual_dir, tmp_path):
    """benchmarks/gpu_jax.py, three iterations on the CPU."""
    import gpu_jax

    result = gpu_jax.main(["--manual-dir", manual_dir, "--max-steps", "3",
                           "--batch-size", "16", "--json-out",
                           str(tmp_path / "out.json"), "--progress-file",
                           str(tmp_path / "progress.txt")])
    assert result["iterations"] == 3
    assert result["train_images"] == 54000
    assert result["nfe_backward_last_step"] >= 7
    assert "iteration 1: " in (tmp_path / "progress.txt").read_text()
    assert 0.0 <= result["test_accuracy"] <= 100.0
    assert result["nfe_forward_test_batch"] >= 8
    assert (tmp_path / "out.json").exists()
    assert result["jit_compile"]


def test_gpu_benchmark_long_recipe_compiles_its_step(manual_dir, tmp_path):
    """gpu_jax.py --long: augmentation in the step, still compiled by XLA.

    RandomTranslation declares that it does not support XLA; left so, Keras
    trains eagerly, 300 times slower on a GPU.
    """
    import gpu_jax

    result = gpu_jax.main(["--manual-dir", manual_dir, "--long", "--epochs",
                           "2", "--max-steps", "2", "--batch-size", "16",
                           "--train-on-held-out"])
    assert result["jit_compile"]
    assert result["train_images"] == 60000
    assert result["options"]["shift"] == 2
    assert result["options"]["weight_decay"] == 0.05
    assert result["iterations"] == 4
    assert len(result["test_accuracy_per_epoch"]) == 2


def test_mnist_example_runs_on_jax(manual_dir, tmp_path, capsys):
    """examples/mnist.py unchanged under KERAS_BACKEND=jax: tf.data feeds it."""
    import mnist

    out = tmp_path / "run"
    metrics = mnist.main([
        "--manual-dir", manual_dir, "--data-dir", str(tmp_path / "tfds"),
        "--limit", "256", "--batch-size", "32", "--max-steps", "3",
        "--eval-every", "2", "--train-eval-batches", "1", "--verbose", "0",
        "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Iter:   1 || Train Accuracy: " in printed
    assert "Iter:   3 || Train Accuracy: " in printed
    assert "No SavedModel" in printed
    assert metrics["iterations"] == 3
    # The NFE reached the logs through LogEvaluationCounts.
    assert metrics["nfe_forward_last_20"] >= 7
    assert metrics["nfe_backward_last_20"] >= 7
    for name in ("model.keras", "metrics.json", "accuracy.png", "nfe.png"):
        assert (out / name).exists(), name
    reloaded = keras.models.load_model(out / "model.keras")
    assert reloaded.count_params() == mnist.build_model().count_params()


class _Square(keras.layers.Layer):
    def call(self, h):
        return h * h


def test_exhausted_budget_raises_eagerly_and_is_nan_under_jit():
    # h' = h^2 from h0 = 10 blows up at t = 0.1.
    ode = NeuralODE(_Square(), solver=solvers.DormandPrince(max_num_steps=50))
    with pytest.raises(RuntimeError,
                       match=r"NeuralODE 'neural_ode.*' \(forward solve from "
                       r"t0=0.0 to t1=1.0\) did not finish within "
                       r"max_num_steps=50 .* stiff, exploding or not finite"):
        ode(np.full((2, 2), 10.0, "float32"))
    others = [v.value for v in ode.non_trainable_variables]
    solve = jax.jit(lambda h: ode.stateless_call([], others, h)[0])
    assert np.all(np.isnan(solve(jnp.full((2, 2), 10.0))))
    assert np.all(np.isfinite(solve(jnp.full((2, 2), 0.1))))


def test_bad_dynamics_are_named():
    with pytest.raises(ValueError, match=r"argument `dynamics`, expected a "
                       r"layer whose output .* Received: dynamics=dense"):
        NeuralODE(keras.layers.Dense(3))(np.ones((2, 2), "float32"))


@pytest.mark.parametrize("solver", [
    "tsit5", "bosh3", solvers.Euler(num_steps=400),
    solvers.Midpoint(num_steps=40), solvers.RK4(step_size=0.05)])
def test_every_solver_matches_the_matrix_exponential(solver):
    adaptive = solvers.get(solver).adaptive
    ode = NeuralODE(Linear(A), t1=1.0, solver=solver,
                    **({"rtol": 1e-6, "atol": 1e-6} if adaptive else {}))
    out = np.asarray(ode(H0))
    # Euler and the midpoint rule: global errors of order h and h^2.
    tol = {solvers.Euler: 1e-2, solvers.Midpoint: 2e-3}.get(type(solver),
                                                            1e-4)
    np.testing.assert_allclose(out, H0 @ scipy.linalg.expm(A).T, atol=tol)
    if not adaptive:
        steps = float(ode.steps_accepted)
        assert steps == {"Euler": 400, "Midpoint": 40, "RK4": 20}[
            type(solver).__name__]
        assert float(ode.steps_rejected) == 0


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_fixed_step_gradients_converge_to_the_analytic_gradient(gradient):
    e = scipy.linalg.expm(A)
    errors = []
    for n in (5, 40):
        ode = NeuralODE(Linear(A), t1=1.0, solver=solvers.RK4(num_steps=n),
                        gradient=gradient)
        ode(H0)
        _, dh0 = grads(ode, H0, lambda y: jnp.sum(W * y))
        errors.append(np.max(np.abs(np.asarray(dh0) - W @ e)))
    assert errors[1] < errors[0] / 10 and errors[1] < 1e-4


def test_backprop_equals_finite_differences_of_the_discrete_solve():
    keras.utils.set_random_seed(11)
    ode = NeuralODE(mlp_dynamics(6, 3), t1=1.0, gradient="backprop",
                    solver=solvers.Midpoint(num_steps=3))
    h0 = np.random.default_rng(11).normal(size=(3, 3)).astype("float32")
    ode(h0)
    loss_fn = lambda y: jnp.sum(jnp.sin(y))
    _, dh0 = grads(ode, h0, loss_fn)
    others = [v.value for v in ode.non_trainable_variables]
    trainable = [v.value for v in ode.trainable_variables]
    loss = jax.jit(lambda h: loss_fn(ode.stateless_call(trainable, others,
                                                        h)[0]))
    eps = 1e-2
    for index in range(4):
        shifted = h0.reshape(-1).copy()
        shifted[index] += eps
        up = loss(shifted.reshape(h0.shape))
        shifted[index] -= 2 * eps
        down = loss(shifted.reshape(h0.shape))
        np.testing.assert_allclose(np.asarray(dh0).reshape(-1)[index],
                                   (up - down) / (2 * eps), atol=2e-3,
                                   rtol=2e-2)


def test_backprop_through_an_adaptive_solver_is_refused():
    with pytest.raises(ValueError, match=r"argument `gradient`, expected "
                       r'"adjoint" with the adaptive solver Tsit5.* on the '
                       r"JAX backend: JAX cannot reverse-differentiate an "
                       r"unbounded loop. Use a fixed-step solver"):
        NeuralODE(mlp_dynamics(4, 2), solver="tsit5", gradient="backprop")


def test_fixed_step_fit_logs_steps_and_saves(tmp_path):
    from keras_node.callbacks import LogEvaluationCounts

    keras.utils.set_random_seed(13)
    inputs = keras.Input((3,))
    ode = NeuralODE(mlp_dynamics(8, 3), solver=solvers.RK4(num_steps=3),
                    gradient="backprop", name="ode")
    model = keras.Model(inputs, ode(inputs))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x = np.random.default_rng(13).normal(size=(16, 3)).astype("float32")
    batches = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batches.append(dict(logs)))
    history = model.fit(x, 2 * x, batch_size=8, epochs=2, verbose=0,
                        callbacks=[LogEvaluationCounts(), record]).history
    assert history["loss"][1] < history["loss"][0]
    last = batches[-1]
    assert (last["steps_accepted"], last["steps_rejected"]) == (3, 0)
    assert last["nfe_forward"] == last["nfe_backward"] == 12
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.get_layer("ode").solver == solvers.RK4(num_steps=3)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-6)
