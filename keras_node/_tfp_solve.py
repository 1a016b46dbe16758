"""The TensorFlow engine of `NeuralODE`: TFP's Dormand-Prince and our adjoint.

This is the only module that imports TensorFlow Probability. It offers one
function, `odeint_adjoint`, which integrates `dy/dt = fn(t, y)` from `t0` to
`t1` and differentiates the result with the adjoint method.

What is ours and what is TFP's:

- Every step is taken by `tfp.math.ode.DormandPrince`. We hand it a
  prepared initial state (the first derivative and the first step size, the
  latter from Hairer's heuristic) so that no evaluation is wasted, and we
  subclass it only to replace its `max_num_steps` assertion with one that
  says what went wrong and what to do.
- The gradient is our own `tf.custom_gradient`: the forward solve records
  nothing, and the backward pass integrates the adjoint system
  `(y, a, g)' = (f, -a^T df/dy, -a^T df/dtheta)` from `t1` back to `t0` with
  its own tolerances. Memory therefore stays constant in the number of steps,
  and the backward evaluations can be counted (TFP's own adjoint reports
  none).
- TFP integrates forward in time only; a solve towards smaller times runs in
  the reversed time `s = -t`.
"""

import tensorflow as tf
from tensorflow_probability.python.math.ode import dormand_prince

_ORDER = dormand_prince.DormandPrince.ORDER
_EVALS_PER_STEP = dormand_prince.DormandPrince.ODE_FN_EVALS_PER_STEP


class _DormandPrince(dormand_prince.DormandPrince):
    """TFP's solver with a step budget whose error says what to do."""

    def __init__(self, *, max_num_steps, what, **kwargs):
        # TFP's own `max_num_steps` check only says "max_num_steps exceeded".
        super().__init__(max_num_steps=None, **kwargs)
        self._step_budget = max_num_steps
        self._what = what

    def _step(self, solver_state, diagnostics, *args, **kwargs):
        within_budget = tf.debugging.assert_less(
            diagnostics.num_ode_fn_evaluations,
            self._step_budget * _EVALS_PER_STEP,
            message=(
                f"{self._what} did not finish within max_num_steps="
                f"{self._step_budget} Dormand-Prince steps (accepted and "
                "rejected). The dynamics are stiff, exploding or not finite "
                "for this input. Raise `max_num_steps`, loosen `rtol`/`atol`, "
                "lower the learning rate or regularise the dynamics."
            ),
        )
        with tf.control_dependencies([within_budget]):
            return super()._step(solver_state, diagnostics, *args, **kwargs)


def _rms_norm(nest):
    """Root mean square over every element of a nest, as TFP's error norm."""
    flat = [tf.reshape(x, [-1]) for x in tf.nest.flatten(nest)]
    squares = tf.add_n([tf.reduce_sum(tf.square(x)) for x in flat])
    size = tf.add_n([tf.cast(tf.size(x), squares.dtype) for x in flat])
    return tf.sqrt(squares / size)


def _initial_step_size(fn, t0, y0, f0, rtol, atol, max_step):
    """Hairer, Norsett & Wanner (1993), Solving ODEs I, Sec. II.4.

    The same heuristic as Hairer's DOPRI5 code, torchdiffeq and
    DifferentialEquations.jl. Costs one evaluation of `fn`.
    """
    dtype = t0.dtype
    scale = tf.nest.map_structure(lambda y: atol + rtol * tf.abs(y), y0)
    scaled = lambda nest: tf.nest.map_structure(tf.divide, nest, scale)
    d0 = _rms_norm(scaled(y0))
    d1 = _rms_norm(scaled(f0))
    h0 = tf.where(
        (d0 < 1e-5) | (d1 < 1e-5),
        tf.constant(1e-6, dtype),
        0.01 * d0 / tf.maximum(d1, tf.constant(1e-30, dtype)),
    )
    y1 = tf.nest.map_structure(lambda y, f: y + h0 * f, y0, f0)
    f1 = fn(t0 + h0, y1)
    diff = tf.nest.map_structure(tf.subtract, f1, f0)
    d2 = _rms_norm(scaled(diff)) / h0
    d12 = tf.maximum(d1, d2)
    h1 = tf.where(
        d12 <= 1e-15,
        tf.maximum(tf.constant(1e-6, dtype), h0 * 1e-3),
        (0.01 / tf.maximum(d12, tf.constant(1e-30, dtype))) ** (1.0 / (_ORDER)),
    )
    return tf.minimum(tf.minimum(100.0 * h0, h1), max_step)


def integrate(fn, t_start, t_end, y0, *, rtol, atol, first_step_size,
              max_num_steps, what):
    """Solves `dy/dt = fn(t, y)` from `t_start` to `t_end` (either order).

    Args:
        fn: `fn(t, y) -> dy/dt`, `y` any nest of floating tensors.
        t_start, t_end: Python floats, `t_start != t_end`.
        y0: the state at `t_start`.
        rtol, atol: Python floats, the tolerances.
        first_step_size: Python float or None for Hairer's heuristic.
        max_num_steps: the step budget.
        what: how error messages name this solve.

    Returns:
        `(y(t_end), num_evals)`: `num_evals` is an int32 scalar counting
        every evaluation of `fn`, including the first derivative and the
        initial step heuristic.
    """
    dtype = tf.nest.flatten(y0)[0].dtype
    sign = 1.0 if t_end > t_start else -1.0
    if sign > 0:
        fn_s = fn
    else:
        def fn_s(s, y):
            return tf.nest.map_structure(tf.negative, fn(-s, y))
    s0 = tf.constant(sign * t_start, dtype)
    s1 = tf.constant(sign * t_end, dtype)
    span = tf.constant(abs(t_end - t_start), dtype)

    f0 = fn_s(s0, y0)
    if first_step_size is None:
        step = _initial_step_size(fn_s, s0, y0, f0, rtol, atol, span)
        setup_evals = 2
    else:
        step = tf.minimum(tf.constant(first_step_size, dtype), span)
        setup_evals = 1

    solver = _DormandPrince(
        rtol=rtol, atol=atol, max_num_steps=max_num_steps, what=what
    )
    initial = dormand_prince._RungeKuttaSolverInternalState(
        current_state=y0,
        current_derivative=f0,
        last_step_start=s0,
        current_time=s0,
        step_size=step,
        interpolating_coefficients=[y0] * _ORDER,
    )
    # `_solve`, not `solve`: TFP's public entry wraps the solve in its own
    # adjoint, a custom gradient that we neither use nor want exported.
    results = solver._solve(
        fn_s, s0, y0, solution_times=tf.reshape(s1, [1]),
        previous_solver_internal_state=initial,
    )
    y1 = tf.nest.map_structure(lambda y: y[-1], results.states)
    # TFP counts the evaluations of its steps only; ours came before them.
    num_evals = results.diagnostics.num_ode_fn_evaluations + setup_evals
    return y1, tf.cast(num_evals, tf.int32)


def odeint_adjoint(fn, y0, t0, t1, *, forward_options, adjoint_options,
                   on_backward_evals):
    """`y(t1)` and the forward evaluation count; gradients by the adjoint.

    Gradients flow to `y0` and to every floating variable that `fn` reads.

    Args:
        fn: `fn(t, y) -> dy/dt` for a single tensor `y`.
        y0: the initial state, a floating tensor.
        t0, t1: Python floats.
        forward_options, adjoint_options: keyword arguments of `integrate`
            (`rtol`, `atol`, `first_step_size`, `max_num_steps`, `what`)
            for the forward and the backward solve.
        on_backward_evals: called in the backward pass with the int32 count
            of evaluations of the adjoint system.

    Returns:
        `(y(t1), num_forward_evals)`.
    """

    @tf.custom_gradient
    def solve(y0):
        y1, num_evals = integrate(fn, t0, t1, y0, **forward_options)

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
            (_, dy0, dparams), num_backward = integrate(
                adjoint_fn, t1, t0, state1, **adjoint_options
            )
            on_backward_evals(num_backward)
            by_ref = {p.ref(): g for p, g in zip(params, dparams)}
            return dy0, [by_ref.get(v.ref()) for v in variables]

        return (y1, num_evals), grad

    return solve(y0)
