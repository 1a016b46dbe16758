"""The JAX backend of `NeuralODE`: the adjoint as a `jax.custom_vjp`.

On JAX there are no variables to close over: the dynamics run in a
`keras.StatelessScope` that maps their weights (and those of other layers
that they read) to values passed in explicitly, so that the adjoint can
return their gradients. Steps are taken by the same `_solver` code as on
TensorFlow, on TFP's JAX substrate (`tfp-nightly`).

What differs from TensorFlow: assertions cannot run inside JAX's loops, so
an exhausted `max_num_steps` makes the solve return NaN; an eager call (not
under `jax.jit` or `fit`) then raises the same error as on TensorFlow. An
eager call runs a compiled solve, which the next eager call with the same
settings reuses (on TensorFlow it runs op by op). A
backward pass cannot update layer state, so it hands its count to the host
(`jax.debug.callback`). JAX cannot reverse-differentiate the unbounded loop
of TFP's adaptive solve, so `"backprop"` with an adaptive solver steps in a
bounded, checkpointed loop of ours instead (`_bounded_while`). On a CPU the
dynamics are evaluated and differentiated with their convolutions laid out
for XLA's fast kernels (`_jax_compat`).
"""

import collections
import functools
import math
import weakref

import jax
import jax.numpy as jnp

from keras_node import _jax_compat, _solver
from keras_node._keras_compat import (DrawCounter, in_symbolic_build,
                                      stored_dtypes)
from keras_node._tfp_compat import substrate

_TFP = substrate("jax")


def solve(dynamics, h0, *, time_dependent, t0, times, forward, adjoint,
          gradient, seminorm, on_backward_evals, kinetic=False,
          jacobian=False, trace=None, noise=None, training=None,
          random_state=(), draws=None, context=()):
    """As the TensorFlow backend's `solve`; `on_backward_evals` runs on the
    host. Here every non-trainable variable, `random_state`'s among them,
    is read once, at the start. An eager call (no argument traced) runs a
    compiled solve, kept for the next eager call with the same settings."""
    if training is not None and not _traced(training):
        training = bool(training)  # also a numpy or JAX boolean
    settings = dict(
        time_dependent=time_dependent, t0=t0, times=tuple(times),
        forward=forward, adjoint=adjoint, gradient=gradient,
        seminorm=seminorm, kinetic=kinetic, jacobian=jacobian, trace=trace,
        training=training)
    context = list(context)
    compiled = None
    if not _traced(h0, noise, training, context,
                   _values(dynamics.variables)):
        compiled = _compiled(dynamics, h0, context, random_state, settings)
    trainable, others = (compiled[2:] if compiled else _variables(
        dynamics, h0, context, time_dependent, training))
    # The context is an argument of the solve, as the weights are.
    params, frozen = _values(trainable) + context, _values(others)
    if compiled and not _traced(params, frozen):
        *results, counts = compiled[0](h0, noise, params, frozen)
        draws.update(compiled[1])
    else:
        *results, counts = _solve(
            dynamics, trainable, others, random_state, draws,
            on_backward_evals, h0, noise, params, frozen, **settings)
    _raise_if_failed(counts, forward)
    return (*results, counts)


def _traced(*values):
    """Whether an array among `values` (nests) is being traced."""
    return any(isinstance(x, jax.core.Tracer)
               for x in jax.tree.leaves(values))


def _values(variables):
    with stored_dtypes():
        return [v.value for v in variables]


def _variables(dynamics, h0, context, time_dependent, training):
    """`(trainable, others)`: the variables that the dynamics read at `h0`
    (and `context`).

    Weights of other layers that they read (a layer's kernel in a
    `Lambda`) are among them, as a traced step maps them: they are
    arguments of the solve as the dynamics' own, or their values would be
    the stored ones and get no gradient."""
    own, foreign = {id(v) for v in dynamics.variables}, {}

    def probe(h, context):
        out, scope = _call(dynamics, jnp.zeros((), h.dtype), h, context, [],
                           {}, time_dependent, training)
        foreign.update((id(v), v) for v in scope.foreign if id(v) not in own)
        return out

    jax.eval_shape(probe, h0, context)
    return ([*dynamics.trainable_variables,
             *(v for v in foreign.values() if v.trainable)],
            [*dynamics.non_trainable_variables,
             *(v for v in foreign.values() if not v.trainable)])


# For each dynamics layer, its compiled eager solves by their settings (the
# least recently used dropped past `_COMPILED_PER_DYNAMICS`).
_COMPILED = weakref.WeakKeyDictionary()
_COMPILED_PER_DYNAMICS = 8


def _compiled(dynamics, h0, context, random_state, settings):
    """`(solve, draws, trainable, others)`: `_solve` for these settings
    compiled, as `solve(h0, noise, params, frozen)`, the dict it fills with
    `_solve`'s `draws` when it compiles, and the variables it reads from
    `params` and `frozen` (`_variables`, found at the first call).

    An eager call of `_solve` would compile TFP's loops at each call (their
    bodies are new functions each time). The compiled solve holds the
    dynamics by a weak reference, and no backward pass can reach it (none
    of its arguments is traced). Like Keras' compiled `predict`, it does
    not see later changes to the Python state that the dynamics read (an
    attribute, a name rebound to another layer). None if a setting cannot
    be a key."""
    key = (_hashable(settings),
           *(tuple(map(id, variables)) for variables in (
               dynamics.trainable_variables,
               dynamics.non_trainable_variables, random_state)))
    try:
        hash(key)
    except TypeError:
        return None
    cache = _COMPILED.setdefault(dynamics, collections.OrderedDict())
    if key not in cache:
        ref, draws = weakref.ref(dynamics), {}
        trainable, others = _variables(dynamics, h0, context,
                                       settings["time_dependent"],
                                       settings["training"])
        compiled = jax.jit(lambda h0, noise, params, frozen: _solve(
            ref(), trainable, others, random_state, draws,
            lambda num_evals: None, h0, noise, params, frozen,
            **settings))
        cache[key] = compiled, draws, trainable, others
        if len(cache) > _COMPILED_PER_DYNAMICS:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def _hashable(value):
    """`value` (dicts, lists and tuples of plain values) as a hashable."""
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(map(_hashable, value))
    return value


def _call(dynamics, t, h, context, mapping, draws, time_dependent,
          training):
    """The dynamics at `(t, h)` (and `context`), their variables read from
    `mapping`; returns the output and the `DrawCounter`."""
    kwargs = {"t": t} if time_dependent else {}
    with stored_dtypes():
        scope = DrawCounter(mapping, draws)
    # The layer's `__call__` (`stateless_call` runs its bare `call`): it
    # casts `h` and its weights to its own dtype policy, as on TensorFlow.
    with scope:
        return dynamics([h, *context] if context else h,
                        training=training, **kwargs), scope


def _solve(dynamics, trainable, others, random_state, draws,
           on_backward_evals, h0, noise, params, frozen, *, time_dependent,
           t0, times, forward, adjoint, gradient, seminorm, kinetic,
           jacobian, trace, training):
    """`solve`'s `(hs, integrals, counts)`, the dynamics' variables
    `trainable` and `others` read from `params` and `frozen`."""
    def dynamics_fn(t, h, params, frozen):
        context = params[len(trainable):]
        out, scope = _call(dynamics, t, h, context,
                           [*zip(trainable, params), *zip(others, frozen)],
                           draws, time_dependent, training)
        _solver.check_stateless(dynamics.name, scope, random_state)
        _solver.check_derivative(dynamics.name, out, h.shape)
        return out.astype(h.dtype)

    if _jax_compat.enabled():
        # On a CPU, so that XLA runs the convolutions of the dynamics and of
        # their gradients inside the solver's loops in its fast kernels.
        # The non-trainable weights are arguments, not closed over: the
        # rewrite's backward pass traces the dynamics again, where a jitted
        # step's tracers of them would leak.
        dynamics_fn = _jax_compat.canonical_convolutions(dynamics_fn)
    fn, y0, mask = _solver.augment(
        _TFP.tf, lambda t, h, params: dynamics_fn(t, h, params, frozen), h0,
        vjp=_vjp, kinetic=kinetic, jacobian=jacobian, trace=trace,
        noise=noise)
    if gradient == "backprop":
        ys, counts = _solver.integrate(
            _TFP, lambda t, y: fn(t, y, params), t0, times[-1], y0,
            error_mask=mask, save_at=times, bounded_loop=_bounded_while,
            **forward)
        ys = _on_backward(
            ys, _solver.differentiated_evals(counts[0], forward),
            on_backward_evals)
    else:
        ys, counts = _make_solve(
            fn, t0, times, forward, adjoint, mask, seminorm,
            on_backward_evals)(y0, params)
    return (*_solver.integrals_of(ys, mask), counts)


def records_gradient():
    """True: on JAX, `callbacks.LogEvaluationCounts` tells a train step
    from a test step itself (a traced call cannot tell whether it will be
    differentiated)."""
    return True


def in_loop(value, stored):
    """Whether the call in progress runs in a loop's body (an RNN cell's in
    `lax.scan`): `value`, which it computed, was traced inside the
    transformation that traced `stored`, a variable's value from outside
    the call, or `stored` is concrete (storing `value` in the variable
    would leak its tracer). Keras' symbolic build, which traces with
    concrete values into a scope of its own, is not a loop."""
    return (_jax_compat.traced_inside(value, stored)
            and not in_symbolic_build())


def _bounded_while(cond, body, state, max_iterations):
    """`body` while `cond`, at most `max_iterations` times, differentiable.

    A `lax.while_loop` cannot be reverse-differentiated; this loop is
    `max_iterations` iterations in nested scans of about
    `sqrt(max_iterations)` each (an iteration once `cond` fails does
    nothing), both levels checkpointed: the outer scan keeps the state at
    each inner scan's start, an inner scan's backward pass reruns it to keep
    the state at each iteration's start, and each iteration's backward pass
    reruns it. Memory: about `2 sqrt(max_iterations)` states and one
    iteration's intermediates, whatever the number of iterations taken;
    time: each iteration twice more. Diffrax's `RecursiveCheckpointAdjoint`
    bounds its loop in the same spirit (with more levels).
    """
    inner = math.isqrt(max_iterations - 1) + 1  # ceil(sqrt(max_iterations))
    outer = -(-max_iterations // inner)

    def guarded(step):
        step = jax.checkpoint(step)
        return lambda state, _: (
            jax.lax.cond(cond(state), step, lambda s: s, state), None)

    def segment(state):
        return jax.lax.scan(guarded(body), state, length=inner)[0]

    return jax.lax.scan(guarded(segment), state, length=outer)[0]


def _vjp(g, x):
    """`(g(x), pullback)`, as the TensorFlow backend's."""
    y, pullback = jax.vjp(g, x)
    return y, lambda v: pullback(v)[0]


def _raise_if_failed(counts, forward):
    """Eagerly, a failed solve raises with TensorFlow's message."""
    try:
        status = int(counts[3])
    except jax.errors.ConcretizationTypeError:
        return  # traced (under jit): no Python error can be raised
    message = _solver.status_message(status, forward["what"],
                                     forward.get("max_num_steps"))
    if message:
        raise RuntimeError(message)


def _on_backward(nest, num_evals, callback):
    """`nest` unchanged; the host gets `num_evals` when it is differentiated."""

    # `num_evals` is an argument, not a closure: a `custom_vjp` in a
    # loop's body (an RNN cell's in `scan`) cannot close over its tracers.
    @jax.custom_vjp
    def identity(x, num_evals):
        return x

    def fwd(x, num_evals):
        return x, num_evals

    def bwd(num_evals, cotangent):
        jax.debug.callback(callback, num_evals)
        return cotangent, jnp.zeros_like(num_evals)

    identity.defvjp(fwd, bwd)
    return identity(nest, jnp.asarray(num_evals, jnp.float32))


def _make_solve(fn, t0, times, forward, adjoint, state_mask, seminorm,
                on_backward_evals):
    """`(y0, params) -> (ys, counts)` with the adjoint as its gradient, as
    the TensorFlow backend's `odeint_adjoint` (`fn` takes `params`)."""

    @jax.custom_vjp
    def solve(y0, params):
        return _solver.integrate(
            _TFP, lambda t, y: fn(t, y, params), t0, times[-1], y0,
            error_mask=state_mask, save_at=times, **forward)

    def solve_fwd(y0, params):
        ys, counts = solve(y0, params)
        return (ys, counts), (ys, params)

    def solve_bwd(residuals, cotangents):
        ys, params = residuals
        dys = jax.tree.map(lambda d, y: d.astype(y.dtype), cotangents[0], ys)

        # The parameter gradients integrate in the state's dtype (float32
        # or float64), also for float16 weights under mixed precision or
        # float32 weights beside a float64 state.
        dtype = jax.tree.leaves(ys)[0].dtype
        g0 = [jnp.zeros(p.shape, dtype) for p in params]

        def adjoint_fn(t, state):
            y, a, _ = state
            f, vjp = jax.vjp(functools.partial(fn, t), y, params)
            dy, dparams = vjp(a)
            dparams = [-d.astype(g.dtype) for d, g in zip(dparams, g0)]
            return f, jax.tree.map(jnp.negative, dy), dparams

        state, num_evals = _solver.integrate_adjoint(
            _TFP, adjoint_fn, t0, times, ys, dys, g0, state_mask=state_mask,
            seminorm=seminorm, **adjoint)
        jax.debug.callback(on_backward_evals, num_evals)
        _, dy0, dparams = state
        return dy0, [d.astype(p.dtype) for d, p in zip(dparams, params)]

    solve.defvjp(solve_fwd, solve_bwd)
    return solve
