"""The TensorFlow engine of `NeuralODE`: TFP's Dormand-Prince and our adjoint.

This is the only module that imports TensorFlow Probability. It offers one
function, `odeint_adjoint`, which integrates `dy/dt = fn(t, y)` from `t0` to
`t1` and differentiates the result with the adjoint method.

What is ours and what is TFP's:

- Every step is taken by `tfp.math.ode.DormandPrince`. We hand it a
  prepared initial state (the first derivative and the first step size, the
  latter from Hairer's heuristic) so that no evaluation is wasted. Our
  subclass keeps TFP's step and changes three things around it: a step
  budget whose error says what to do, a budget that also ends the solve
  where XLA compiles assertions away, and an error norm restricted to chosen
  components (for the seminorm adjoint).
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
from tensorflow_probability.python.math.ode import runge_kutta_util as rk_util
from tensorflow_probability.python.math.ode import util as ode_util

_ORDER = dormand_prince.DormandPrince.ORDER
_EVALS_PER_STEP = dormand_prince.DormandPrince.ODE_FN_EVALS_PER_STEP


class _DormandPrince(dormand_prince.DormandPrince):
    """TFP's solver with a step budget and an error norm over chosen parts.

    `_step` is TFP's own step (its tableau, Runge-Kutta step, interpolation
    and step-size update, unchanged) with two differences: the step budget
    fails with a message that says what to do (TFP's own check says only
    "max_num_steps exceeded"), and the error ratio is taken over the state
    components where `error_mask` is True (all by default, which is TFP's
    norm exactly). The seminorm adjoint uses the mask to leave the parameter
    gradients out of the error control.
    """

    def __init__(self, *, max_num_steps, what, error_mask=None, **kwargs):
        super().__init__(max_num_steps=None, **kwargs)
        self._step_budget = max_num_steps
        self._what = what
        self._error_mask = error_mask

    def _step(self, solver_state, diagnostics, max_ode_fn_evals, ode_fn,
              atol, rtol, safety, ifactor, dfactor):
        del max_ode_fn_evals  # our budget replaces TFP's
        y0, f0, _, t0, dt, interpolation = solver_state
        within_budget = tf.debugging.assert_less(
            diagnostics.num_ode_fn_evaluations, self._max_evals(),
            message=(
                f"{self._what} did not finish within max_num_steps="
                f"{self._step_budget} Dormand-Prince steps (accepted and "
                "rejected). The dynamics are stiff, exploding or not finite "
                "for this input. Raise `max_num_steps`, loosen `rtol`/`atol`, "
                "lower the learning rate or regularise the dynamics."
            ),
        )
        with tf.control_dependencies([within_budget]):
            y1, f1, y1_error, k = rk_util.runge_kutta_step(
                ode_fn, y0, f0, t0, dt, dormand_prince._TABLEAU)
        error_ratio = self._error_ratio(y0, y1, y1_error, atol, rtol)
        accept = error_ratio <= 1
        new_interpolation = rk_util.rk_fourth_order_interpolation_coefficients(
            y0, y1, k, dt, dormand_prince._TABLEAU)
        solver_state = dormand_prince._RungeKuttaSolverInternalState(
            current_state=rk_util.nest_where(accept, y1, y0),
            current_derivative=rk_util.nest_where(accept, f1, f0),
            last_step_start=t0,
            # XLA drops assertions: there an exhausted budget ends the solve
            # (time jumps to infinity) and `integrate` returns NaN.
            current_time=tf.where(
                diagnostics.num_ode_fn_evaluations < self._max_evals(),
                tf.where(accept, t0 + dt, t0),
                tf.constant(float("inf"), t0.dtype)),
            step_size=ode_util.next_step_size(
                dt, self.ORDER, error_ratio, safety, dfactor, ifactor),
            interpolating_coefficients=rk_util.nest_where(
                accept, new_interpolation, interpolation),
        )
        diagnostics = diagnostics._replace(
            num_ode_fn_evaluations=diagnostics.num_ode_fn_evaluations
            + _EVALS_PER_STEP)
        return solver_state, diagnostics

    def _max_evals(self):
        return self._step_budget * _EVALS_PER_STEP

    def _error_ratio(self, y0, y1, error, atol, rtol):
        """TFP's error ratio, over the components that `error_mask` keeps."""
        parts = zip(*(tf.nest.flatten(x) for x in (y0, y1, error)))
        mask = (tf.nest.flatten(self._error_mask)
                if self._error_mask is not None else None)
        scaled = []
        for i, (a, b, e) in enumerate(parts):
            if mask is None or mask[i]:
                tol = atol + rtol * tf.maximum(tf.abs(a), tf.abs(b))
                scaled.append(tf.square(e) / tf.square(tol))
        return rk_util.nest_rms_norm(scaled)


def _rms_norm(nest):
    """Root mean square over every element of a nest (Hairer's norm)."""
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
              max_num_steps, what, error_mask=None):
    """Solves `dy/dt = fn(t, y)` from `t_start` to `t_end` (either order).

    Args:
        fn: `fn(t, y) -> dy/dt`, `y` any nest of floating tensors.
        t_start, t_end: Python floats, `t_start != t_end`.
        y0: the state at `t_start`.
        rtol, atol: Python floats, the tolerances.
        first_step_size: Python float or None for Hairer's heuristic.
        max_num_steps: the step budget.
        what: how error messages name this solve.
        error_mask: a nest of bools like `y0`: the components whose error
            the step-size control sees. Defaults to all.

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

    solver = _DormandPrince(rtol=rtol, atol=atol, max_num_steps=max_num_steps,
                            what=what, error_mask=error_mask)
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
    evals = results.diagnostics.num_ode_fn_evaluations
    finished = evals <= solver._max_evals()
    y1 = tf.nest.map_structure(
        lambda y: tf.where(finished, y[-1], tf.constant(float("nan"), y.dtype)),
        results.states)
    # TFP counts the evaluations of its steps only; ours came before them.
    num_evals = evals + setup_evals
    return y1, tf.cast(num_evals, tf.int32)


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
            mask = (True, True, [not seminorm] * len(params))
            (_, dy0, dparams), num_backward = integrate(
                adjoint_fn, t1, t0, state1, error_mask=mask, **adjoint_options
            )
            on_backward_evals(num_backward)
            by_ref = {p.ref(): g for p, g in zip(params, dparams)}
            return dy0, [by_ref.get(v.ref()) for v in variables]

        return (y1, num_evals), grad

    return solve(y0)
