"""Adjoint gradients against analytic gradients and finite differences."""

import keras
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
from keras import ops

from conftest import tensorflow_only

from helpers import (sin, tanh, CosineRate, Linear, finite_difference_check,
                     gradient_program_size, gradients, linear_gradients,
                     mlp_dynamics, small_conv_dynamics)
from keras_node import NeuralODE
from keras_node.gradients import Adjoint

A = np.array([[-0.5, 2.0], [-2.0, -0.5]])
H0 = np.array([[1.0, 0.0], [0.5, -2.0]])
W = np.array([[0.3, -1.0], [2.0, 0.5]])  # loss = sum(W * h(t1))
TIGHT = dict(rtol=1e-10, atol=1e-10)
GRAD_TOL = 1e-6


@pytest.mark.parametrize("t1", [1.5, -1.0])
def test_linear_gradients_are_analytic(t1):
    ode = NeuralODE(Linear(A, dtype="float64"), t1=t1, dtype="float64",
                    **TIGHT)
    dh0, da_t = gradients(ode, H0, lambda h: ops.sum(W * h))
    expected_dh0, expected_da_t = linear_gradients(A, H0, W, t1)
    np.testing.assert_allclose(dh0, expected_dh0, rtol=GRAD_TOL,
                               atol=GRAD_TOL)
    np.testing.assert_allclose(da_t, expected_da_t, rtol=GRAD_TOL,
                               atol=GRAD_TOL)


def test_time_dependent_gradients_are_analytic():
    t0, t1 = 0.2, 2.5
    ode = NeuralODE(CosineRate(dtype="float64"), t0=t0, t1=t1,
                    dtype="float64", **TIGHT)
    dh0, dw = gradients(ode, H0, ops.sum)
    growth = np.sin(t1) - np.sin(t0)
    np.testing.assert_allclose(dh0, np.full_like(H0, np.exp(0.7 * growth)),
                               rtol=GRAD_TOL)
    np.testing.assert_allclose(
        dw, np.sum(H0) * growth * np.exp(0.7 * growth), rtol=GRAD_TOL)


@pytest.mark.parametrize("adjoint_norm", ["full", "seminorm"])
def test_mlp_gradients_match_finite_differences(adjoint_norm):
    keras.utils.set_random_seed(1)
    ode = NeuralODE(mlp_dynamics(8, 3, dtype="float64"), t1=1.0,
                    dtype="float64", gradient=Adjoint(
                        norm=adjoint_norm), **TIGHT)
    h0 = np.random.default_rng(1).normal(size=(4, 3))
    finite_difference_check(ode, h0, lambda h: ops.sum(sin(h)))


@pytest.mark.parametrize("adjoint_norm", ["full", "seminorm"])
def test_conv_gradients_match_finite_differences(adjoint_norm):
    keras.utils.set_random_seed(2)
    ode = NeuralODE(small_conv_dynamics(3, dtype="float64"), t1=1.0,
                    dtype="float64", gradient=Adjoint(
                        norm=adjoint_norm), **TIGHT)
    h0 = np.random.default_rng(2).normal(size=(2, 5, 5, 3))
    finite_difference_check(ode, h0, lambda h: ops.sum(h ** 2))


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_a_float64_state_with_float32_weights_gets_their_gradients(solver):
    # The solve stays in float64 while the float32 dynamics compute in
    # float32; the adjoint integrates their gradients in float64. Ground
    # truth: the same weights in float64 dynamics, to float32's accuracy.
    keras.utils.set_random_seed(3)
    h0 = np.random.default_rng(3).normal(size=(2, 5, 5, 3))
    options = dict(solver=solver, **(TIGHT if solver == "dopri5" else {}))
    dynamics = small_conv_dynamics(3)
    ode = NeuralODE(dynamics, **options)
    ode(h0)
    exact = NeuralODE(small_conv_dynamics(3, dtype="float64"),
                      dtype="float64", **options)
    exact(h0)
    exact.set_weights(ode.get_weights())
    loss = lambda h: ops.sum(h ** 2)
    got, expected = gradients(ode, h0, loss), gradients(exact, h0, loss)
    assert [keras.backend.standardize_dtype(g.dtype) for g in got] == [
        "float64"] + ["float32"] * len(ode.trainable_variables)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_time_dependent_mlp_gradients_match_finite_differences():
    @keras.saving.register_keras_serializable(package="keras_node_tests")
    class TimeMLP(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(6, activation=tanh,
                                             dtype=self.dtype_policy)
            self.out = keras.layers.Dense(2, dtype=self.dtype_policy)

        def call(self, h, t):
            time = keras.ops.ones_like(h[:, :1]) * keras.ops.cast(t, h.dtype)
            return self.out(self.hidden(keras.ops.concatenate([h, time], -1)))

    keras.utils.set_random_seed(3)
    ode = NeuralODE(TimeMLP(dtype="float64"), t0=0.5, t1=2.0,
                    dtype="float64", **TIGHT)
    h0 = np.random.default_rng(3).normal(size=(3, 2))
    finite_difference_check(ode, h0, lambda h: ops.sum(h ** 3))


def test_adjoint_tolerances_are_separate():
    """A loose adjoint tolerance costs fewer backward evaluations."""
    backward = {}
    for adjoint_tol in (1e-3, 1e-8):
        ode = NeuralODE(Linear(A, dtype="float64"), t1=2.0, rtol=1e-8,
                        atol=1e-8, dtype="float64",
                        gradient=Adjoint(rtol=adjoint_tol,
                                                   atol=adjoint_tol))
        gradients(ode, H0, ops.sum)
        backward[adjoint_tol] = float(ode.num_backward_evals)
    assert backward[1e-3] < backward[1e-8]


@tensorflow_only("tf.function")
def test_gradients_under_tf_function_match_eager():
    import tensorflow as tf

    keras.utils.set_random_seed(4)
    ode = NeuralODE(mlp_dynamics(8, 3), t1=1.0)
    h0 = np.random.default_rng(4).normal(size=(4, 3)).astype("float32")
    eager = gradients(ode, h0, tf.reduce_sum)
    graph = tf.function(lambda: gradients(ode, h0, tf.reduce_sum))()
    # float32: graph mode rewrites the arithmetic (grappler), and the
    # adaptive solves carry the rounding differences; on an AMD EPYC without
    # oneDNN they reached 1.4e-6 on gradients of up to 2.2. A wrong graph
    # gradient differs by far more.
    for e, g in zip(eager, graph):
        np.testing.assert_allclose(e, g, rtol=1e-5, atol=1e-5)


@tensorflow_only("a traced shape with unknown dimensions (JAX traces "
                 "static shapes)")
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_gradients_with_an_unknown_state_dimension_match_known(gradient):
    # Sequences of varying length: (batch, None, features).
    import tensorflow as tf

    ode = NeuralODE(mlp_dynamics(8, 3), gradient=gradient)
    h0 = np.random.default_rng(5).normal(size=(2, 5, 3)).astype("float32")
    known = tf.function(lambda h: gradients(ode, h, tf.reduce_sum))(h0)
    unknown = tf.function(
        lambda h: gradients(ode, h, tf.reduce_sum),
        input_signature=[tf.TensorSpec((None, None, 3), tf.float32)])(h0)
    for k, u in zip(known, unknown):
        np.testing.assert_allclose(k, u, rtol=1e-5, atol=1e-6)


def test_seminorm_takes_fewer_backward_steps():
    keras.utils.set_random_seed(5)
    h0 = np.random.default_rng(5).normal(size=(16, 4)).astype("float32")
    backward = {}
    for norm in ("full", "seminorm"):
        keras.utils.set_random_seed(5)
        ode = NeuralODE(mlp_dynamics(64, 4), t1=3.0, rtol=1e-5, atol=1e-5,
                        gradient=Adjoint(norm=norm))
        gradients(ode, h0, lambda h: ops.sum(h ** 2))
        backward[norm] = float(ode.num_backward_evals)
    assert backward["seminorm"] < backward["full"]


def test_full_norm_weighs_each_parameter_gradient_like_the_state():
    # torchdiffeq's mixed norm: a parameter gradient of one element whose
    # error is twice its tolerance rejects the step, however many state
    # elements are exact. (TFP's norm over all elements together would
    # dilute it by their number and accept.)
    from keras_node import _solver
    from keras_node._tfp_compat import substrate

    sub = substrate(keras.backend.backend())
    tf = sub.tf
    state = (tf.ones([1000]), tf.ones([1000]), [tf.zeros([1])])
    error = (tf.zeros([1000]), tf.zeros([1000]), [tf.fill([1], 2e-3)])

    def ratio(mask):
        step = _solver._AdaptiveStep(
            sub, tab=_solver.tableau(sub, "dopri5"), max_num_steps=10,
            what="test", error_mask=mask, ok=True, times=tf.ones([1]))
        return float(step._error_ratio(tf, state, state, error, 1e-3, 1e-3))

    assert ratio((True, True, [True])) > 1  # full: rejected
    assert ratio((True, True, [False])) == 0  # seminorm: the state is exact


@pytest.mark.parametrize("t1", [1.5, -1.0])
def test_kinetic_energy_is_the_path_integral_of_the_squared_speed(t1):
    ode = NeuralODE(Linear(A, dtype="float64"), t1=t1, dtype="float64",
                    kinetic_energy=0.3, **TIGHT)
    h1 = ode(H0)
    # f(t) = h0 expm(A t)^T A^T along each example's path.
    speed2 = lambda t, h: np.sum((h @ scipy.linalg.expm(A * t).T @ A.T) ** 2)
    energy = [scipy.integrate.quad(speed2, min(0, t1), max(0, t1), args=(h,),
                                   epsabs=1e-12, epsrel=1e-12)[0] for h in H0]
    [loss] = ode.losses
    np.testing.assert_allclose(loss, 0.3 * np.mean(energy), rtol=1e-7)
    # The state is solved as without the regulariser.
    np.testing.assert_allclose(h1, H0 @ scipy.linalg.expm(A * t1).T,
                               rtol=GRAD_TOL, atol=GRAD_TOL)


def test_kinetic_energy_gradients_match_finite_differences():
    keras.utils.set_random_seed(6)
    ode = NeuralODE(mlp_dynamics(8, 3, dtype="float64"), t1=1.0,
                    dtype="float64", kinetic_energy=0.5, **TIGHT)
    h0 = np.random.default_rng(6).normal(size=(4, 3))
    # Both cotangents at once: the state's and the energy's.
    finite_difference_check(
        ode, h0, lambda h: ops.sum(sin(h)), with_losses=True)


def test_regularisers_of_an_empty_batch_are_zero():
    # A replica's share of a short last batch may be empty: 0, as Keras'
    # own losses, not 0/0 (a NaN epoch loss).
    ode = NeuralODE(Linear(A), kinetic_energy=0.3, jacobian_norm=0.1)
    assert ode(np.zeros((0, 2), "float32")).shape == (0, 2)
    [loss] = ode.losses
    assert float(loss) == 0.0


def test_kinetic_energy_adds_no_steps():
    keras.utils.set_random_seed(7)
    dynamics = mlp_dynamics(16, 3)
    h0 = np.random.default_rng(7).normal(size=(8, 3)).astype("float32")
    counts, states = [], []
    for weight in (0.0, 1.0):
        ode = NeuralODE(dynamics, t1=2.0, kinetic_energy=weight)
        gradients(ode, h0, lambda h: ops.sum(h ** 2), with_losses=True)
        counts.append((float(ode.num_forward_evals),
                       float(ode.num_backward_evals)))
        states.append(ode(h0))
    assert counts[0] == counts[1]
    np.testing.assert_array_equal(states[0], states[1])


def test_save_at_gradients_match_finite_differences():
    # Every saved state in the loss: the adjoint solve restarts at each time
    # with that time's cotangent added.
    keras.utils.set_random_seed(9)
    ode = NeuralODE(mlp_dynamics(8, 3, dtype="float64"), t1=1.0,
                    dtype="float64", save_at=[0.25, 0.5, 1.0],
                    kinetic_energy=0.1, **TIGHT)
    h0 = np.random.default_rng(9).normal(size=(4, 3))
    weights = np.array([[[1.0], [-2.0], [0.5]]], "float64")
    finite_difference_check(ode, h0, lambda hs: ops.sum(sin(hs) * weights),
                            with_losses=True)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_dynamics_reading_another_layers_weight_differentiate_it(gradient):
    # dh/dt = h K, K the kernel of the head, read by a `Lambda` that does
    # not own it: y = h0 expm(K) K. On JAX the dynamics read K as stored
    # (its value when the step was traced), and it got no gradient there.
    k = np.array([[0.5, -1.0], [0.8, 0.3]])
    head = keras.layers.Dense(2, use_bias=False)
    head.build((None, 2))
    head.kernel.assign(k)
    dynamics = keras.layers.Lambda(lambda h: ops.matmul(h, head.kernel),
                                   output_shape=(2,))
    inputs = keras.Input((2,))
    model = keras.Model(inputs, head(NeuralODE(
        dynamics, gradient=gradient, rtol=1e-8, atol=1e-8)(inputs)))
    h0 = np.array([[1.0, -0.5], [0.3, 2.0], [-1.2, 0.4]], "float32")
    weights = np.array([[0.3, -1.0], [2.0, 0.5], [1.0, 1.5]], "float32")
    loss = lambda k: np.sum(weights * (h0 @ scipy.linalg.expm(k) @ k))
    expected = np.zeros_like(k)
    for i in np.ndindex(k.shape):
        step = np.zeros_like(k)
        step[i] = 1e-6
        expected[i] = (loss(k + step) - loss(k - step)) / 2e-6
    dk = gradients(model, h0, lambda y: ops.sum(weights * y))[1]
    np.testing.assert_allclose(dk, expected, rtol=1e-4)


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_save_at_gradients_far_from_time_zero(solver):
    # In float32, 1e6 + 0.37 rounds to 1e6 + 0.375, and 1e6 + 0.99999 to
    # 1e6 + 1: the adjoint's intervals between output times must not be
    # taken from the rounded times (they were, and were 0.0625 off, or 0).
    offsets = np.array([0.1, 0.37, 0.99999, 1.0])
    results = []
    for t0 in (0.0, 1e6):
        ode = NeuralODE(Linear([[-0.7]]), t0=t0, t1=t0 + 1.0,
                        save_at=list(t0 + offsets), solver=solver)
        results.append(gradients(ode, np.ones((1, 1), "float32"), ops.sum))
    exact = [np.exp(-0.7 * offsets).sum(),
             (offsets * np.exp(-0.7 * offsets)).sum()]
    for at_zero, far in zip(*results):
        np.testing.assert_allclose(far, at_zero, rtol=1e-6)
    np.testing.assert_allclose(np.ravel(results[1]), exact, rtol=1e-3)


@pytest.mark.parametrize("solver, gradient", [
    ("dopri5", "adjoint"), ("rk4", "adjoint"), ("rk4", "backprop")])
def test_program_does_not_grow_with_the_output_times(solver, gradient):
    # One loop over the intervals between output times, not a solve each:
    # a gradient through 40 output times traces (and compiles) as one
    # through 4.
    sizes = []
    for n in (4, 40):
        ode = NeuralODE(mlp_dynamics(8, 2), t1=1.0, solver=solver,
                        gradient=gradient,
                        save_at=list(np.linspace(0.0, 1.0, n + 1)[1:]))
        sizes.append(gradient_program_size(ode, np.ones((3, 2), "float32"),
                                           ops.sum))
    assert sizes[1] < 1.1 * sizes[0], sizes


class _WithSpareWeights(keras.layers.Layer):
    """`dh/dt = h A^T`, holding a float kernel and an int counter that its
    call never reads."""

    def build(self, input_shape):
        self.a_transposed = self.add_weight(
            shape=(2, 2), initializer=keras.initializers.Constant(A.T))
        self.spare = self.add_weight(shape=(2,), initializer="ones")
        self.steps = self.add_weight(shape=(), dtype="int32",
                                     initializer="zeros")

    def call(self, h):
        return ops.matmul(h, self.a_transposed)


@tensorflow_only("JAX has no None gradient: Keras on JAX gives every "
                 "unread weight a zero")
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_weights_the_dynamics_do_not_read_get_no_gradient(gradient):
    # As for any Keras layer: None, which optimizers skip (a zero would get
    # weight decay and momentum), and none for an integer weight.
    ode = NeuralODE(_WithSpareWeights(), gradient=gradient)
    ode(np.ones((3, 2), "float32"))
    dh0, *dweights = gradients(ode, np.ones((3, 2), "float32"), ops.sum)
    assert [w.dtype for w in ode.trainable_variables] == [
        "float32", "float32", "int32"]
    assert dweights[0] is not None
    assert dweights[1:] == [None, None]
