"""Solvers and gradient methods against ground truth."""

import pathlib

import keras
import numpy as np
import pytest
import scipy.linalg
from keras import ops

from conftest import BACKEND, jax_only, tensorflow_only

from helpers import Linear, finite_difference_check
from helpers import gradients as tape_gradients
from helpers import (gradient_program_loops, gradient_temp_bytes,
                     linear_gradients, mlp_dynamics, run_layer_test, sin)
from keras_node import NeuralODE, gradients, solvers
from keras_node.callbacks import LogEvaluationCounts

A = np.array([[-0.5, 2.0], [-2.0, -0.5]])
H0 = np.array([[1.0, 0.0], [0.5, -2.0]])
W = np.array([[0.3, -1.0], [2.0, 0.5]])  # loss = sum(W * h(t1))
ADAPTIVE = ["dopri5", "tsit5", "bosh3", "adaptive_heun"]
# Each adaptive pair's higher order, and its evaluations a step.
ORDER = {"dopri5": 5, "tsit5": 5, "bosh3": 3, "adaptive_heun": 2}
PER_STEP = {"dopri5": 6, "tsit5": 6, "bosh3": 3, "adaptive_heun": 2}
# A tight tolerance each pair reaches within its step budget, and the
# error bound it then meets on the linear problem.
TIGHT = {"dopri5": (1e-10, 1e-8), "tsit5": (1e-10, 1e-8),
         "bosh3": (1e-8, 1e-6), "adaptive_heun": (1e-5, 1e-4)}
FIXED = {"euler": (solvers.Euler, 1), "midpoint": (solvers.Midpoint, 2),
         "rk4": (solvers.RK4, 4)}
DATA = pathlib.Path(__file__).parent / "data"


def linear_ode(t1=2.0, **kwargs):
    return NeuralODE(Linear(A, dtype="float64"), t1=t1, dtype="float64",
                     **kwargs)


def exact(t1=2.0, h0=H0):
    return h0 @ scipy.linalg.expm(A * t1).T


def error(ode, t1=2.0):
    return np.max(np.abs(ode(H0) - exact(t1)))


@pytest.mark.parametrize("name", FIXED)
def test_fixed_step_order_of_convergence(name):
    cls, order = FIXED[name]
    n = {"euler": 200, "midpoint": 50, "rk4": 20}[name]
    coarse = error(linear_ode(solver=cls(num_steps=n)))
    fine = error(linear_ode(solver=cls(num_steps=2 * n)))
    # Halving the step divides the global error by about 2^order.
    assert np.log2(coarse / fine) == pytest.approx(order, abs=0.15)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_solvers_converge_and_loosen(name):
    tol, bound = TIGHT[name]
    tight = linear_ode(solver=name, rtol=tol, atol=tol)
    loose = linear_ode(solver=name, rtol=1e-3, atol=1e-3)
    tight_error = error(tight)
    assert tight_error < bound
    assert error(loose) > tight_error
    assert float(loose.steps_accepted) < float(tight.steps_accepted)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_one_adaptive_step_has_the_local_error_of_its_order(name):
    # A first step over the whole span, accepted at a loose tolerance: the
    # error of one step of a pair of order p is O(dt^(p+1)), so halving dt
    # divides it by at least 2^(p+1) (Tsit5's by more on a linear problem).
    errors = []
    for dt in (0.2, 0.1):
        ode = linear_ode(t1=dt, solver=type(solvers.get(name))(
            first_step_size=dt), rtol=1.0, atol=1.0)
        errors.append(error(ode, t1=dt))
        assert (float(ode.steps_accepted), float(ode.steps_rejected)) == (
            1, 0)
    assert np.log2(errors[0] / errors[1]) > ORDER[name] + 0.8


def test_heun_needs_more_steps_as_the_tolerance_tightens():
    # The solvers guide's figures: 67 steps to Bosh3's 11 at 1e-3, 656 to
    # 46 at 1e-5.
    ratios = []
    for tol in (1e-3, 1e-5):
        steps = []
        for name in ("adaptive_heun", "bosh3"):
            ode = linear_ode(solver=name, rtol=tol, atol=tol)
            ode(H0)
            steps.append(float(ode.steps_accepted))
        ratios.append(steps[0] / steps[1])
    assert ratios[0] > 5.5 and ratios[1] > 13.5


class _Constant(keras.layers.Layer):
    def call(self, h):
        return keras.ops.ones_like(h) * 0.2


@pytest.mark.parametrize("name", ADAPTIVE + list(FIXED))
def test_float64_solve_is_exact_on_a_constant_rate(name):
    # Every Runge-Kutta method is exact here; a tableau rounded to float32
    # (TFP's own cast) is off by about 3e-8.
    ode = NeuralODE(_Constant(dtype="float64"), t0=1.0, t1=8.0, solver=name,
                    dtype="float64")
    out = ode(np.full((1, 3), 3.2))
    np.testing.assert_allclose(out, 3.2 + 0.2 * 7.0, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cls", [solvers.DormandPrince, solvers.Tsit5,
                                 solvers.Bosh3, solvers.AdaptiveHeun])
def test_an_output_time_a_step_lands_on_comes_from_the_next_step(cls):
    # On a constant rate every step is exact and ten times the one before:
    # 0 to 0.5, 0.5 to 5.5, 5.5 to 55.5. The first ends on the output time
    # 0.5, which the second step's dense output gives (at its start).
    ode = NeuralODE(_Constant(dtype="float64"), t1=6.0, save_at=[0.5, 6.0],
                    solver=cls(first_step_size=0.5), dtype="float64")
    out = ode(np.full((1, 1), 3.2))
    np.testing.assert_allclose(out[0, :, 0], [3.3, 4.4], rtol=0, atol=1e-13)
    assert float(ode.steps_accepted) == 3


@pytest.mark.parametrize("cls", [solvers.DormandPrince, solvers.Tsit5,
                                 solvers.Bosh3, solvers.AdaptiveHeun])
@pytest.mark.parametrize("first_step_size", [1.0, 4.0])
def test_a_first_step_that_reaches_t1_is_the_only_step(cls, first_step_size):
    # A step that ends on t1 does not pass it (TFP's loop would step again):
    # the first step ends a hair past t1 instead, exact on a constant rate.
    ode = NeuralODE(_Constant(dtype="float64"), t1=1.0, dtype="float64",
                    solver=cls(first_step_size=first_step_size))
    np.testing.assert_allclose(ode(np.full((1, 1), 3.2)), [[3.4]], rtol=0,
                               atol=1e-13)
    assert (float(ode.steps_accepted), float(ode.steps_rejected)) == (1, 0)


@pytest.mark.parametrize("cls", [solvers.DormandPrince, solvers.Tsit5,
                                 solvers.Bosh3, solvers.AdaptiveHeun])
def test_the_last_output_time_ends_a_step(cls):
    # Every step accepted (rtol = atol = 10), each ten times the one
    # before: 0 to 0.5, then one that would end at 5.5, far past t1 = 1,
    # cut to end a hair past it. Its error is a step's (0.0008 to 0.53
    # here), not that of TFP's interpolation back from 5.5 (5 to 60).
    ode = linear_ode(t1=1.0, solver=cls(first_step_size=0.5), rtol=10.0,
                     atol=10.0)
    assert error(ode, t1=1.0) < 0.6
    assert (float(ode.steps_accepted), float(ode.steps_rejected)) == (2, 0)


@pytest.mark.parametrize("name", ["dopri5", "tsit5"])
def test_float64_error_keeps_falling_with_the_tolerance(name):
    errors, evals = [], []
    for tol in (1e-8, 1e-10, 1e-12):
        ode = linear_ode(solver=name, rtol=tol, atol=tol)
        errors.append(error(ode))
        evals.append(float(ode.num_forward_evals))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-10
    # Float32 coefficients made 1e-12 cost hundreds of thousands.
    assert evals[2] < 20_000


@pytest.mark.parametrize("name", ["dopri5", "bosh3", "rk4"])
@pytest.mark.parametrize("shape", [(2, 0), (0, 3)])
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_empty_state_returns_at_once(name, shape, gradient):
    ode = NeuralODE(mlp_dynamics(4, shape[1] or 1), solver=name,
                    gradient=gradient,
                    **({"rtol": 1e-6, "atol": 1e-6} if name != "rk4" else {}))
    if shape[1] == 0:
        ode = NeuralODE(_Constant(), solver=name, gradient=gradient)
    out = ode(np.zeros(shape, "float32"))
    assert tuple(out.shape) == shape
    # The error of an empty state is 0: steps grow tenfold and none fail.
    assert float(ode.steps_rejected) == 0
    assert float(ode.steps_accepted) <= 10


@pytest.mark.parametrize("name", ADAPTIVE)
def test_step_statistics_add_up_to_the_evaluations(name):
    ode = linear_ode(solver=name, rtol=1e-5, atol=1e-5)
    ode(H0)
    steps = float(ode.steps_accepted) + float(ode.steps_rejected)
    # Two set-up evaluations: f(t0) and the first-step heuristic.
    assert float(ode.num_forward_evals) == 2 + PER_STEP[name] * steps
    assert float(ode.steps_accepted) > 5


def test_rejected_steps_are_counted():
    # A first step far too long is rejected at least once.
    ode = linear_ode(solver=solvers.DormandPrince(first_step_size=1.0),
                     rtol=1e-8, atol=1e-8)
    ode(H0)
    assert float(ode.steps_rejected) >= 1


@pytest.mark.parametrize("solver, steps", [
    (solvers.RK4(num_steps=8), 8 + 1),       # 0.3 splits 0.25 into 2 steps
    (solvers.RK4(step_size=0.1), 3 + 7),
])
def test_fixed_steps_land_on_every_output_time(solver, steps):
    ode = linear_ode(t1=1.0, solver=solver, save_at=[0.3, 1.0])
    hs = ode(H0)
    expected = np.stack([exact(0.3), exact(1.0)], axis=1)
    np.testing.assert_allclose(hs, expected, atol=1e-3)
    assert float(ode.steps_accepted) == steps
    assert float(ode.num_forward_evals) == 4 * steps
    assert float(ode.steps_rejected) == 0


@pytest.mark.parametrize("save_at", [[0.3, 1.0], [0.0, 0.3, 0.5, 1.0]])
def test_fixed_step_adjoint_steps_back_over_the_forward_grid(save_at):
    # Steps of at most 0.1: 0.3 in 3, 0.7 in 7, or 0.2 in 2 and 0.5 in 5.
    ode = linear_ode(t1=1.0, solver=solvers.RK4(step_size=0.1),
                     save_at=save_at)
    dh0, da_t = tape_gradients(ode, H0, lambda hs: ops.sum(W[:, None] * hs))
    # The loss sums W * h(t) over the output times: so do its gradients.
    expected = [sum(g) for g in zip(*(linear_gradients(A, H0, W, t)
                                      for t in save_at))]
    np.testing.assert_allclose(dh0, expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(da_t, expected[1], rtol=1e-4, atol=1e-5)
    assert float(ode.num_forward_evals) == 4 * 10
    assert float(ode.num_backward_evals) == 4 * 10


@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
def test_unrolled_steps_compute_what_the_loop_does(gradient):
    # Steps of at most 0.1: 0.3 in 3 and 0.7 in 7, both ways.
    loss_fn = lambda hs: ops.sum(W[:, None] * hs)
    runs = []
    for unroll in (False, True):
        ode = linear_ode(t1=1.0, solver=solvers.RK4(step_size=0.1,
                                                    unroll=unroll),
                         gradient=gradient, save_at=[0.3, 1.0])
        runs.append([ode(H0), *tape_gradients(ode, H0, loss_fn),
                     float(ode.num_forward_evals),
                     float(ode.num_backward_evals),
                     gradient_program_loops(ode, H0, loss_fn)])
    looped, unrolled = runs
    for a, b in zip(looped[:3], unrolled[:3]):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    assert unrolled[3:5] == looped[3:5] == [40.0, 40.0]
    assert looped[5] > 0 and unrolled[5] == 0  # no loop left to run


def analytic_grads(t1):
    return linear_gradients(A, H0, W, t1)


@pytest.mark.parametrize("name", list(FIXED))
@pytest.mark.parametrize("save_at", [None, [0.4, 1.0]])
def test_backprop_equals_finite_differences_of_the_discrete_solve(
        name, save_at):
    keras.utils.set_random_seed(11)
    ode = NeuralODE(mlp_dynamics(6, 3, dtype="float64"), t1=1.0,
                    dtype="float64", solver=FIXED[name][0](num_steps=5),
                    gradient="backprop", save_at=save_at)
    h0 = np.random.default_rng(11).normal(size=(3, 3))
    loss_fn = lambda h: ops.sum(sin(h))
    finite_difference_check(ode, h0, loss_fn, rtol=1e-7, atol=1e-8)
    # Each recorded evaluation is differentiated once.
    assert float(ode.num_backward_evals) == float(ode.num_forward_evals)


@pytest.mark.parametrize("cls", [solvers.DormandPrince, solvers.Tsit5,
                                 solvers.Bosh3])
@pytest.mark.parametrize("t1, save_at, first_step_size", [
    (2.0, None, None),
    (2.0, [0.0, 0.3, 0.31, 2.0], None),  # t0, and two times in one step
    (-1.5, [-0.5, -1.5], None),          # backwards in time
    (2.0, [0.5, 2.0], 0.5),              # a step that ends on a time
    (2.0, None, 1.0),                    # a first step too long: rejected
])
def test_backprop_takes_the_adjoints_steps(cls, t1, save_at,
                                           first_step_size):
    # On JAX, backprop steps in a bounded loop of its own (TFP's cannot be
    # reverse-differentiated): the same steps and outputs as TFP's.
    runs = []
    for gradient in ("adjoint", "backprop"):
        ode = linear_ode(t1=t1, save_at=save_at, gradient=gradient,
                         solver=cls(first_step_size=first_step_size),
                         rtol=1e-6, atol=1e-6)
        runs.append((ode(H0), [float(count) for count in (
            ode.num_forward_evals, ode.steps_accepted, ode.steps_rejected)]))
    (adjoint, adjoint_counts), (backprop, backprop_counts) = runs
    np.testing.assert_allclose(backprop, adjoint, rtol=0, atol=1e-13)
    assert backprop_counts == adjoint_counts
    assert adjoint_counts[2] >= (first_step_size == 1.0)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_backprop_is_the_gradient_of_the_steps_taken(name):
    # The rows e1 and e2 share the steps of the batch, so their outputs are
    # the discrete solve's propagators M(t), h(t) = h0 M(t)^T: the steps'
    # gradient of sum_t W_t * h(t) is sum_t W_t M(t), which at rtol 1e-3
    # is far from the analytic gradient.
    h0 = np.concatenate([np.eye(2), H0])
    weights = np.random.default_rng(5).normal(size=(2, 4, 2))
    ode = linear_ode(t1=2.0, save_at=[0.7, 2.0], solver=name,
                     gradient="backprop", rtol=1e-3, atol=1e-3)
    out = np.asarray(ode(h0))
    grad = tape_gradients(
        ode, h0, lambda h: ops.sum(ops.transpose(h, (1, 0, 2)) * weights))
    propagators = [out[:2, i].T for i in range(2)]
    discrete = sum(w @ m for w, m in zip(weights, propagators))
    np.testing.assert_allclose(grad[0], discrete, rtol=0, atol=1e-12)
    analytic = sum(w @ scipy.linalg.expm(A * t)
                   for w, t in zip(weights, (0.7, 2.0)))
    assert np.max(np.abs(discrete - analytic)) > 1e-6


def _backprop_temp_bytes(h0, max_num_steps, save_at=None):
    """XLA's working memory for the gradient of backprop through a
    Dormand-Prince solve of a 256-wide MLP from `h0` (on JAX, its bounded
    loop)."""
    return gradient_temp_bytes(
        NeuralODE(mlp_dynamics(256, 256), gradient="backprop",
                  solver=solvers.DormandPrince(max_num_steps=max_num_steps),
                  save_at=save_at),
        h0, ops.sum)


@jax_only("TensorFlow keeps every step for the backward pass")
def test_adaptive_backprop_memory_grows_as_the_root_of_the_budget():
    # Whatever the steps taken (here a few), JAX needs a loop bounded by
    # max_num_steps; checkpointed, it keeps about 2 sqrt(max_num_steps)
    # states. Sixteen times the budget: at most about four times the
    # memory (3.0 measured, with the part that does not grow), not 16.
    h0 = np.random.default_rng(0).normal(size=(64, 256))
    sizes = [_backprop_temp_bytes(h0, n) for n in (100, 1600)]
    assert 2 < sizes[1] / sizes[0] < 6


@jax_only("TensorFlow keeps every step for the backward pass")
def test_adaptive_backprop_keeps_the_outputs_once():
    # The states at the save_at times ride in the bounded loop's state, yet
    # its checkpoints need not keep them (nothing differentiated reads
    # them): 32 output times add about their own size and their gradient's,
    # not a copy at each of the 2 sqrt(max_num_steps) = 80 checkpoints.
    h0 = np.random.default_rng(0).normal(size=(64, 256)).astype("float32")
    one, many = [_backprop_temp_bytes(h0, 1600, save_at) for save_at in
                 (None, list(np.linspace(0, 1, 33)[1:]))]
    outputs = 32 * h0.nbytes
    assert many - one < 4 * outputs


@tensorflow_only("counts TensorFlow's gradient functions")
@pytest.mark.parametrize("solver", [
    "dopri5", "bosh3", solvers.DormandPrince(first_step_size=0.1), "rk4"])
def test_backprop_counts_the_evaluations_it_differentiates(solver):
    import tensorflow as tf

    products = []  # one entry per vector-Jacobian product that ran

    class Counted(keras.layers.Layer):
        """`tanh(h W)`, recording each run of its gradient."""

        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], shape[-1]))

        def call(self, h):
            @tf.custom_gradient
            def f(h, w):
                y = tf.tanh(h @ w)

                def grad(dy):
                    ran = tf.py_function(lambda: products.append(1) or 0, [],
                                         tf.int32)
                    with tf.control_dependencies([ran]):
                        g = dy * (1 - y * y)
                        return g @ tf.transpose(w), tf.transpose(h) @ g

                return y, grad

            return f(h, tf.convert_to_tensor(self.w))

    keras.utils.set_random_seed(0)
    ode = NeuralODE(keras.Sequential([Counted()]), solver=solver,
                    gradient="backprop")
    h0 = tf.constant(np.random.default_rng(0).normal(size=(4, 3)),
                     tf.float32)

    @tf.function
    def loss_gradients(h):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(ode(h) ** 2)
        return tape.gradient(loss, ode.trainable_variables)

    loss_gradients(h0)
    assert float(ode.num_backward_evals) == len(products) > 0
    # Hairer's first step size costs an evaluation but is not
    # differentiated; a given first step or fixed steps cost none.
    assert len(products) == float(ode.num_forward_evals) - (
        solver in ("dopri5", "bosh3"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ADAPTIVE)
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_gradients_converge_to_the_analytic_gradient(name, gradient):
    expected = analytic_grads(1.5)
    # Bosh3, of order 3: about 500 evaluations at 1e-7, over 2,000 at 1e-9.
    tight, bound = {"bosh3": (1e-7, 1e-5),
                    "adaptive_heun": (1e-5, 1e-4)}.get(name, (1e-9, 1e-6))
    errors = []
    for tol in (1e-4, tight):
        ode = linear_ode(t1=1.5, solver=name, gradient=gradient, rtol=tol,
                         atol=tol)
        got = tape_gradients(ode, H0, lambda h: ops.sum(W * h))
        errors.append(max(np.max(np.abs(g - e))
                          for g, e in zip(got, expected)))
    assert errors[1] < errors[0]
    assert errors[1] < bound


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_step_adjoint_converges_to_the_analytic_gradient(name):
    expected = analytic_grads(1.5)
    cls, _ = FIXED[name]
    errors = []
    for n in (20, 80):
        ode = linear_ode(t1=1.5, solver=cls(num_steps=n))
        got = tape_gradients(ode, H0, lambda h: ops.sum(W * h))
        errors.append(max(np.max(np.abs(g - e))
                          for g, e in zip(got, expected)))
        # The backward solve takes the forward solve's steps.
        assert float(ode.num_backward_evals) == float(ode.num_forward_evals)
    assert errors[1] < errors[0] / 3


# Every solver with both gradient methods, by name and as objects.
SOLVER_GRADIENTS = [
    *[(solver, gradient) for solver in ("dopri5", "tsit5", "bosh3", "euler",
                                        "midpoint", "rk4")
      for gradient in ("adjoint", "backprop")],
    ("adaptive_heun", "adjoint"),
    (solvers.DormandPrince(max_num_steps=300), gradients.Adjoint(norm="full")),
    (solvers.Tsit5(first_step_size=0.05), gradients.Adjoint(rtol=1e-5)),
    (solvers.Midpoint(step_size=0.3), gradients.Backprop()),
    (solvers.RK4(num_steps=3, unroll=True), gradients.Adjoint()),
]


@pytest.mark.slow
@pytest.mark.parametrize("solver, gradient", SOLVER_GRADIENTS)
def test_every_solver_and_gradient_keeps_the_layer_contract(
        solver, gradient, tmp_path):
    adaptive = solvers.get(solver).adaptive

    def make():
        return NeuralODE(mlp_dynamics(8, 3), solver=solver,
                         gradient=gradient,
                         **({"rtol": 1e-4} if adaptive else {}))

    history = run_layer_test(make, (3,), seed=13, tmp_path=tmp_path,
                             callbacks=[LogEvaluationCounts()])
    steps = history["steps_accepted"][0] + history["steps_rejected"][0]
    evals_per_step = {**PER_STEP, "euler": 1, "midpoint": 2,
                      "rk4": 4}[solvers.get(solver).name]
    setup = (2 if solvers.get(solver).options().get("first_step_size")
             is None else 1) if adaptive else 0
    assert history["nfe_forward"][0] == setup + evals_per_step * steps


def test_keras_node_0_1_0_files_load_and_give_the_same_outputs():
    # Saved by tests/data/make_legacy_fixture.py with keras-node 0.1.0.
    model = keras.models.load_model(DATA / "legacy_v0_1_0.keras")
    data = np.load(DATA / "legacy_v0_1_0.npz")
    ode = model.get_layer("ode")
    assert ode.solver == solvers.DormandPrince(first_step_size=0.01,
                                               max_num_steps=500)
    assert ode.gradient == gradients.Adjoint(rtol=1e-4, atol=1e-5,
                                             norm="full")
    assert (ode.rtol, ode.atol, ode.save_at) == (1e-5, 1e-6, (0.5, 1.5))
    np.testing.assert_allclose(model.predict(data["x"], verbose=0),
                               data["y"], rtol=1e-5, atol=1e-5)


def test_fixed_step_solvers_allow_xla():
    adaptive = NeuralODE(mlp_dynamics(4, 2))
    fixed = NeuralODE(mlp_dynamics(4, 2), solver="rk4", gradient="backprop")
    # TensorFlow's XLA cannot compile an adaptive solve; JAX compiles all.
    assert adaptive.supports_jit is (BACKEND == "jax")
    assert fixed.supports_jit
    # And the compiled train step computes what the plain one does.
    losses = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(15)
        inputs = keras.Input((2,))
        model = keras.Model(inputs, NeuralODE(
            mlp_dynamics(4, 2), solver="rk4", gradient="backprop")(inputs))
        model.compile(keras.optimizers.SGD(0.1), "mse",
                      jit_compile=jit_compile)
        x = np.random.default_rng(15).normal(size=(8, 2)).astype("float32")
        losses.append(model.fit(x, 2 * x, epochs=3, verbose=0)
                      .history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_solver_and_gradient_by_name_and_object():
    assert solvers.get("tsit5") == solvers.Tsit5()
    assert solvers.get({"module": None, "class_name": "RK4",
                        "config": {"num_steps": 3, "step_size": None},
                        "registered_name": "keras_node>RK4"}) \
        == solvers.RK4(3)
    # The short form, as keras.optimizers.get({"class_name": "Adam", ...}).
    assert solvers.get({"class_name": "RK4", "config": {"num_steps": 3}}) \
        == solvers.RK4(3)
    assert gradients.get({"class_name": "Adjoint",
                          "config": {"norm": "full"}}) \
        == gradients.Adjoint(norm="full")
    assert gradients.get("backprop") == gradients.Backprop()
    # Hashable, equal objects alike (dict keys, sets, functools.cache).
    assert len({solvers.RK4(3), solvers.get("rk4"), solvers.RK4(3),
                gradients.Adjoint(), gradients.get("adjoint")}) == 3
    assert solvers.RK4().num_steps == 10
    ode = NeuralODE(mlp_dynamics(4, 2), solver="rk4")
    assert (ode.rtol, ode.atol) == (None, None)
