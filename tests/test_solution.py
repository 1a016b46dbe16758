"""Forward solutions and evaluation counts against ground truth."""

import keras
import numpy as np
import pytest
import scipy.linalg

from conftest import tensorflow_only
from helpers import CosineRate, Driven, Linear, OdeRnnCell, gradients
from keras_node import NeuralODE, solvers

A = np.array([[-0.5, 2.0], [-2.0, -0.5]])
H0 = np.array([[1.0, 0.0], [0.5, -2.0], [3.0, 1.0]])
# At rtol = atol = 1e-9 per step, the global error over these spans (which
# grow the solution up to e-fold) stays below 1e-6.
SOLUTION_TOL = 1e-6


def linear_solution(t0, t1):
    return H0 @ scipy.linalg.expm(A * (t1 - t0)).T


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (0.5, 3.0), (1.0, -1.0)])
def test_linear_matches_matrix_exponential(t0, t1):
    ode = NeuralODE(Linear(A, dtype="float64"), t0=t0, t1=t1, rtol=1e-9,
                    atol=1e-9, dtype="float64")
    np.testing.assert_allclose(ode(H0), linear_solution(t0, t1),
                               rtol=SOLUTION_TOL, atol=SOLUTION_TOL)


@pytest.mark.parametrize("t0, t1", [(0.0, 2.0), (2.0, -1.0)])
def test_time_dependent_matches_closed_form(t0, t1):
    ode = NeuralODE(CosineRate(dtype="float64"), t0=t0, t1=t1, rtol=1e-9,
                    atol=1e-9, dtype="float64")
    expected = H0 * np.exp(0.7 * (np.sin(t1) - np.sin(t0)))
    np.testing.assert_allclose(ode(H0), expected, rtol=SOLUTION_TOL,
                               atol=SOLUTION_TOL)


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_dynamics_with_a_context(solver, gradient):
    # dh/dt = h A^T + c B^T, the context c constant over the solve: with
    # M = [[A, B], [0, 0]], [h(t), c] = [h0, c] expm(M t)^T. The context
    # gets its gradient from the gradient method, as the weights do.
    b = np.array([[0.3, -1.0, 0.5], [0.7, 0.2, -0.4]])
    context = np.array([[1.0, -0.5, 0.2], [0.0, 2.0, 1.0], [-1.0, 0.3, 0.4]])
    save_at = [0.5, 1.5]
    options = (dict(rtol=1e-9, atol=1e-9) if solver == "dopri5"
               else dict(solver=solvers.RK4(step_size=0.01)))
    ode = NeuralODE(Driven(A, b, dtype="float64"), t1=1.5, save_at=save_at,
                    gradient=gradient, dtype="float64", **options)

    def closed_form(a, b):
        m = np.zeros((5, 5))
        m[:2, :2], m[:2, 2:] = a, b
        return [scipy.linalg.expm(m * t)[:2] for t in save_at]

    expected = np.stack([np.concatenate([H0, context], 1) @ e.T
                         for e in closed_form(A, b)], axis=1)
    np.testing.assert_allclose(ode([H0, context]), expected,
                               rtol=SOLUTION_TOL, atol=SOLUTION_TOL)
    weights = np.array([[0.4, -1.0], [2.0, 0.5]])  # one row per time
    (dh0, dcontext), da, db = gradients(
        ode, [H0, context], lambda hs: keras.ops.sum(hs * weights))
    # The loss is linear: each example's gradient is the same.
    slope = sum(w @ e for w, e in zip(weights, closed_form(A, b)))
    np.testing.assert_allclose(dh0, np.tile(slope[:2], (3, 1)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dcontext, np.tile(slope[2:], (3, 1)),
                               rtol=1e-6, atol=1e-6)
    # B^T's gradient, against central differences of the closed form.
    loss = lambda b: np.sum(weights * np.stack([
        np.concatenate([H0, context], 1) @ e.T
        for e in closed_form(A, b)], axis=1))
    expected_db = np.zeros((3, 2))
    for i, j in np.ndindex(2, 3):
        step = np.zeros((2, 3))
        step[i, j] = 1e-6
        expected_db[j, i] = (loss(b + step) - loss(b - step)) / 2e-6
    np.testing.assert_allclose(db, expected_db, rtol=1e-5, atol=1e-5)
    assert np.shape(da) == (2, 2)


class TimeScaled(keras.layers.Layer):
    """`dh/ds = T h A^T` for inputs `[h, T]`: over `s` in [0, 1], `dh/dt =
    h A^T` over [0, T]."""

    def build(self, input_shapes):
        self.a_transposed = self.add_weight(
            shape=(2, 2), initializer=keras.initializers.Constant(A.T))

    def call(self, inputs):
        h, end = inputs
        return end * keras.ops.matmul(h, self.a_transposed)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_end_times_of_each_example_as_a_context(gradient):
    # The guide's recipe for per-example end times T, with their gradients:
    # a change of time, T as the context. h(T) = h0 expm(A T)^T, and
    # dL/dT = (dL/dh) . h(T) A^T.
    ends = np.array([[0.5], [1.0], [2.5]])
    ode = NeuralODE(TimeScaled(dtype="float64"), rtol=1e-10, atol=1e-10,
                    gradient=gradient, dtype="float64")
    expected = np.stack([h @ scipy.linalg.expm(A * t).T
                         for h, t in zip(H0, ends[:, 0])])
    np.testing.assert_allclose(ode([H0, ends]), expected, rtol=1e-8,
                               atol=1e-8)
    weights = np.array([1.0, -2.0])
    (_, dends), _ = gradients(ode, [H0, ends],
                              lambda h: keras.ops.sum(h * weights))
    np.testing.assert_allclose(
        dends, np.sum(weights * (expected @ A.T), axis=1, keepdims=True),
        rtol=1e-7, atol=1e-7)


def test_error_follows_tolerance():
    errors = []
    for tol in (1e-3, 1e-6):
        ode = NeuralODE(Linear(A, dtype="float64"), t1=3.0, rtol=tol,
                        atol=tol, dtype="float64")
        errors.append(np.max(np.abs(ode(H0) - linear_solution(0.0, 3.0))))
    assert errors[0] < 1e-2
    assert errors[1] < errors[0] / 100


def test_a_float64_layer_solves_float32_inputs_in_float64():
    # As a Keras layer of dtype float64 would: its output is float64 too.
    # (H0 is exact in float32; a float32 solve is off by about 1e-7.)
    ode = NeuralODE(Linear(A, dtype="float64"), t1=1.0, rtol=1e-12,
                    atol=1e-12, dtype="float64")
    out = ode(H0.astype("float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float64"
    np.testing.assert_allclose(out, linear_solution(0.0, 1.0), rtol=1e-10,
                               atol=1e-10)


def test_float32_state_keeps_dtype():
    ode = NeuralODE(Linear(A), t1=1.0)
    out = ode(H0.astype("float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(out, linear_solution(0.0, 1.0), atol=1e-2)


class _Counting(Linear):
    calls = 0

    def call(self, h):
        type(self).calls += 1
        return super().call(h)


@tensorflow_only("eager TensorFlow calls the dynamics once an evaluation; "
                 "JAX traces loops once")
@pytest.mark.parametrize("first_step_size", [None, 0.05])
def test_evaluation_counts_equal_real_calls(first_step_size):
    """Eagerly, every evaluation is a Python call that we can count."""
    import tensorflow as tf

    dynamics = _Counting(A, dtype="float64")
    ode = NeuralODE(dynamics, t1=2.0, dtype="float64",
                    solver=solvers.DormandPrince(first_step_size))
    h0 = tf.constant(H0)
    ode.build(h0.shape)
    _Counting.calls = 0
    with tf.GradientTape() as tape:
        tape.watch(h0)
        loss = tf.reduce_sum(ode(h0))
    forward_calls = _Counting.calls
    tape.gradient(loss, h0)
    backward_calls = _Counting.calls - forward_calls
    assert ode.num_forward_evals.numpy() == forward_calls
    # Each adjoint evaluation runs the dynamics once (with a VJP).
    assert ode.num_backward_evals.numpy() == backward_calls
    assert forward_calls > 7


def test_automatic_first_step_saves_evaluations():
    counts = {}
    for first_step_size in (None, 1e-3):
        ode = NeuralODE(Linear(A, dtype="float64"), t1=1.0,
                        solver=solvers.DormandPrince(first_step_size),
                        dtype="float64")
        ode(H0)
        counts[first_step_size] = float(ode.num_forward_evals)
    assert counts[None] < counts[1e-3]


@pytest.mark.parametrize("t0, t1, save_at", [
    (0.0, 1.5, [0.0, 0.4, 1.5]),   # t0 itself, then two times
    (0.5, 3.0, [1.0, 2.0]),        # the solve ends at 2.0, before t1
    (1.0, -1.0, [0.5, -0.2, -1.0]),  # backward in time
])
def test_save_at_returns_the_state_at_each_time(t0, t1, save_at):
    ode = NeuralODE(Linear(A, dtype="float64"), t0=t0, t1=t1, rtol=1e-9,
                    atol=1e-9, save_at=save_at, dtype="float64")
    hs = ode(H0)
    assert hs.shape == (len(H0), len(save_at), 2)
    expected = np.stack([linear_solution(t0, t) for t in save_at], axis=1)
    np.testing.assert_allclose(hs, expected, rtol=SOLUTION_TOL,
                               atol=SOLUTION_TOL)
    # One solve: as many evaluations as a solve to the last time alone.
    alone = NeuralODE(ode.dynamics, t0=t0, t1=save_at[-1], rtol=1e-9,
                      atol=1e-9, dtype="float64")
    alone(H0)
    assert float(ode.num_forward_evals) == float(alone.num_forward_evals)


@pytest.mark.parametrize("inner_gradient, outer_gradient", [
    ("adjoint", "adjoint"), ("adjoint", "backprop"), ("backprop", "adjoint"),
    ("backprop", "backprop")])
def test_a_neural_ode_in_the_dynamics_of_another(inner_gradient,
                                                  outer_gradient):
    # dh/dt = g(h) B^T, g the inner solve of dk/ds = k A^T over [0, 0.5]:
    # linear, dh/dt = h C with C = expm(0.5 A)^T B^T. The inner layer's
    # solve per evaluation is not counted (the dynamics change no state).
    # At 1e-7 (not 1e-9: a solve per evaluation), results within 1e-5.
    b = np.array([[0.3, -1.0], [0.7, 0.2]])
    inner = NeuralODE(Linear(A, dtype="float64"), t1=0.5, rtol=1e-7,
                      atol=1e-7, gradient=inner_gradient, dtype="float64")
    outer = NeuralODE(
        keras.Sequential([inner, Linear(b, dtype="float64")]), rtol=1e-7,
        atol=1e-7, gradient=outer_gradient, dtype="float64")

    def closed_form(a, b):
        c = scipy.linalg.expm(0.5 * a).T @ b.T
        return H0 @ scipy.linalg.expm(c)

    np.testing.assert_allclose(outer(H0), closed_form(A, b),
                               rtol=1e-5, atol=1e-5)
    # With the inner adjoint compiled, as `fit` runs it: TensorFlow failed
    # there, or was off by 0.25%, with the outer backprop. (Tracing nested
    # backprop would take 25 s.)
    dh0, *dweights = gradients(outer, H0, keras.ops.sum,
                               graph=inner_gradient == "adjoint")
    c = scipy.linalg.expm(0.5 * A).T @ b.T
    np.testing.assert_allclose(dh0, np.ones_like(H0) @ scipy.linalg.expm(c).T,
                               rtol=1e-5, atol=1e-5)
    for k, dweight in enumerate(dweights):  # of A^T, then of B^T
        expected = np.zeros((2, 2))
        for i, j in np.ndindex(2, 2):
            plus, minus, step = [A, b], [A, b], np.zeros((2, 2))
            step[i, j] = 1e-6
            plus[k], minus[k] = plus[k] + step, minus[k] - step
            expected[j, i] = (closed_form(*plus).sum()
                              - closed_form(*minus).sum()) / 2e-6
        np.testing.assert_allclose(dweight, expected, rtol=1e-5, atol=1e-5)
    assert float(outer.num_forward_evals) > 0
    assert float(outer.num_backward_evals) > 0
    assert float(inner.num_forward_evals) == 0
    assert float(inner.num_backward_evals) == 0


@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_a_recurrent_cell_solves_between_inputs(gradient, unroll):
    # h_k = h_{k-1} E + x_k, E = expm(0.5 A)^T, from h_0 = 0. Not unrolled,
    # the cell runs in a `while_loop` or `scan` (compiled: a `tf.function`
    # or `jax.jit`), where the layer updates no counter.
    ode = NeuralODE(Linear(A, dtype="float64"), t1=0.5, rtol=1e-9,
                    atol=1e-9, gradient=gradient, dtype="float64")
    rnn = keras.layers.RNN(OdeRnnCell(ode, dtype="float64"), unroll=unroll,
                           dtype="float64")
    xs = np.random.default_rng(0).normal(size=(3, 4, 2))

    def closed_form(a):
        h = np.zeros((3, 2))
        for x in np.moveaxis(xs, 1, 0):
            h = h @ scipy.linalg.expm(0.5 * a).T + x
        return h

    np.testing.assert_allclose(rnn(xs), closed_form(A), rtol=SOLUTION_TOL,
                               atol=SOLUTION_TOL)
    _, da_transposed = gradients(rnn, xs, keras.ops.sum, graph=True)
    expected = np.zeros((2, 2))
    for i, j in np.ndindex(2, 2):
        step = np.zeros((2, 2))
        step[i, j] = 1e-6
        expected[j, i] = (closed_form(A + step).sum()
                          - closed_form(A - step).sum()) / 2e-6
    np.testing.assert_allclose(da_transposed, expected, rtol=1e-5, atol=1e-5)


def test_float32_save_at_may_round_past_t0_and_t1():
    # float32(0.7) < 0.7 and float32(0.8) > 0.8: the times are t0 and t1.
    times = np.linspace(0.7, 0.8, 3, dtype="float32")
    assert float(times[0]) < 0.7 and float(times[-1]) > 0.8
    ode = NeuralODE(Linear(A, dtype="float64"), t0=0.7, t1=0.8,
                    save_at=times, rtol=1e-9, atol=1e-9, dtype="float64")
    assert ode.save_at == (0.7, float(times[1]), 0.8)
    np.testing.assert_allclose(ode(H0)[:, -1], linear_solution(0.7, 0.8),
                               rtol=SOLUTION_TOL, atol=SOLUTION_TOL)


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_float32_state_is_accurate_at_large_times(solver):
    # dh/dt = -h over [t0, t0 + 1]: in float32 time, t0 = 1e8 gave 0.00029.
    tolerances = {"rtol": 1e-6, "atol": 1e-6} if solver == "dopri5" else {}
    for t0 in (0.0, 1e8):
        ode = NeuralODE(Linear([[-1.0]]), t0=t0, t1=t0 + 1.0, solver=solver,
                        **tolerances)
        np.testing.assert_allclose(ode(np.ones((1, 1), "float32")),
                                   [[np.exp(-1.0)]], rtol=1e-5)
