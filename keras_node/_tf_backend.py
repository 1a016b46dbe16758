"""The TensorFlow backend of `NeuralODE`: the adjoint as a custom gradient.

As on JAX, the dynamics' trainable weights are read once, before the
solve, and passed to it as inputs; the dynamics read them through a
`keras.StatelessScope`. The adjoint returns their gradients as those of
inputs; other variables that the dynamics read (another layer's, in a
`Lambda`) reach it as `tf.custom_gradient`'s `variables`. A custom gradient
that read the weights themselves could not run inside the gradient of a
loop (a `NeuralODE` with the adjoint inside the dynamics of one with
backprop): TensorFlow cannot carry the variable it captures there.
"""

import sys

import tensorflow as tf

from keras_node import _solver
from keras_node._keras_compat import DrawCounter, stored_dtypes
from keras_node._tf_compat import could_record, custom_gradient
from keras_node._tfp_compat import substrate

_TFP = substrate("tensorflow")


def solve(dynamics, h0, *, time_dependent, t0, times, forward, adjoint,
          gradient, seminorm, on_backward_evals, kinetic=False,
          jacobian=False, trace=None, noise=None, training=None,
          random_state=(), draws=None, context=()):
    """The states at `times` (stacked first) from `h0`, and the counts.

    Args:
        dynamics: the Keras layer computing `dh/dt`.
        h0: the initial state, float32 or float64.
        context: tensors of `h0`'s dtype, constant over the solve, that
            `dynamics` takes after the state (`dynamics([h, *context])`);
            their gradients come as the weights' do.
        time_dependent: whether `dynamics` takes the time as `t`.
        t0: the initial time; `times` the output times (Python floats).
        forward, adjoint: keyword arguments of `_solver.integrate` for the
            forward and the backward solve.
        gradient: `"adjoint"` or `"backprop"`.
        seminorm: whether the adjoint's error norm leaves out the parameter
            gradients.
        on_backward_evals: called in the backward pass with the number of
            evaluations it made.
        kinetic, jacobian, trace, noise: the integrals to solve beside the
            state, as `_solver.augment`'s arguments.
        training: the `training` argument of every call of `dynamics`,
            also in the backward pass (after the layer's call has ended).
        random_state: variables of the dynamics (their random layers'
            seeds) that every evaluation, forward and backward, reads as
            they are at the start, its updates of them dropped: random
            layers draw the same at each evaluation of the solve. Any
            other update, and any loss the dynamics add, is an error.
        draws: a dict that gets, for each `random_state` variable that an
            evaluation updates (by `id`), how many times it does.

    Returns:
        `(hs, integrals, counts)`: `hs` with a leading axis of the output
        times, `integrals` a dict of those asked for (`"divergence"`,
        `"kinetic"`, `"jacobian"`), each per example and accumulated up to
        each output time, `counts` the int32 vector of the forward solve's
        evaluations, accepted and rejected steps and status.
    """

    trainable = [v for v in dynamics.trainable_variables
                 if tf.as_dtype(v.dtype).is_floating]
    with stored_dtypes():
        start = [(v, tf.convert_to_tensor(v)) for v in random_state]
        params = [tf.convert_to_tensor(v) for v in trainable]
    params += context  # arguments of the solve, as the weights

    half = []  # whether the dynamics returned float16 (when traced)

    def fn(t, h, params):
        kwargs = {"t": t} if time_dependent else {}
        weights, inputs = params[:len(trainable)], params[len(trainable):]
        with stored_dtypes():  # the values as stored, not autocast
            scope = DrawCounter([*start, *zip(trainable, weights)], draws)
        with scope:
            f = dynamics([h, *inputs] if inputs else h, training=training,
                         **kwargs)
        half[:] = [f.dtype == tf.float16]
        _solver.check_stateless(dynamics.name, scope, random_state)
        _solver.check_derivative(dynamics.name, f, h.shape)
        if h.shape.is_fully_defined():
            return tf.cast(f, h.dtype)
        # An unknown batch size (a traced `fit` step): check it as it runs.
        same = tf.debugging.assert_equal(
            tf.shape(f), tf.shape(h), message=_solver.derivative_message(
                dynamics.name, "the shape of the state"))
        with tf.control_dependencies([same]):
            return tf.cast(f, h.dtype)

    on_backward_evals = _outside_loop_gradients(on_backward_evals)
    fn, y0, mask = _solver.augment(tf, fn, h0, vjp=_vjp, kinetic=kinetic,
                                   jacobian=jacobian, trace=trace,
                                   noise=noise)
    if gradient == "backprop":
        ys, counts = _solver.integrate(
            _TFP, lambda t, y: fn(t, y, params), t0, times[-1], y0,
            error_mask=mask, save_at=times, **forward)
        ys = _on_backward(ys, lambda: on_backward_evals(
            _solver.differentiated_evals(counts[0], forward)))
    else:
        ys, counts = odeint_adjoint(
            fn, y0, params, t0, times, forward_options=forward,
            adjoint_options=adjoint, state_mask=mask, seminorm=seminorm,
            on_backward_evals=on_backward_evals,
            # Under mixed_float16, Keras' LossScaleOptimizer raises its
            # scale until the gradients overflow, and then skips the step:
            # an overflowing backward solve must give inf or NaN, as
            # backprop does, not fail.
            backward_raises=lambda: not any(half))
    return (*_solver.integrals_of(ys, mask), counts)


def _vjp(g, x):
    """`(g(x), pullback)`, `pullback(v)` the vector-Jacobian product
    `v^T dg/dx` (callable several times; differentiable again)."""
    with tf.GradientTape(persistent=True,
                         watch_accessed_variables=False) as tape:
        tape.watch(x)
        y = g(x)
    return y, lambda v: tape.gradient(
        y, x, output_gradients=v,
        unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _warn_unless_finite(dy0, options):
    """Prints a warning when the gradient `dy0` of a backward solve that
    may not raise (`options` its `integrate` options) is not finite."""
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                            for g in tf.nest.flatten(dy0)])

    def warn():
        tf.print(
            f"WARNING: {options['what']} did not finish (it met inf or NaN, "
            "or took max_num_steps steps), so this step's gradients are "
            "NaN. Under mixed_float16 a loss-scale overflow does this, and "
            "LossScaleOptimizer skips the step; if it repeats at every "
            "step, raise max_num_steps or loosen the adjoint's tolerances.",
            output_stream=sys.stderr)
        return tf.constant(True)

    tf.cond(finite, lambda: tf.constant(False), warn)


records_gradient = could_record


def in_loop(value, stored):
    """Never: on TensorFlow a loop's body (an RNN cell's in `tf.while_loop`)
    may update variables and draw from seed generators. Only the loop's
    gradient may not (`_outside_loop_gradients`)."""
    del value, stored
    return False


def _outside_loop_gradients(callback):
    """`callback`, skipped in a `while_loop`'s gradient (an RNN cell's):
    there an update of a variable that the forward loop did not capture
    fails ("... is in list of internal_captures but not in
    internal_capture_to_output"), so the backward count is not recorded.
    Such a graph is told by that attribute (TensorFlow 2.21); a gradient
    taken inside a loop's body, as a custom training loop's, records it."""
    def record(num_evals):
        graph = tf.compat.v1.get_default_graph()
        if not hasattr(graph, "internal_capture_to_output"):
            callback(num_evals)

    return record


def _zeros_if_none(gradient, like):
    """`gradient` (a nest like `like`) with zeros for its None parts."""
    if gradient is None:
        return tf.nest.map_structure(tf.zeros_like, like)
    return tf.nest.map_structure(
        lambda g, x: tf.zeros_like(x) if g is None
        else tf.convert_to_tensor(g), gradient, like)


def _on_backward(nest, callback):
    """`nest` unchanged; `callback()` runs when its gradient is computed."""

    @custom_gradient
    def identity(*flat):
        def grad(*cotangents):
            callback()
            return list(cotangents)

        return list(flat), grad

    flat = tf.nest.flatten(nest)
    return tf.nest.pack_sequence_as(nest, identity(*flat))


def odeint_adjoint(fn, y0, params, t0, times, *, forward_options,
                   adjoint_options, state_mask, seminorm, on_backward_evals,
                   backward_raises=lambda: True):
    """`y` at `times` and the forward counts; adjoint gradients.

    Gradients flow to `y0`, to `params` and to every floating variable that
    `fn` reads. As torchdiffeq's `odeint_adjoint`, the backward pass solves
    the adjoint system from each output time back to the one before, adding
    that time's cotangent to the adjoint and restarting the state from the
    forward solution there.

    Args:
        fn: `fn(t, y, params) -> dy/dt` for a nest of tensors `y`.
        y0: the initial state, a nest of floating tensors.
        params: a list of floating tensors.
        t0: the initial time, a Python float.
        times: the output times, Python floats, strictly monotone away from
            `t0` (the first may be `t0`); the solve ends at the last.
        forward_options, adjoint_options: keyword arguments of `integrate`
            for the forward and the backward solve.
        state_mask: a nest of bools like `y0`, the components whose error
            controls the step size (those left out are integrals that feed
            back into nothing), or None for all.
        seminorm: if True, the backward solve's error control ignores the
            parameter-gradient components (see `integrate_adjoint`).
        on_backward_evals: called in the backward pass with the int32 count
            of evaluations of the adjoint system.
        backward_raises: called when the backward pass is built: whether a
            failed backward solve raises; if not, its gradients are NaN and
            it prints a warning.

    Returns:
        `(ys, counts)`, `ys` like `y0` with a new leading axis, one entry
        per output time, `counts` as `integrate`'s.
    """
    flat_y0 = tf.nest.flatten(y0)

    @custom_gradient
    def solve(*inputs):
        y0_ = tf.nest.pack_sequence_as(y0, inputs[:len(flat_y0)])
        values = list(inputs[len(flat_y0):])
        ys, counts = _solver.integrate(
            _TFP, lambda t, y: fn(t, y, values), t0, times[-1], y0_,
            error_mask=state_mask, save_at=times, **forward_options)
        flat_ys = tf.nest.flatten(ys)

        def grad(*cotangents, variables=None):
            variables = list(variables or [])
            read = [v for v in variables if v.dtype.is_floating]
            dys = tf.nest.pack_sequence_as(ys, [
                tf.zeros_like(y) if dy is None else tf.cast(dy, y.dtype)
                for y, dy in zip(flat_ys, cotangents)])

            used = []  # whether the dynamics read each of `values`

            def adjoint_fn(t, state):
                y, a, _ = state
                # Copies in this graph: the forward's tensors may already be
                # captured here, their uses unseen by the tape.
                local = [tf.identity(v) for v in values]
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch([y, local, read])
                    # A graph's gradient starts at the root name scope, where
                    # a layer's own (its name) may not start with "_".
                    with tf.name_scope("adjoint"):
                        f = fn(t, y, local)
                vjp = tape.gradient(f, [y, *local, *read],
                                    output_gradients=a)
                used[:] = [g is not None for g in vjp[1:len(local) + 1]]
                vjp = [_zeros_if_none(g, x)
                       for g, x in zip(vjp, [y, *local, *read])]
                # A state of unknown shape leaves the weights' gradients
                # without one, which TFP's loop would refuse.
                return (f, tf.nest.map_structure(tf.negative, vjp[0]),
                        [-tf.ensure_shape(tf.cast(g, dtype), p.shape)
                         for g, p in zip(vjp[1:], values + read)])

            # The parameter gradients integrate in the state's dtype: a
            # float64 state with float32 weights keeps them in float64.
            dtype = flat_ys[0].dtype
            raises = backward_raises()
            state, num_backward = _solver.integrate_adjoint(
                _TFP if raises else _TFP._replace(asserts=False),
                adjoint_fn, t0, times, ys, dys,
                # (A context's batch size may be known only as it runs.)
                [tf.zeros(p.shape if p.shape.is_fully_defined()
                          else tf.shape(p), dtype) for p in values + read],
                state_mask=state_mask, seminorm=seminorm, **adjoint_options)
            on_backward_evals(num_backward)
            _, dy0, dparams = state
            if not raises:
                _warn_unless_finite(dy0, adjoint_options)
            dparams = [tf.cast(g, p.dtype)
                       for p, g in zip(values + read, dparams)]
            by_ref = {v.ref(): g
                      for v, g in zip(read, dparams[len(values):])}
            # A weight that the dynamics do not read gets None, not 0 (which
            # an optimizer would apply, with weight decay or momentum).
            return ([*tf.nest.flatten(dy0), *(
                        g if u else None
                        for g, u in zip(dparams[:len(values)], used))],
                    [by_ref.get(v.ref()) for v in variables])

        return (*flat_ys, counts), grad

    *flat_ys, counts = solve(*flat_y0, *params)
    return tf.nest.pack_sequence_as(y0, flat_ys), counts
