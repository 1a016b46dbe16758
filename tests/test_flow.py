"""`ContinuousNormalizingFlow` and the Jacobian regulariser, against ground
truth: the exact log-density of a linear flow, the Hutchinson estimate's
mean, finite differences, and the entropy of the Gaussian it learns."""

import keras
import numpy as np
import pytest
import scipy.linalg
from keras import ops

from conftest import tensorflow_only
from helpers import Driven, Linear, finite_difference_check, mlp_dynamics
from helpers import gradients as tape_gradients
from keras_node import ContinuousNormalizingFlow, NeuralODE, solvers
from keras_node.callbacks import LogEvaluationCounts

A = np.array([[-0.3, 1.0], [0.2, 0.5]])
TIGHT = dict(rtol=1e-10, atol=1e-10)
X = np.random.default_rng(0).normal(size=(5, 2))


def linear_flow(a=A, **kwargs):
    return ContinuousNormalizingFlow(Linear(a, dtype="float64"),
                                     dtype="float64", **kwargs)



def test_a_functional_call_may_pass_training():
    inputs = keras.Input((2,), dtype="float64")
    flow = linear_flow()
    model = keras.Model(inputs, flow(inputs, training=False))
    np.testing.assert_allclose(model.predict(X, verbose=0), flow(X),
                               rtol=1e-6)

def normal_log_prob(z):
    return -0.5 * np.sum(z ** 2, axis=1) - 0.5 * z.shape[1] * np.log(2 * np.pi)


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (0.5, -0.25)])
def test_log_prob_of_a_linear_flow_is_exact(t0, t1):
    # z(t1) = x expm(A (t1 - t0))^T; log p changes by -trace(A) (t1 - t0).
    flow = linear_flow(t0=t0, t1=t1, **TIGHT)
    z1 = X @ scipy.linalg.expm(A * (t1 - t0)).T
    expected = normal_log_prob(z1) + np.trace(A) * (t1 - t0)
    np.testing.assert_allclose(flow.log_prob(X), expected, rtol=1e-9)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_estimate_is_unbiased(noise):
    # Each example's estimate is e^T A e (t1 - t0), its mean trace(A) (t1 -
    # t0): within four standard errors over 4,000 examples.
    x = np.random.default_rng(1).normal(size=(4000, 2))
    exact = linear_flow(**TIGHT).log_prob(x)
    flow = linear_flow(trace="hutchinson", noise=noise, seed=2, **TIGHT)
    errors = np.asarray(flow.log_prob(x)) - np.asarray(exact)
    assert np.std(errors) > 0.1  # an estimate, not the exact trace
    assert abs(np.mean(errors)) < 4 * np.std(errors) / np.sqrt(len(x))


def test_rademacher_probes_are_exact_on_a_diagonal_jacobian():
    # e^T D e = trace(D) for every e of +-1 entries (Gaussian's are not).
    d = np.diag([0.4, -1.1])
    flows = [linear_flow(d, trace="hutchinson", noise=noise, seed=3, **TIGHT)
             for noise in ("rademacher", "gaussian")]
    exact = linear_flow(d, **TIGHT).log_prob(X)
    np.testing.assert_allclose(flows[0].log_prob(X), exact, rtol=1e-9)
    assert not np.allclose(flows[1].log_prob(X), exact, rtol=1e-3)


def test_sample_solves_base_draws_back_to_the_data():
    flow = linear_flow(t1=0.7, **TIGHT)
    flow.build((None, 2))
    samples = flow.sample(6, seed=4)
    z = keras.random.normal((6, 2), dtype="float64", seed=4)
    expected = np.asarray(z) @ scipy.linalg.expm(-A * 0.7).T
    np.testing.assert_allclose(samples, expected, rtol=1e-9, atol=1e-12)
    # Without a seed, the model's own generator: fresh draws each time.
    assert not np.allclose(flow.sample(6), flow.sample(6))


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_a_conditional_flow_is_exact(gradient):
    # dz/dt = z A^T + c B^T: with M = [[A, B], [0, 0]], z(t1) = [x, c]
    # expm(M t1)^T (its first two columns), the divergence trace(A) as for
    # the linear flow; a draw solves back by expm(-M t1).
    b = np.array([[0.5], [-1.5]])
    context = np.linspace(-1.0, 1.0, len(X))[:, None]
    flow = ContinuousNormalizingFlow(Driven(A, b, dtype="float64"), t1=0.7,
                                     gradient=gradient, dtype="float64",
                                     **TIGHT)
    m = np.zeros((3, 3))
    m[:2, :2], m[:2, 2:] = A, b
    data = np.concatenate([X, context], 1)
    z1 = data @ scipy.linalg.expm(m * 0.7)[:2].T
    expected = normal_log_prob(z1) + np.trace(A) * 0.7
    np.testing.assert_allclose(flow.log_prob(X, context=context), expected,
                               rtol=1e-9)
    np.testing.assert_allclose(flow([X, context]), expected, rtol=1e-9)
    samples = flow.sample(len(X), seed=4, context=context)
    z = np.asarray(keras.random.normal((len(X), 2), dtype="float64",
                                       seed=4))
    expected = (np.concatenate([z, context], 1)
                @ scipy.linalg.expm(-m * 0.7)[:2].T)
    np.testing.assert_allclose(samples, expected, rtol=1e-9, atol=1e-12)


def test_a_conditional_flow_learns_its_shift():
    # x = c mu + N(0, I), c = +-1: given c, the best held-out NLL is the
    # entropy of N(0, I), log(2 pi e), reached by fit([x, c]) (B = -mu, up
    # to a rotation that A learns too); draws given c = 1 centre on mu.
    rng = np.random.default_rng(5)
    mu = np.array([2.0, -1.0], "float32")
    c, c_test = (rng.choice([-1.0, 1.0], size=(n, 1)).astype("float32")
                 for n in (2048, 4096))
    x, x_test = ((c * mu + rng.normal(size=(len(c), 2))).astype("float32")
                 for c in (c, c_test))
    flow = ContinuousNormalizingFlow(Driven(np.zeros((2, 2)),
                                            np.zeros((2, 1))), seed=6)
    flow.compile(keras.optimizers.Adam(0.05))
    history = flow.fit([x, c], batch_size=256, epochs=12, verbose=0,
                       sample_weight=np.ones(len(x)),
                       callbacks=[LogEvaluationCounts()]).history
    entropy = np.log(2 * np.pi * np.e)
    assert history["loss"][0] > entropy + 1.0
    assert history["nfe_backward"][-1] >= 8
    nll = -float(np.mean(flow.log_prob(x_test, context=c_test)))
    assert nll < entropy + 0.02
    samples = flow.sample(1000, seed=7, context=np.ones((1000, 1)))
    np.testing.assert_allclose(np.mean(samples, axis=0), mu, atol=0.15)
    # One row of context: the same for every draw.
    np.testing.assert_array_equal(
        flow.sample(1000, seed=7, context=np.ones((1, 1))), samples)


@pytest.mark.parametrize("solver, gradient", [
    ("dopri5", "adjoint"), ("dopri5", "backprop"), ("rk4", "backprop"),
    # The adjoint of fixed steps is exact as the steps shrink, not for RK4's
    # default 8 (off by 2e-5 here).
    (solvers.RK4(num_steps=64), "adjoint")])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_log_prob_gradients_match_finite_differences(solver, gradient, trace):
    keras.utils.set_random_seed(5)
    options = TIGHT if solver == "dopri5" else {}
    flow = ContinuousNormalizingFlow(
        mlp_dynamics(8, 2, dtype="float64"), dtype="float64", solver=solver,
        gradient=gradient, trace=trace, **options)
    # The same probes at every call, as finite differences need.
    flow.seed_generator = 6
    finite_difference_check(flow, X, lambda log_p: ops.sum(log_p),
                            rtol=1e-5)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_dropout_masks_the_density_and_its_gradient(gradient):
    # With Dropout(0.5) as the dynamics, dz/dt = 2 m z for its mask m:
    # z(1) = x e^(2m), log p(x) = log N(z(1)) + sum(2m), and the gradient
    # of the next call, with the next mask, -z(1) e^(2m).
    flow = ContinuousNormalizingFlow(keras.layers.Dropout(0.5, seed=2),
                                     solver="rk4", gradient=gradient)
    x = X.astype("float32")
    draws = keras.random.SeedGenerator(2)
    masks = [np.asarray(keras.random.dropout(np.ones_like(x), 0.5,
                                             seed=draws)) > 0
             for _ in range(2)]
    z1 = x * np.exp(2.0 * masks[0])
    np.testing.assert_allclose(flow(x, training=True), normal_log_prob(z1)
                               + 2.0 * masks[0].sum(axis=1), rtol=1e-4)
    dx = tape_gradients(flow, x, ops.sum, training=True)[0]
    z1 = x * np.exp(2.0 * masks[1])
    np.testing.assert_allclose(dx, -z1 * np.exp(2.0 * masks[1]), rtol=1e-4)


def test_jacobian_norm_estimates_the_frobenius_norm():
    # E|e^T A|^2 = |A|_F^2 for standard Gaussian e, over t1 - t0 = 1.5.
    h0 = np.random.default_rng(7).normal(size=(4000, 2))
    ode = NeuralODE(Linear(A, dtype="float64"), t1=1.5, dtype="float64",
                    jacobian_norm=0.2, seed=8, **TIGHT)
    ode(h0)
    [loss] = ode.losses
    probes = np.random.default_rng(9).normal(size=(100_000, 2))
    per_example = 0.2 * 1.5 * np.sum((probes @ A) ** 2, axis=1)
    expected = 0.2 * 1.5 * np.sum(A ** 2)
    np.testing.assert_allclose(np.mean(per_example), expected, rtol=0.02)
    assert abs(float(loss) - expected) < 4 * np.std(per_example) / np.sqrt(
        len(h0))


@pytest.mark.parametrize("layer", ["ode", "flow"])
def test_regularised_gradients_match_finite_differences(layer):
    keras.utils.set_random_seed(10)
    options = dict(kinetic_energy=0.3, jacobian_norm=0.5, **TIGHT)
    dynamics = mlp_dynamics(8, 2, dtype="float64")
    if layer == "ode":
        model = NeuralODE(dynamics, dtype="float64", seed=0, **options)
        loss_fn = lambda h: ops.sum(h ** 2)
    else:
        model = ContinuousNormalizingFlow(dynamics, dtype="float64",
                                          trace="hutchinson", **options)
        loss_fn = ops.sum
    model.seed_generator = 11  # the same probes at every call
    finite_difference_check(model, X, loss_fn, with_losses=True, rtol=1e-5)


def test_fit_learns_a_gaussian_to_its_entropy():
    # Data from N(0, diag(4, 1/4)): a linear flow can map it to N(0, I)
    # exactly, and the best held-out NLL is the entropy, log(2 pi e).
    rng = np.random.default_rng(12)
    scale = np.array([2.0, 0.5], "float32")
    train, test = (rng.normal(size=(n, 2)).astype("float32") * scale
                   for n in (2048, 4096))
    flow = ContinuousNormalizingFlow(Linear(np.zeros((2, 2))), seed=13)
    flow.compile(keras.optimizers.Adam(0.05))
    history = flow.fit(train, batch_size=256, epochs=8, verbose=0,
                       callbacks=[LogEvaluationCounts()])
    entropy = np.log(2 * np.pi * np.e)
    nll = -float(np.mean(flow.log_prob(test)))
    assert history.history["loss"][0] > entropy + 0.5
    assert nll < entropy + 0.02
    assert history.history["nfe_forward"][-1] >= 8
    assert history.history["nfe_backward"][-1] >= 8


def test_config_round_trip_and_saving(tmp_path):
    flow = ContinuousNormalizingFlow(
        mlp_dynamics(8, 2), t0=0.5, t1=2.0, rtol=1e-4, atol=1e-5,
        solver="tsit5", gradient="backprop", trace="hutchinson",
        noise="rademacher", kinetic_energy=0.1, jacobian_norm=0.2, seed=3,
        name="density")
    x = X.astype("float32")
    flow(x)
    config = flow.get_config()
    clone = ContinuousNormalizingFlow.from_config(config)
    assert clone.get_config() == config
    flow.save(tmp_path / "flow.keras")
    loaded = keras.saving.load_model(tmp_path / "flow.keras")
    ours = lambda config: {k: v for k, v in config.items() if k != "dynamics"}
    assert ours(loaded.get_config()) == ours(config)
    for model in (flow, loaded):
        model.seed_generator = 4  # the same probes
    np.testing.assert_allclose(loaded.log_prob(x), flow.log_prob(x),
                               rtol=1e-6)
    np.testing.assert_allclose(loaded.sample(3, seed=5),
                               flow.sample(3, seed=5), rtol=1e-6)


def test_a_float64_flow_is_loaded_as_float64(tmp_path):
    flow = linear_flow(**TIGHT)
    flow(X)
    flow.save(tmp_path / "flow.keras")
    loaded = keras.saving.load_model(tmp_path / "flow.keras")
    for model in (ContinuousNormalizingFlow.from_config(flow.get_config()),
                  loaded):
        assert model.dtype_policy.name == "float64"
    x = X.astype("float32")  # solved in float64 all the same
    z1 = x @ scipy.linalg.expm(A).T
    log_prob = loaded.log_prob(x)
    assert keras.backend.standardize_dtype(log_prob.dtype) == "float64"
    np.testing.assert_allclose(log_prob, normal_log_prob(z1) + np.trace(A),
                               rtol=1e-9)
    assert keras.backend.standardize_dtype(loaded.sample(2).dtype) == (
        "float64")


@pytest.mark.parametrize("dtype, x_dtype, tolerance", [
    (None, "float64", 1e-10), ("mixed_float16", "float32", 1e-7)])
def test_the_data_keep_their_precision(dtype, x_dtype, tolerance):
    # As NeuralODE's: float64 data solve in float64, and mixed precision
    # leaves float32 data unrounded (the dynamics here stay in float64).
    flow = ContinuousNormalizingFlow(Linear(A, dtype="float64"), dtype=dtype,
                                     rtol=tolerance, atol=tolerance)
    x = X.astype(x_dtype)
    z1 = x @ scipy.linalg.expm(A).T
    log_prob = flow.log_prob(x)
    assert keras.backend.standardize_dtype(log_prob.dtype) == x_dtype
    np.testing.assert_allclose(log_prob, normal_log_prob(z1) + np.trace(A),
                               rtol=100 * tolerance)


def test_sample_weight_needs_no_labels():
    # Keras weighs a loss as sum(w * loss) / batch size; a learning rate of
    # 0 keeps fit's loss that of the flow as it is.
    w = np.linspace(0.0, 2.0, len(X))
    flow = linear_flow(**TIGHT)
    flow.compile(keras.optimizers.SGD(0.0))
    expected = np.sum(-np.asarray(flow.log_prob(X)) * w) / len(X)
    logs = flow.evaluate(X, sample_weight=w, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-6)  # a float32 mean
    history = flow.fit(X, batch_size=len(X), sample_weight=w, verbose=0,
                       validation_data=(X, None, w)).history
    assert history["loss"][0] == pytest.approx(expected, rel=1e-6)
    assert history["val_loss"][0] == pytest.approx(expected, rel=1e-6)


def test_a_loaded_flow_keeps_training_where_it_stopped(tmp_path):
    x = X.astype("float32")
    flow = ContinuousNormalizingFlow(mlp_dynamics(8, 2), seed=3)
    flow.compile(keras.optimizers.Adam(1e-2))
    flow.fit(x, batch_size=5, epochs=2, verbose=0)
    flow.save(tmp_path / "flow.keras")
    loaded = keras.saving.load_model(tmp_path / "flow.keras")
    assert int(loaded.optimizer.iterations) == 2
    # The same Adam state: one more step moves both flows alike.
    for model in (flow, loaded):
        model.fit(x, batch_size=5, epochs=1, verbose=0)
    for ours, theirs in zip(flow.trainable_weights, loaded.trainable_weights):
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)


def test_neural_ode_config_keeps_the_jacobian_norm():
    ode = NeuralODE(mlp_dynamics(8, 2), jacobian_norm=0.25, seed=4)
    config = ode.get_config()
    assert (config["jacobian_norm"], config["seed"]) == (0.25, 4)
    assert NeuralODE.from_config(config).get_config() == config


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(trace="stochastic"), ValueError,
     r'argument `trace`, expected "exact" or "hutchinson". '
     r"Received: trace='stochastic'"),
    (dict(trace=None), TypeError,
     r'argument `trace`, expected "exact" or "hutchinson". '
     r"Received: trace=None"),
    (dict(trace="hutchinson", noise="uniform"), ValueError,
     r'argument `noise`, expected None, "gaussian" or "rademacher". '
     r"Received: noise='uniform'"),
    (dict(noise="gaussian"), ValueError,
     r'argument `noise`, expected None: no probes are drawn with '
     r'trace="exact" and jacobian_norm=0. Received: noise=\'gaussian\''),
    (dict(seed=1.5), TypeError,
     r"argument `seed`, expected None or an integer. Received: seed=1.5"),
    (dict(jacobian_norm=-1.0), ValueError,
     r"argument `jacobian_norm`, expected a non-negative float. "
     r"Received: jacobian_norm=-1.0"),
    (dict(kinetic_energy="a lot"), TypeError,
     r"argument `kinetic_energy`, expected a finite float. "
     r"Received: kinetic_energy='a lot'"),
    (dict(t1=0.0), ValueError, r"argument `t1`, expected a time other"),
])
def test_flow_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        ContinuousNormalizingFlow(mlp_dynamics(8, 2), **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(seed=3), ValueError,
     r"argument `seed`, expected None: no probes are drawn with "
     r"jacobian_norm=0. Received: seed=3"),
    (dict(jacobian_norm=0.1, seed="x"), TypeError,
     r"argument `seed`, expected None or an integer. Received: seed='x'"),
    (dict(jacobian_norm=float("nan")), ValueError,
     r"argument `jacobian_norm`, expected a finite float. "
     r"Received: jacobian_norm=nan"),
])
def test_neural_ode_jacobian_norm_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        NeuralODE(mlp_dynamics(8, 2), **kwargs)


def test_numpy_integer_seeds_are_seeds():
    flow = ContinuousNormalizingFlow(mlp_dynamics(8, 2), trace="hutchinson",
                                     seed=np.int64(3))
    flow.build((None, 2))
    np.testing.assert_array_equal(flow.sample(2, seed=np.int32(4)),
                                  flow.sample(2, seed=4))
    ode = NeuralODE(mlp_dynamics(8, 2), jacobian_norm=0.1, seed=np.int64(3))
    assert type(ode.get_config()["seed"]) is int


def test_sample_errors():
    flow = ContinuousNormalizingFlow(mlp_dynamics(8, 2))
    with pytest.raises(ValueError, match=r"sample needs the event shape: "
                       r"call, fit or build the model first"):
        flow.sample(3)
    flow.build((None, 2))
    with pytest.raises(ValueError, match=r"argument `num_samples`, expected "
                       r"a positive integer. Received: num_samples=0"):
        flow.sample(0)
    with pytest.raises(TypeError, match=r"argument `num_samples`, expected "
                       r"a positive integer. Received: num_samples=2.0"):
        flow.sample(2.0)
    with pytest.raises(TypeError, match=r"argument `seed`, expected None or "
                       r"an integer. Received: seed=0.5"):
        flow.sample(2, seed=0.5)
    with pytest.raises(ValueError, match=r"argument `input_shape`, expected "
                       r"\(batch, \*event_shape\) with a known event shape. "
                       r"Received: input_shape=\(None, None\)"):
        ContinuousNormalizingFlow(mlp_dynamics(8, 2)).build((None, None))
    with pytest.raises(TypeError, match=r"argument `inputs`, expected a "
                       r"floating tensor"):
        flow.log_prob(np.zeros((2, 2), "int32"))
    with pytest.raises(ValueError, match=r"argument `context`, expected 3 "
                       r"rows \(num_samples\), one per draw, or one row for "
                       r"every draw. Received: a context of shape \(2, 1\)"):
        flow.sample(3, context=np.zeros((2, 1), "float32"))
    with pytest.raises(TypeError, match=r"argument `context`, expected "
                       r"floating tensors \(the context\). Received: "
                       r"context\[1\] of dtype int32"):
        flow.sample(3, context=[np.zeros((3, 1), "float32"),
                                np.zeros((3, 1), "int32")])


@pytest.mark.slow
@tensorflow_only("tf.distribute")
def test_two_replicas_train_as_one_device():
    # The same global batches on one device and on two replicas: the loss
    # is reduced across replicas as Keras reduces its own, so the weights
    # end the same (up to the solvers' tolerance on each half-batch).
    import tensorflow as tf

    x = np.random.default_rng(14).normal(size=(64, 2)).astype("float32")
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    weights = []
    # Reduction to one device, not collective ops: TF caches a collective
    # instance's shape per process, and the other tests' strategies reuse
    # the instance keys with other shapes.
    for strategy in (tf.distribute.get_strategy(),
                     tf.distribute.MirroredStrategy(
                         devices, tf.distribute.ReductionToOneDevice())):
        keras.utils.set_random_seed(15)
        with strategy.scope():
            flow = ContinuousNormalizingFlow(
                mlp_dynamics(8, 2), rtol=1e-6, atol=1e-6,
                kinetic_energy=0.1)
            flow.compile(keras.optimizers.SGD(0.1))
        history = flow.fit(x, batch_size=32, epochs=2, shuffle=False,
                           verbose=0).history
        weights.append([w.numpy() for w in flow.trainable_variables])
        losses = history["loss"]
    for one, two in zip(*weights):
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
    assert losses[1] < losses[0]


def test_compile_takes_no_loss():
    flow = ContinuousNormalizingFlow(mlp_dynamics(8, 2))
    with pytest.raises(ValueError, match=r"argument `loss`, expected None: "
                       r"the loss of a ContinuousNormalizingFlow is its "
                       r"negative log-likelihood. Received: loss='mse'"):
        flow.compile("adam", loss="mse")
