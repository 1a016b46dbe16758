"""Every error message, matched."""

import re

import keras
import numpy as np
import pytest

from conftest import (BACKEND, SOLVE_ERROR, graph, jax_only, tensorflow_only,
                      xla)

from helpers import Driven, Linear, OdeRnnCell, Square, mlp_dynamics
from helpers import gradients as tape_gradients
from keras_node import NeuralODE, gradients, solvers


def dynamics():
    return mlp_dynamics(4, 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(t0=1.0, t1=1.0), ValueError,
         r"argument `t1`, expected a time other than t0=1.0. Received: t1=1.0"),
        (dict(t0=float("nan")), ValueError,
         r"argument `t0`, expected a finite float. Received: t0=nan"),
        (dict(t1=float("inf")), ValueError,
         r"argument `t1`, expected a finite float. Received: t1=inf"),
        (dict(t1="1"), TypeError,
         r"argument `t1`, expected a finite float. Received: t1='1'"),
        (dict(rtol=0.0), ValueError,
         r"argument `rtol`, expected a positive float. Received: rtol=0.0"),
        (dict(atol=-1e-3), ValueError,
         r"argument `atol`, expected a positive float. Received: atol=-0.001"),
        (dict(solver="rk45"), ValueError,
         r'argument `solver`, expected one of "dopri5", "tsit5", "bosh3", '
         r'"adaptive_heun", "euler", "midpoint", "rk4" or a '
         r'`keras_node.solvers.Solver`. '
         r"Received: solver='rk45'"),
        (dict(solver=3), TypeError, r"argument `solver`, .* Received: "
         r"solver=3"),
        (dict(gradient="checkpoint"), ValueError,
         r'argument `gradient`, expected one of "adjoint", "backprop" or a '
         r"`keras_node.gradients.Gradient`. Received: gradient='checkpoint'"),
        (dict(gradient=None), TypeError, r"Received: gradient=None"),
        (dict(solver="rk4", rtol=1e-3), ValueError,
         r"argument `rtol`, expected None: the fixed-step solver "
         r"RK4\(num_steps=10, step_size=None, unroll=False\) has no "
         r"tolerances \(choose "
         r"its `num_steps` or `step_size`\). Received: rtol=0.001"),
        (dict(solver=solvers.Euler(step_size=0.1), atol=1e-6), ValueError,
         r"argument `atol`, expected None: the fixed-step solver "
         r"Euler\(num_steps=None, step_size=0.1, unroll=False\)"),
        (dict(solver="midpoint", gradient=gradients.Adjoint(rtol=1e-6)),
         ValueError, r"argument `gradient`, expected an adjoint without "
         r"tolerances or norm: the backward solve takes the fixed-step "
         r"solver's steps. Received: gradient=Adjoint\(rtol=1e-06, "
         r"atol=None, norm='seminorm'\)"),
        (dict(solver="rk4", gradient=gradients.Adjoint(norm="full")),
         ValueError, r"argument `gradient`, .* Received: gradient=Adjoint"),
        (dict(adjoint_rtol=1e-4), TypeError,
         r"NeuralODE no longer takes `adjoint_rtol`: use "
         r"gradients.Adjoint\(rtol=...\) \(keras-node 0.2\). "
         r"Received: adjoint_rtol=0.0001"),
        (dict(max_num_steps=10), TypeError,
         r"NeuralODE no longer takes `max_num_steps`: use "
         r"solvers.DormandPrince\(max_num_steps=...\)"),
        (dict(kinetic_energy=-0.01), ValueError,
         r"argument `kinetic_energy`, expected a non-negative float. "
         r"Received: kinetic_energy=-0.01"),
        (dict(save_at=[0.5, 0.5, 1.0]), ValueError,
         r"argument `save_at`, expected a non-empty sequence of finite "
         r"floats from t0=0.0 towards t1=1.0, strictly monotone and within "
         r"\[t0, t1\], not ending at t0. "
         r"Received: save_at=\[0.5, 0.5, 1.0\]"),
        (dict(save_at=[0.0]), ValueError, r"Received: save_at=\[0.0\]"),
        (dict(save_at=[0.5, 2.0]), ValueError,
         r"argument `save_at`, .* Received: save_at=\[0.5, 2.0\]"),
        (dict(t1=-1.0, save_at=[0.5]), ValueError,
         r"argument `save_at`, expected .* from t0=0.0 towards t1=-1.0"),
        (dict(save_at=[]), ValueError, r"Received: save_at=\[\]"),
        (dict(save_at=[0.5, float("nan")]), ValueError,
         r"Received: save_at=\[0.5, nan\]"),
        (dict(save_at=1.0), TypeError, r"Received: save_at=1.0"),
        (dict(save_at=["1"]), TypeError, r"Received: save_at=\['1'\]"),
        # float32 times print as floats (float32's 0.3 is t1=0.3).
        (dict(t1=0.3, save_at=np.array([0.1, 0.31], "float32")), ValueError,
         r"Received: save_at=\[0.10000000149011612, 0.3100000023841858\]"),
        (dict(solver=solvers.Euler(step_size=2.5e-10)), ValueError,
         r"argument `solver`, expected a step_size making at most 10000000 "
         r"steps from t0=0.0 to t1=1.0. Received: solver=Euler\(num_steps="
         r"None, step_size=2.5e-10, unroll=False\) \(4000000000 steps\)"),
        (dict(solver=solvers.RK4(step_size=9e-8), save_at=[0.5, 1.0]),
         ValueError, r"at most 10000000 steps .* \(11111112 steps\)"),
        (dict(kinetic_energy=None), TypeError,
         r"argument `kinetic_energy`, expected a finite float. "
         r"Received: kinetic_energy=None"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuralODE(dynamics(), **kwargs)


def test_dynamics_must_be_a_layer():
    with pytest.raises(TypeError, match=r"argument `dynamics`, expected a "
                       r"Keras layer or model .* Received: dynamics=<function"):
        NeuralODE(lambda h: -h)


def test_dynamics_must_keep_the_shape():
    ode = NeuralODE(keras.layers.Dense(3))
    with pytest.raises(ValueError, match=r"argument `dynamics`, expected a "
                       r"layer whose output .* the state \(None, 2\). "
                       r"Received: dynamics=dense.* \(None, 3\)"):
        ode(keras.Input((2,)))


@pytest.mark.parametrize("symbolic", [True, False])
def test_input_must_be_floating(symbolic):
    ode = NeuralODE(dynamics())
    inputs = (keras.Input((2,), dtype="int32") if symbolic
              else np.ones((3, 2), "int32"))
    with pytest.raises(TypeError, match=r"argument `inputs`, expected a "
                       r"floating tensor .* Received: inputs of dtype int32"):
        ode(inputs)


@pytest.mark.parametrize("symbolic", [True, False])
def test_a_context_must_be_floating(symbolic):
    ode = NeuralODE(Driven(np.eye(2), np.ones((2, 1))))
    inputs = ([keras.Input((2,)), keras.Input((1,), dtype="int32")]
              if symbolic else [np.ones((3, 2), "float32"),
                                np.ones((3, 1), "int32")])
    with pytest.raises(TypeError, match=r"argument `inputs`, expected "
                       r"floating tensors \(the initial state and the "
                       r"context\). Received: inputs\[1\] of dtype int32 "
                       r"\(embed integer labels first"):
        ode(inputs)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_stiff_solve_stops_at_max_num_steps(gradient):
    # With backprop on JAX the forward solve runs in a bounded loop of ours.
    stiff = Linear([[-1e5, 0.0], [0.0, -1.0]], dtype="float64")
    ode = NeuralODE(stiff, rtol=1e-8, atol=1e-8, dtype="float64",
                    solver=solvers.DormandPrince(max_num_steps=20),
                    gradient=gradient)
    with pytest.raises(SOLVE_ERROR,
                       match=r"NeuralODE 'neural_ode.*' \(forward solve from "
                       r"t0=0.0 to t1=1.0\) did not finish within "
                       r"max_num_steps=20 steps \(accepted and rejected\)\. "
                       r"The dynamics are stiff, exploding or not finite for "
                       r"this input. Raise `max_num_steps`, loosen "
                       r"`rtol`/`atol`, use a fixed-step solver, lower the "
                       r"learning rate or regularise the dynamics."):
        ode(np.ones((1, 2)))


class NanPast(keras.layers.Layer):
    """`dh/dt = h log(|end - t|)`, NaN past `t = end` going `forward`."""

    def __init__(self, end, forward=True, **kwargs):
        super().__init__(**kwargs)
        self.end, self.sign = end, 1.0 if forward else -1.0

    def call(self, h, t):
        return h * keras.ops.log(self.sign * (self.end - t))


# h' = h^2 from h0 = 10 blows up at t = 0.1; the others turn NaN past
# t = 1.5, and going backward past t = -0.5.
STALLS = [pytest.param(Square(), 10.0, 1.0, 0.1, id="blows-up"),
          pytest.param(NanPast(1.5), 1.0, 2.0, 1.5, id="nan"),
          pytest.param(NanPast(-0.5, forward=False), 1.0, -2.0, -0.5,
                       id="nan-backward")]


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("dynamics, h0, t1, end", STALLS)
def test_a_solve_that_stalls_says_when(dynamics, h0, t1, end, traced):
    # The steps shrink towards where the dynamics blow up or turn NaN, until
    # they no longer advance the time: the solve ends there, not after the
    # rest of its budget, and on TensorFlow the message says when.
    ode = NeuralODE(dynamics, t1=t1, solver=solvers.Tsit5(max_num_steps=10**4))
    with pytest.raises(SOLVE_ERROR, match=(
            # A graph's assertion prints the apostrophes escaped.
            rf"NeuralODE \\?'neural_ode.*\\?' \(forward solve from t0=0.0 to "
            rf"t1={t1}\) stalled: 100 steps in a row did not advance the "
            r"time \(rejected, or too short to change it\), as where the "
            r"dynamics blow up or return NaN or inf, or where a float32 time "
            r"is too large for the steps that the tolerances need\. Check "
            r"the inputs and the weights of the dynamics \(a diverged "
            r"training run, a learning rate too high\), bound or regularise "
            r"the dynamics, shorten the time span, solve in float64, or use "
            r"a fixed-step solver\.")) as failure:
        (graph(ode) if traced else ode)(np.full((2, 2), h0, "float32"))
    if BACKEND == "tensorflow":  # JAX's solve does not return the time
        # Eagerly "t=1.4999999"; a graph's assertion prints "t=] [1.5]".
        reached = re.search(r"Time reached: t=(?:\] \[)?(-?[0-9.e-]+)",
                            str(failure.value))
        assert abs(float(reached.group(1)) - end) < 1e-4


class SpikyRotation(keras.layers.Layer):
    """A rotation whose speed jumps 10^4-fold near `(1, 0)`, once a turn."""

    def call(self, h):
        x, y = h[:, :1], h[:, 1:]
        speed = 1.0 + 1e4 * keras.ops.exp(-((x - 1.0) ** 2 + y ** 2) / 0.05**2)
        return speed * keras.ops.concatenate([y, -x], axis=1)


def test_short_steps_of_a_float32_time_far_from_zero_are_no_stall():
    # From t = 64 each jump takes a few steps shorter than float32 can add
    # to t: they do not advance the time, but the solve goes on after them
    # and ends near the float64 solution.
    def solve(dtype):
        ode = NeuralODE(SpikyRotation(dtype=dtype), t1=70.0, rtol=1e-6,
                        atol=1e-6, dtype=dtype,
                        solver=solvers.DormandPrince(max_num_steps=10**4))
        return keras.ops.convert_to_numpy(
            graph(ode)(np.array([[0.0, 1.0]], dtype)))

    np.testing.assert_allclose(solve("float32"), solve("float64"), atol=1e-3)


def xla_gradients(ode, h0):
    """The gradients of `sum(ode(h0))`, compiled by XLA (no solve raises)."""
    if BACKEND == "tensorflow":  # tape_gradients compiles it on JAX
        import tensorflow as tf

        return tf.function(lambda h: tape_gradients(ode, h, keras.ops.sum),
                           jit_compile=True)(tf.constant(h0))
    return tape_gradients(ode, h0, keras.ops.sum)


# With backprop on JAX an adaptive solve runs in a bounded loop of ours.
XLA_GRADIENTS = ["adjoint", pytest.param(
    "backprop", marks=pytest.mark.skipif(
        BACKEND == "tensorflow", reason="TensorFlow's XLA cannot compile "
        "the gradient of TFP's unbounded loop"))]


@pytest.mark.parametrize("gradient", XLA_GRADIENTS)
@pytest.mark.parametrize("dynamics, h0, t1, end", STALLS[:2])
def test_a_stalled_solve_under_xla_ends_at_once_in_nan(dynamics, h0, t1,
                                                       end, gradient):
    ode = NeuralODE(dynamics, t1=t1, gradient=gradient,
                    solver=solvers.Tsit5(max_num_steps=10**4))
    ode.build((2, 2))
    h0 = np.full((2, 2), h0, "float32")
    grads = xla_gradients(ode, h0)
    assert all(np.all(np.isnan(g)) for g in grads)
    # About 180 steps; the budget is 10^4.
    assert float(ode.steps_accepted) + float(ode.steps_rejected) < 500


@tensorflow_only("under jax.jit a failed backward solve cannot raise")
def test_backward_solve_has_its_own_message():
    import tensorflow as tf

    ode = NeuralODE(Linear([[-3.0, 0.0], [0.0, -1.0]], dtype="float64"),
                    rtol=1e-3, atol=1e-3, dtype="float64",
                    solver=solvers.Bosh3(max_num_steps=30),
                    gradient=gradients.Adjoint(rtol=1e-12, atol=1e-12))
    h0 = tf.ones((1, 2), tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(h0)
        out = ode(h0)
    with pytest.raises(SOLVE_ERROR,
                       match=r"\(adjoint solve from t1=1.0 back to t0=0.0\) "
                       r"did not finish within max_num_steps=30"):
        tape.gradient(out, h0)


def test_other_keras_backend_is_refused():
    import subprocess
    import sys

    # No other backend is installed here; pretend Keras chose torch.
    script = ("import keras; keras.backend.backend = lambda: 'torch'; "
              "import keras_node")
    result = subprocess.run([sys.executable, "-c", script],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert ("ImportError: keras_node runs on Keras' TensorFlow or JAX "
            "backend, but Keras is using the 'torch' backend. Set the "
            "environment variable KERAS_BACKEND=tensorflow (or jax)"
            ) in result.stderr


def test_a_backend_without_its_solver_packages_names_them(monkeypatch):
    import sys

    import keras_node

    backend = keras.backend.backend()
    name = "_jax_backend" if backend == "jax" else "_tf_backend"
    # As if the backend's packages were missing: its module cannot import.
    monkeypatch.delattr(keras_node, name, raising=False)
    monkeypatch.setitem(sys.modules, f"keras_node.{name}", None)
    needs = {"jax": "jax and tfp-nightly",
             "tensorflow": "tensorflow and tensorflow-probability"}[backend]
    with pytest.raises(ImportError, match=(
            rf"NeuralODE on Keras' {backend} backend needs {needs} \(.*"
            rf"\)\. Install them with: pip install 'keras-node\[{backend}"
            rf"\]'")):
        NeuralODE(dynamics())(np.ones((1, 2), "float32"))


def test_the_counts_metric_is_not_serialized_alone():
    ode = NeuralODE(dynamics())
    with pytest.raises(NotImplementedError, match=(
            r"EvaluationCounts belongs to its NeuralODE layer and is not "
            r"serialized on its own\.")):
        ode.evaluation_counts.get_config()


def test_exhausted_budget_under_xla_ends_in_nan_not_a_hang():
    # XLA compiles assertions away; the solve must still stop.
    ode = NeuralODE(Square(), solver=solvers.DormandPrince(max_num_steps=50))
    ode(np.full((2, 2), 0.1, "float32"))  # built
    solve = xla(ode)
    assert np.all(np.isnan(solve(np.full((2, 2), 10.0, "float32"))))
    assert np.all(np.isfinite(solve(np.full((2, 2), 0.1, "float32"))))


@pytest.mark.parametrize("gradient", XLA_GRADIENTS)
def test_exhausted_budget_under_xla_gives_nan_gradients(gradient):
    # Not zeros, which would pass for a flat loss; and the counts stay
    # within the budget (the last, unfinished trial step is not a step).
    ode = NeuralODE(Square(), gradient=gradient,
                    solver=solvers.DormandPrince(max_num_steps=50))
    ode(np.full((2, 2), 0.1, "float32"))  # built
    h0 = np.full((2, 2), 10.0, "float32")
    grads = xla_gradients(ode, h0)
    assert all(np.all(np.isnan(g)) for g in grads)
    assert float(ode.steps_accepted) + float(ode.steps_rejected) == 50


@pytest.mark.parametrize("make, error, match", [
    (lambda: solvers.DormandPrince(first_step_size=-0.1), ValueError,
     r"argument `first_step_size`, expected a positive float. "
     r"Received: first_step_size=-0.1"),
    (lambda: solvers.Tsit5(max_num_steps=0), ValueError,
     r"argument `max_num_steps`, expected a positive integer of at most "
     r"268435456. Received: max_num_steps=0"),
    (lambda: solvers.Bosh3(max_num_steps=10.5), TypeError,
     r"argument `max_num_steps`, expected a positive integer .* "
     r"Received: max_num_steps=10.5"),
    (lambda: solvers.DormandPrince(max_num_steps=10**12), ValueError,
     r"argument `max_num_steps`, expected a positive integer of at most "
     r"268435456. Received: max_num_steps=1000000000000"),
    (lambda: solvers.RK4(num_steps=4, step_size=0.1), ValueError,
     r"RK4 takes `num_steps` or `step_size`, not both. "
     r"Received: num_steps=4, step_size=0.1"),
    (lambda: solvers.Euler(num_steps=0), ValueError,
     r"argument `num_steps`, expected a positive integer of at most "
     r"10000000. Received: num_steps=0"),
    (lambda: solvers.Midpoint(step_size=float("inf")), ValueError,
     r"argument `step_size`, expected a finite float. "
     r"Received: step_size=inf"),
    (lambda: solvers.RK4(unroll="yes"), TypeError,
     r"argument `unroll`, expected True or False. Received: unroll='yes'"),
    (lambda: gradients.Adjoint(rtol=0), ValueError,
     r"argument `rtol`, expected a positive float. Received: rtol=0.0"),
    (lambda: gradients.Adjoint(atol=float("nan")), ValueError,
     r"argument `atol`, expected a finite float. Received: atol=nan"),
    (lambda: gradients.Adjoint(norm="L2"), ValueError,
     r'argument `norm`, expected "full" or "seminorm". Received: '
     r"norm='L2'"),
])
def test_bad_solver_and_gradient_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


class _Negative(keras.layers.Layer):
    def call(self, h):
        return -h


class _NotANumber(keras.layers.Layer):
    def call(self, h):
        return h * float("nan")


@pytest.mark.parametrize("solver, gradient", [
    ("dopri5", "adjoint"), ("dopri5", "backprop"), ("rk4", "adjoint")])
def test_nan_initial_state_fails_at_the_first_evaluation(solver, gradient):
    ode = NeuralODE(_Negative(), solver=solver, gradient=gradient)
    with pytest.raises(SOLVE_ERROR,
                       match=r"NeuralODE 'neural_ode.*' \(forward solve from "
                       r"t0=0.0 to t1=1.0\): the initial state holds NaN or "
                       r"inf. Check the inputs and the layers before the "
                       r"NeuralODE, and the weights of the dynamics"):
        ode(np.array([[1.0, np.inf], [0.0, 0.0]], "float32"))


def test_nan_dynamics_fail_at_the_first_evaluation():
    ode = NeuralODE(_NotANumber(), solver="tsit5")
    with pytest.raises(SOLVE_ERROR,
                       match=r"the first derivative \(the output of the "
                       r"dynamics\) holds NaN or inf"):
        graph(ode)(np.ones((2, 2), "float32"))
    assert float(ode.num_forward_evals) == 0  # never got to count


def test_nan_fixed_step_solution_is_named():
    ode = NeuralODE(_NotANumber(), solver="midpoint")
    with pytest.raises(SOLVE_ERROR,
                       match=r"the fixed-step solution \(the dynamics "
                       r"returned NaN or inf, or the steps are too long for "
                       r"them\) holds NaN or inf"):
        ode(np.ones((2, 2), "float32"))


class _NaNWall(keras.layers.Layer):
    """h' = 3h, but NaN beyond |h| > 5: a trial step that overshoots."""

    def call(self, h):
        return keras.ops.where(keras.ops.abs(h) > 5.0, float("nan"), 3.0 * h)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_a_trial_step_into_nan_is_rejected_not_stalled(gradient):
    ode = NeuralODE(_NaNWall(), t1=0.5, rtol=1e-6, atol=1e-6,
                    solver=solvers.DormandPrince(first_step_size=0.5),
                    gradient=gradient)
    np.testing.assert_allclose(ode(np.ones((1, 1), "float32")),
                               [[np.exp(1.5)]], rtol=1e-5)
    assert float(ode.steps_rejected) >= 1


class _FirstExample(keras.layers.Layer):
    def call(self, h):
        return h[:1]


class _Pair(keras.layers.Layer):
    def call(self, h):
        return h, h


@pytest.mark.parametrize("symbolic", [True, False])
def test_dynamics_returning_a_tuple_are_named(symbolic):
    inputs = keras.Input((2,)) if symbolic else np.ones((3, 2), "float32")
    with pytest.raises(ValueError, match=r"argument `dynamics`, expected a "
                       r"layer returning one tensor, the time derivative of "
                       r"the state. Received: dynamics=__pair.* returning "
                       r"tuple"):
        NeuralODE(_Pair())(inputs)


def test_dynamics_changing_the_batch_are_named():
    with pytest.raises(ValueError, match=r"argument `dynamics`, expected a "
                       r"layer whose output \(the time derivative\) has the "
                       r"shape of its input, the state \(3, 2\). Received: "
                       r"dynamics=__first_example.* with output shape "
                       r"\(1, 2\)"):
        NeuralODE(_FirstExample())(np.ones((3, 2), "float32"))
    # In `fit` the batch size is unknown while tracing: checked as it runs.
    inputs = keras.Input((2,))
    model = keras.Model(inputs, NeuralODE(_FirstExample())(inputs))
    model.compile("sgd", "mse")
    # (On JAX the batch is known while tracing: the same message, with it.)
    with pytest.raises((SOLVE_ERROR, ValueError),
                       match=r"argument `dynamics`, expected a layer whose "
                       r"output \(the time derivative\) has the shape of its "
                       r"input, the (shape of the state|state \(4, 2\)). "
                       r"Received: dynamics=__first_example"):
        model.fit(np.ones((4, 2)), np.ones((4, 2)), batch_size=4, verbose=0)


@pytest.mark.parametrize("version", ["0.24.0", "0.27.0", "1.0.0", "dev"])
def test_unsupported_tfp_versions_are_refused(version):
    from keras_node._tfp_compat import check_version

    with pytest.raises(ImportError, match=r"needs TensorFlow Probability "
                       rf"0\.25 to 0\.26\.x .*found version {version}\."):
        check_version(version)


def test_an_unsupported_tfp_fails_when_a_layer_is_made():
    import subprocess
    import sys

    # Before any data are loaded, with the version's own message (not the
    # one of a missing package).
    module = {"jax": "tensorflow_probability.substrates.jax"}.get(
        keras.backend.backend(), "tensorflow_probability")
    script = (f"import {module} as tfp; tfp.__version__ = '0.24.0'; "
              "import keras, keras_node; "
              "keras_node.NeuralODE(keras.layers.Dense(2))")
    result = subprocess.run([sys.executable, "-c", script],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert ("ImportError: keras-node needs TensorFlow Probability 0.25 to "
            "0.26.x (checked: ") in result.stderr
    assert "found version 0.24.0." in result.stderr
    assert "Install them with" not in result.stderr


@pytest.mark.parametrize("version", ["0.25.0", "0.26.0-dev20261027"])
def test_supported_tfp_versions_pass(version):
    from keras_node._tfp_compat import check_version

    check_version(version)  # no error


def test_missing_tfp_internals_are_named():
    import types

    from keras_node._tfp_compat import check_private

    without_solve = type("DormandPrince", (), {"_step": None})
    module = types.SimpleNamespace(DormandPrince=without_solve, rk_util=None,
                                   _TABLEAU=None)
    with pytest.raises(ImportError, match=r"0\.25\.9 lacks "
                       r"_RungeKuttaSolverInternalState, "
                       r"DormandPrince\._solve, which keras-node uses"):
        check_private(module, "0.25.9")


def test_missing_keras_internals_are_named():
    from keras_node import _keras_compat

    class Bare:  # a "model" of a Keras without `_flatten_layers`
        pass

    with pytest.raises(RuntimeError, match=r"keras-node uses Keras' private "
                       r"Layer._flatten_layers, checked against Keras "
                       rf"3\.15\.1; Keras {keras.__version__} does not have "
                       r"it \(AttributeError: "):
        _keras_compat.flatten_layers(Bare())


@jax_only("on TensorFlow the export runs (tests/test_serving.py)")
def test_cli_export_needs_the_tensorflow_backend(tmp_path, capsys):
    from keras_node import cli

    inputs = keras.Input((2,))
    keras.Model(inputs, NeuralODE(mlp_dynamics(4, 2))(inputs)).save(
        tmp_path / "model.keras")
    with pytest.raises(SystemExit):
        cli.main(["export", str(tmp_path / "model.keras"), str(tmp_path)])
    assert "keras-node export: error: export writes a TensorFlow SavedModel " \
        "and needs Keras' TensorFlow backend, not jax: run it with " \
        "KERAS_BACKEND=tensorflow" in capsys.readouterr().err


def _fit_with(layer, gradient="adjoint"):
    dynamics = keras.Sequential([keras.layers.Dense(4, activation="tanh"),
                                 layer, keras.layers.Dense(2)])
    inputs = keras.Input((2,))
    model = keras.Model(inputs, NeuralODE(dynamics, gradient=gradient)(
        inputs))
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
    return model.fit(x, x, batch_size=4, verbose=0)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_dynamics_updating_moving_statistics_are_refused(gradient):
    # TensorFlow updated them at every evaluation; JAX dropped the updates.
    with pytest.raises(ValueError, match=r"argument `dynamics`, expected a "
                       r"layer that changes no state when called: a solve "
                       r"calls it many times, also backward in time. "
                       r"Received: dynamics=sequential.*, which updates "
                       r"\S*batch_normalization\S*/moving_mean, "
                       r"\S*/moving_variance. Keep such layers out of the "
                       r"dynamics: to normalize inside them, use "
                       r"GroupNormalization or LayerNormalization"):
        _fit_with(keras.layers.BatchNormalization(), gradient)


@pytest.mark.parametrize("nested", [False, True])
def test_dynamics_adding_losses_are_refused(nested):
    # TensorFlow failed with a tensor out of its loop's scope; JAX dropped
    # the loss.
    layer = (NeuralODE(keras.layers.Dense(4), solver="rk4",
                       kinetic_energy=0.1) if nested
             else keras.layers.ActivityRegularization(l2=0.1))
    with pytest.raises(ValueError, match=r"argument `dynamics`, expected a "
                       r"layer that changes no state when called.*"
                       r"Received: dynamics=sequential.*, which adds a loss "
                       r"\(an activity_regularizer, add_loss, or a nested "
                       r"NeuralODE's regulariser\). Regularise the outermost "
                       r"solve \(kinetic_energy, jacobian_norm\)"):
        _fit_with(layer)


def test_random_layers_in_a_nested_layer_train():
    # Not a loop's body: JAX refused them for a while, as in an RNN cell's.
    inner = NeuralODE(keras.Sequential([keras.layers.Dense(4),
                                        keras.layers.Dropout(0.3)]),
                      solver="rk4")
    history = _fit_with(inner)
    assert np.isfinite(history.history["loss"][0])


def test_frozen_moving_statistics_and_weight_penalties_are_allowed():
    frozen = keras.layers.BatchNormalization(trainable=False)
    history = _fit_with(frozen)
    assert np.isfinite(history.history["loss"][0])
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), 0.0)
    penalised = keras.layers.Dense(4, kernel_regularizer="l2")
    history = _fit_with(penalised)
    assert np.isfinite(history.history["loss"][0])
    assert len(history.model.losses) == 1


class _UntrackedDraw(keras.layers.Layer):
    """Draws from a seed generator that a plain object holds: Keras does
    not track it, so each evaluation draws anew."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.holder = type("Holder", (), {})()
        self.holder.seed = keras.random.SeedGenerator(5)

    def call(self, h):
        return h + keras.random.normal(keras.ops.shape(h),
                                       seed=self.holder.seed)


def test_draws_from_an_untracked_seed_generator_are_named():
    with pytest.raises(ValueError, match=r"changes no state when called.* "
                       r"which updates \S*seed_generator_state. Draw random "
                       r"numbers with a keras.random.SeedGenerator that a "
                       r"layer of the dynamics holds as an attribute"):
        NeuralODE(_UntrackedDraw(), solver="rk4")(np.ones((2, 3), "float32"))


def _fit_recurrent(**kwargs):
    """One epoch of an ODE-RNN whose cell runs in Keras' loop."""
    dynamics = keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                                 keras.layers.Dropout(0.3),
                                 keras.layers.Dense(2)])
    inputs = keras.Input((3, 2))
    cell = OdeRnnCell(NeuralODE(dynamics, name="ode", **kwargs))
    model = keras.Model(inputs, keras.layers.RNN(cell)(inputs))
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(8, 3, 2)).astype("float32")
    return model.fit(x, x[:, -1], batch_size=4, verbose=0)


@pytest.mark.parametrize("regulariser", ["kinetic_energy", "jacobian_norm"])
def test_regularisers_in_a_loop_body_are_refused(regulariser):
    # JAX failed with a leaked tracer. TensorFlow cannot tell an RNN's loop
    # from a custom training loop's, where the loss stays in the loop: it
    # fails as it did, with its own message.
    if BACKEND == "tensorflow":
        with pytest.raises(ValueError, match=r"cannot be accessed from "
                           r"FuncGraph.*because it was defined in "
                           r"FuncGraph.*while_body.*which is out of scope"):
            _fit_recurrent(**{regulariser: 0.1})
        return
    with pytest.raises(ValueError, match=r"NeuralODE 'ode' is called in a "
                       r"loop's body \(a `keras.layers.RNN` cell's, in "
                       r"JAX's `scan`\), where the loss of kinetic_energy "
                       r"or jacobian_norm cannot leave the loop. Unroll the "
                       r"loop: `keras.layers.RNN\(cell, unroll=True\)`."):
        _fit_recurrent(**{regulariser: 0.1})


def test_random_layers_in_a_loop_body_draw_on_tensorflow_only():
    # JAX failed with a leaked tracer; TensorFlow draws at each step.
    if BACKEND == "tensorflow":
        assert np.isfinite(_fit_recurrent().history["loss"][0])
        return
    with pytest.raises(ValueError, match=r"NeuralODE 'ode' is called in a "
                       r"loop's body .*, where random layers in the "
                       r"dynamics and Hutchinson's trace estimator cannot "
                       r"draw \(their seed generators cannot advance\). "
                       r"Unroll the loop"):
        _fit_recurrent()


@jax_only("the export's own backend check")
def test_export_on_jax_says_to_use_tensorflow(tmp_path):
    from keras_node.serving import export_saved_model

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(RuntimeError, match=r"export_saved_model needs Keras' "
                       r"TensorFlow backend .* this is the 'jax' backend. "
                       r"Save the model as .keras and export it with "
                       r"KERAS_BACKEND=tensorflow"):
        export_saved_model(model, tmp_path)
