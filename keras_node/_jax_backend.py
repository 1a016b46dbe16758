"""The JAX backend of `NeuralODE`: the adjoint as a `jax.custom_vjp`.

On JAX there are no variables to close over: the dynamics run through
`dynamics.stateless_call` with their trainable weights passed in explicitly,
so that the adjoint can return their gradients. Steps are taken by TFP's
Dormand-Prince of its JAX substrate (`tfp-nightly`), through `_solver`.

What differs from TensorFlow: assertions cannot run inside JAX's loops, so
an exhausted `max_num_steps` makes the solve return NaN; an eager call (not
under `jax.jit` or `fit`) then raises the same error as on TensorFlow. A
`custom_vjp` backward pass cannot update layer state, so the backward solve
hands its count to the host (`jax.debug.callback`), where
`num_backward_evals` reads it. Keras' JAX trainer builds `fit`'s logs from
metric variables alone, so the counts reach them through the
`keras_node.callbacks.LogEvaluationCounts` callback.
"""

import functools

import jax
import jax.numpy as jnp
from tensorflow_probability.substrates.jax.math.ode import dormand_prince

from keras_node import _solver


def solve(layer, h0):
    """`(h(t1), kinetic energy)` for `layer` (a `NeuralODE`) from `h0`.

    The kinetic energy is `None` unless the layer regularises it. Updates
    the layer's forward counter.
    """
    dynamics = layer.dynamics
    non_trainable = [v.value for v in dynamics.non_trainable_variables]

    def dynamics_fn(t, h, params):
        kwargs = {"t": t} if layer._time_dependent else {}
        out, _ = dynamics.stateless_call(params, non_trainable, h, **kwargs)
        return out.astype(h.dtype)

    fn, y0, mask = _solver.augment(dormand_prince.tf, dynamics_fn, h0,
                                   layer.kinetic_energy)
    forward, adjoint = layer._solve_options()
    params = [v.value for v in dynamics.trainable_variables]

    def record_backward(num_evals):
        layer._backward_evals_host = float(num_evals)

    y1, num_forward = _odeint_adjoint(
        fn, layer.t0, layer.t1, forward, adjoint, mask,
        layer.adjoint_norm == "seminorm", record_backward, y0, params)
    try:
        evals = int(num_forward)
    except jax.errors.ConcretizationTypeError:
        evals = None  # traced (under jit): no Python error can be raised
    if evals is not None and _solver.exhausted(
            evals, layer.max_num_steps, layer.first_step_size):
        raise RuntimeError(_solver.budget_message(forward["what"],
                                                  layer.max_num_steps))
    layer._forward_evals.assign(num_forward.astype("float32"))
    return y1 if layer.kinetic_energy else (y1, None)


def _freeze(options):
    return tuple(sorted(options.items()))


def _odeint_adjoint(fn, t0, t1, forward, adjoint, state_mask, seminorm,
                    record_backward, y0, params):
    if state_mask is None:
        state_mask = jax.tree.map(lambda _: True, y0)
    return _make_solve(fn, t0, t1, _freeze(forward), _freeze(adjoint),
                       state_mask, seminorm, record_backward)(y0, params)


def _make_solve(fn, t0, t1, forward, adjoint, state_mask, seminorm,
                record_backward):
    forward, adjoint = dict(forward), dict(adjoint)

    @jax.custom_vjp
    def solve(y0, params):
        return _solver.integrate(
            dormand_prince, lambda t, y: fn(t, y, params), t0, t1, y0,
            error_mask=state_mask, **forward)

    def solve_fwd(y0, params):
        y1, num_evals = solve(y0, params)
        return (y1, num_evals), (y1, params)

    def solve_bwd(residuals, cotangents):
        y1, params = residuals
        dy1 = cotangents[0]

        def adjoint_fn(t, state):
            y, a, _ = state
            f, vjp = jax.vjp(functools.partial(fn, t), y, params)
            dy, dparams = vjp(a)
            return f, *jax.tree.map(jnp.negative, (dy, dparams))

        mask = (state_mask, state_mask, [not seminorm] * len(params))
        dy1 = jax.tree.map(lambda d, y: d.astype(y.dtype), dy1, y1)
        state1 = (y1, dy1, jax.tree.map(jnp.zeros_like, params))
        (_, dy0, dparams), num_evals = _solver.integrate(
            dormand_prince, adjoint_fn, t1, t0, state1, error_mask=mask,
            **adjoint)
        jax.debug.callback(record_backward, num_evals)
        return dy0, dparams

    solve.defvjp(solve_fwd, solve_bwd)
    return solve
