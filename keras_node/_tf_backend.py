"""The TensorFlow backend of `NeuralODE`: the adjoint as a custom gradient."""

import tensorflow as tf
from tensorflow_probability.python.math.ode import dormand_prince

from keras_node import _solver


def solve(layer, h0):
    """`(h(t1), kinetic energy)` for `layer` (a `NeuralODE`) from `h0`.

    The kinetic energy is `None` unless the layer regularises it. Updates
    the layer's evaluation counters.
    """

    def dynamics(t, h):
        kwargs = {"t": t} if layer._time_dependent else {}
        return tf.cast(layer.dynamics(h, **kwargs), h.dtype)

    forward, adjoint = layer._solve_options()
    fn, y0, mask = _solver.augment(tf, dynamics, h0, layer.kinetic_energy)
    y1, num_forward = odeint_adjoint(
        fn, y0, layer.t0, layer.t1,
        forward_options=forward, adjoint_options=adjoint, state_mask=mask,
        seminorm=layer.adjoint_norm == "seminorm",
        on_backward_evals=lambda n: layer._backward_evals.assign(
            tf.cast(n, "float32")),
    )
    layer._forward_evals.assign(tf.cast(num_forward, "float32"))
    return y1 if layer.kinetic_energy else (y1, None)


def odeint_adjoint(fn, y0, t0, t1, *, forward_options, adjoint_options,
                   state_mask, seminorm, on_backward_evals):
    """`y(t1)` and the forward evaluation count; gradients by the adjoint.

    Gradients flow to `y0` and to every floating variable that `fn` reads.

    Args:
        fn: `fn(t, y) -> dy/dt` for a nest of tensors `y`.
        y0: the initial state, a nest of floating tensors.
        t0, t1: Python floats.
        forward_options, adjoint_options: keyword arguments of `integrate`
            (`rtol`, `atol`, `first_step_size`, `max_num_steps`, `what`)
            for the forward and the backward solve.
        state_mask: a nest of bools like `y0`, the components whose error
            controls the step size (those left out are integrals that feed
            back into nothing), or None for all.
        seminorm: if True, the backward solve's error control ignores the
            parameter-gradient components (Kidger, Chen & Lyons 2021, "Hey,
            that's not an ODE"): they are integrals that feed back into
            nothing, so their error need not limit the step size.
        on_backward_evals: called in the backward pass with the int32 count
            of evaluations of the adjoint system.

    Returns:
        `(y(t1), num_forward_evals)`.
    """
    if state_mask is None:
        state_mask = tf.nest.map_structure(lambda _: True, y0)

    @tf.custom_gradient
    def solve(*flat_y0):
        y0_ = tf.nest.pack_sequence_as(y0, flat_y0)
        y1, num_evals = _solver.integrate(
            dormand_prince, fn, t0, t1, y0_, error_mask=state_mask,
            **forward_options)
        flat_y1 = tf.nest.flatten(y1)

        def grad(*cotangents, variables=None):
            variables = list(variables or [])
            params = [v for v in variables if v.dtype.is_floating]
            dy1 = [tf.zeros_like(y) if dy is None else tf.cast(dy, y.dtype)
                   for y, dy in zip(flat_y1, cotangents)]

            def adjoint_fn(t, state):
                y, a, _ = state
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(y)
                    tape.watch(params)
                    f = fn(t, y)
                vjp = tape.gradient(
                    f, [y] + params, output_gradients=a,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                vjp = tf.nest.map_structure(tf.convert_to_tensor, vjp)
                return (f, tf.nest.map_structure(tf.negative, vjp[0]),
                        [-g for g in vjp[1:]])

            state1 = (y1, tf.nest.pack_sequence_as(y1, dy1),
                      [tf.zeros(p.shape, p.dtype) for p in params])
            mask = (state_mask, state_mask, [not seminorm] * len(params))
            (_, dy0, dparams), num_backward = _solver.integrate(
                dormand_prince, adjoint_fn, t1, t0, state1, error_mask=mask,
                **adjoint_options)
            on_backward_evals(num_backward)
            by_ref = {p.ref(): g for p, g in zip(params, dparams)}
            return tf.nest.flatten(dy0), [by_ref.get(v.ref())
                                          for v in variables]

        return (*flat_y1, num_evals), grad

    *flat_y1, num_evals = solve(*tf.nest.flatten(y0))
    return tf.nest.pack_sequence_as(y0, flat_y1), num_evals
