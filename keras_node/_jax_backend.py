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
    """The states at `layer.output_times` (stacked first) from `h0`.

    Returns `(hs, kinetic)` as the TensorFlow backend's `solve`. Updates the
    layer's forward counter.
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

    ys, num_forward = _odeint_adjoint(
        fn, layer.t0, layer.output_times, forward, adjoint, mask,
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
    return ys if layer.kinetic_energy else (ys, None)


def _freeze(options):
    return tuple(sorted(options.items()))


def _odeint_adjoint(fn, t0, times, forward, adjoint, state_mask, seminorm,
                    record_backward, y0, params):
    """As the TensorFlow backend's `odeint_adjoint`, `fn` taking `params`."""
    if state_mask is None:
        state_mask = jax.tree.map(lambda _: True, y0)
    return _make_solve(fn, t0, times, _freeze(forward), _freeze(adjoint),
                       state_mask, seminorm, record_backward)(y0, params)


def _make_solve(fn, t0, times, forward, adjoint, state_mask, seminorm,
                record_backward):
    forward, adjoint = dict(forward), dict(adjoint)

    @jax.custom_vjp
    def solve(y0, params):
        return _solver.integrate(
            dormand_prince, lambda t, y: fn(t, y, params), t0, times[-1], y0,
            error_mask=state_mask, save_at=times, **forward)

    def solve_fwd(y0, params):
        ys, num_evals = solve(y0, params)
        return (ys, num_evals), (ys, params)

    def solve_bwd(residuals, cotangents):
        ys, params = residuals
        dys = jax.tree.map(lambda d, y: d.astype(y.dtype), cotangents[0], ys)

        def adjoint_fn(t, state):
            y, a, _ = state
            f, vjp = jax.vjp(functools.partial(fn, t), y, params)
            dy, dparams = vjp(a)
            return f, *jax.tree.map(jnp.negative, (dy, dparams))

        mask = (state_mask, state_mask, [not seminorm] * len(params))
        state, num_evals = _solver.integrate_adjoint(
            dormand_prince, adjoint_fn, t0, times, ys, dys,
            jax.tree.map(jnp.zeros_like, params), mask=mask, **adjoint)
        jax.debug.callback(record_backward, num_evals)
        _, dy0, dparams = state
        return dy0, dparams

    solve.defvjp(solve_fwd, solve_bwd)
    return solve
