"""The TensorFlow backend of `NeuralODE`: the adjoint as a custom gradient."""

import tensorflow as tf
from tensorflow_probability.python.math.ode import dormand_prince

from keras_node import _solver


def solve(layer, h0):
    """`h(t1)` for `layer` (a `NeuralODE`) from `h0`; updates its counters."""

    def dynamics(t, h):
        kwargs = {"t": t} if layer._time_dependent else {}
        return tf.cast(layer.dynamics(h, **kwargs), h.dtype)

    forward, adjoint = layer._solve_options()
    h1, num_forward = odeint_adjoint(
        dynamics, h0, layer.t0, layer.t1,
        forward_options=forward, adjoint_options=adjoint,
        seminorm=layer.adjoint_norm == "seminorm",
        on_backward_evals=lambda n: layer._backward_evals.assign(
            tf.cast(n, "float32")),
    )
    layer._forward_evals.assign(tf.cast(num_forward, "float32"))
    return h1


def odeint_adjoint(fn, y0, t0, t1, *, forward_options, adjoint_options,
                   seminorm, on_backward_evals):
    """`y(t1)` and the forward evaluation count; gradients by the adjoint.

    Gradients flow to `y0` and to every floating variable that `fn` reads.

    Args:
        fn: `fn(t, y) -> dy/dt` for a single tensor `y`.
        y0: the initial state, a floating tensor.
        t0, t1: Python floats.
        forward_options, adjoint_options: keyword arguments of `integrate`
            (`rtol`, `atol`, `first_step_size`, `max_num_steps`, `what`)
            for the forward and the backward solve.
        seminorm: if True, the backward solve's error control ignores the
            parameter-gradient components (Kidger, Chen & Lyons 2021, "Hey,
            that's not an ODE"): they are integrals that feed back into
            nothing, so their error need not limit the step size.
        on_backward_evals: called in the backward pass with the int32 count
            of evaluations of the adjoint system.

    Returns:
        `(y(t1), num_forward_evals)`.
    """

    @tf.custom_gradient
    def solve(y0):
        y1, num_evals = _solver.integrate(dormand_prince, fn, t0, t1, y0,
                                          **forward_options)

        def grad(dy1, *_, variables=None):
            variables = list(variables or [])
            params = [v for v in variables if v.dtype.is_floating]
            if dy1 is None:
                dy1 = tf.zeros_like(y1)

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
                vjp = [tf.convert_to_tensor(g) for g in vjp]
                return f, -vjp[0], [-g for g in vjp[1:]]

            state1 = (y1, tf.cast(dy1, y1.dtype),
                      [tf.zeros(p.shape, p.dtype) for p in params])
            mask = (True, True, [not seminorm] * len(params))
            (_, dy0, dparams), num_backward = _solver.integrate(
                dormand_prince, adjoint_fn, t1, t0, state1, error_mask=mask,
                **adjoint_options)
            on_backward_evals(num_backward)
            by_ref = {p.ref(): g for p, g in zip(params, dparams)}
            return dy0, [by_ref.get(v.ref()) for v in variables]

        return (y1, num_evals), grad

    return solve(y0)
