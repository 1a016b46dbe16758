"""Runge-Kutta solves for `NeuralODE`, on either TFP substrate.

Backend-neutral: every function takes `sub`, the `_tfp_compat.Substrate` of
the backend (TFP on TensorFlow, or TFP's JAX substrate), and computes with
its `tf` namespace. The adjoint, which needs each framework's autodiff,
lives in `_tf_backend` and `_jax_backend`; this module gives them
`integrate` (a forward solve) and `integrate_adjoint` (the backward pass
over the output times).

What is ours and what is TFP's:

- Adaptive solvers (`dopri5`, `tsit5`, `bosh3`) run in the loop of
  `tfp.math.ode.DormandPrince` (`_solve`: stepping to each output time,
  dense output by TFP's quartic interpolation; `_tfp_compat` holds every
  use of TFP's private API) with our step (`_AdaptiveStep`): the
  Runge-Kutta step of any first-same-as-last tableau, computed in the
  solve's dtype (TFP casts each coefficient through float32, which
  stops float64 solves at about 1e-8 relative accuracy), the error control
  of Hairer's DOPRI5, scipy and torchdiffeq (the RMS norm of the scaled
  error), and a step budget whose error says what to do. Dormand-Prince's
  tableau is TFP's own; Tsit5's and Bosh3's are below. Backprop on JAX,
  which cannot reverse TFP's unbounded loops, takes the same steps in one
  bounded loop of ours instead (`_bounded_solve`).
- Fixed-step solvers (`euler`, `midpoint`, `rk4`) are a loop of ours with a
  static number of steps (reverse-mode differentiable on both substrates).
- TFP integrates forward in time only; every solve runs in `s = |t -
  t_start|`, from 0 (a solve towards smaller times in reversed time).
"""

import collections
import functools
import math

import numpy as np

# A Butcher tableau: `nodes` c_2..c_s, `matrix` the rows of A below the
# diagonal, `weights` b, and for adaptive pairs `error` (b - b_hat) and `mid`
# (the weights of y(t + dt/2), for the dense output), `order` the order of
# a fixed-step method, or the higher order of an adaptive pair (the local
# error estimate's: the step-size control takes its reciprocal power).
Tableau = collections.namedtuple(
    "Tableau", ["nodes", "matrix", "weights", "error", "mid", "order"])


def _dopri5(sub):
    """Dormand-Prince 5(4): TFP's tableau (Shampine 1986), as Python floats."""
    nodes, matrix, weights, error, mid = sub.dopri5_tableau
    return Tableau(nodes=nodes, matrix=matrix, weights=weights, error=error,
                   mid=mid, order=5)


# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the
# first column simplifying assumption", Table 1; `mid` is his dense output
# (Sec. 4) at theta = 1/2.
_TSIT5_B = [0.09646076681806523, 0.01, 0.4798896504144996,
            1.379008574103742, -3.290069515436081, 2.324710524099774]
_TSIT5_B_HAT = [0.09468075576583945, 0.009183565540343254,
                0.4877705284247616, 1.234297566930479, -2.7077123499835256,
                1.866628418170587, 1 / 66]
_TSIT5 = Tableau(
    nodes=[0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0],
    matrix=[
        [0.161],
        [-0.008480655492356989, 0.335480655492357],
        [2.8971530571054935, -6.359448489975075, 4.3622954328695815],
        [5.325864828439257, -11.748883564062828, 7.4955393428898365,
         -0.09249506636175525],
        [5.86145544294642, -12.92096931784711, 8.159367898576159,
         -0.071584973281401, -0.028269050394068383],
        _TSIT5_B,
    ],
    weights=_TSIT5_B + [0.0],
    error=[b - b_hat for b, b_hat in zip(_TSIT5_B + [0.0], _TSIT5_B_HAT)],
    mid=[0.10741235230096871, 0.01135625, 0.39560903056045305,
         -0.34475214352593553, 1.3161853649581645, -1.0170608542936508,
         0.03125],
    order=5,
)


def _hermite_mid(weights):
    """`mid` of the cubic Hermite interpolant through a step's ends, `(y0 +
    y1)/2 + dt (f0 - f1)/8`, in a first-same-as-last tableau's stages (`f1`
    its last): TFP's quartic dense output is then that cubic."""
    mid = [w / 2 for w in weights]
    mid[0] += 1 / 8
    mid[-1] -= 1 / 8
    return mid


# Bogacki & Shampine (1989), the 3(2) pair of MATLAB's ode23, with the cubic
# Hermite dense output (as the one below).
_BOSH3 = Tableau(
    nodes=[1 / 2, 3 / 4, 1.0],
    matrix=[[1 / 2], [0.0, 3 / 4], [2 / 9, 1 / 3, 4 / 9]],
    weights=[2 / 9, 1 / 3, 4 / 9, 0.0],
    error=[2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8],
    mid=_hermite_mid([2 / 9, 1 / 3, 4 / 9, 0.0]),
    order=3,
)

# Heun's method with Euler's for its error, torchdiffeq's "adaptive_heun"
# (diffrax's `Heun`), written first same as last: the third stage is f at
# the solution.
_ADAPTIVE_HEUN = Tableau(
    nodes=[1.0, 1.0],
    matrix=[[1.0], [1 / 2, 1 / 2]],
    weights=[1 / 2, 1 / 2, 0.0],
    error=[1 / 2 - 1.0, 1 / 2, 0.0],
    mid=_hermite_mid([1 / 2, 1 / 2, 0.0]),
    order=2,
)

# Fixed-step methods: no error estimate, no dense output (their steps land
# on every output time).
_FIXED = {
    "euler": Tableau([], [], [1.0], None, None, 1),
    "midpoint": Tableau([1 / 2], [[1 / 2]], [0.0, 1.0], None, None, 2),
    "rk4": Tableau([1 / 2, 1 / 2, 1.0],
                   [[1 / 2], [0.0, 1 / 2], [0.0, 0.0, 1.0]],
                   [1 / 6, 1 / 3, 1 / 3, 1 / 6], None, None, 4),
}
ADAPTIVE = ("dopri5", "tsit5", "bosh3", "adaptive_heun")
FIXED = tuple(_FIXED)


def tableau(sub, method):
    """The tableau of `method`, one of `ADAPTIVE + FIXED`."""
    if method == "dopri5":
        return _dopri5(sub)
    return {"tsit5": _TSIT5, "bosh3": _BOSH3,
            "adaptive_heun": _ADAPTIVE_HEUN, **_FIXED}[method]


def check_derivative(name, f, state_shape, state=None):
    """Raises unless the dynamics `name`'s output `f` fits the state.

    `f` is what the dynamics returned (a tensor, or a symbolic one); shapes
    may hold None (unknown), which matches anything. `state` describes the
    state in the message (default: "the state <shape>").
    """
    shape = getattr(f, "shape", None)
    if shape is None or isinstance(f, (tuple, list, dict)):
        raise ValueError(
            "Received an invalid value for argument `dynamics`, expected a "
            "layer returning one tensor, the time derivative of the state. "
            f"Received: dynamics={name} returning {type(f).__name__}")
    shape, state_shape = tuple(shape), tuple(state_shape)
    if len(shape) != len(state_shape) or any(
            a is not None and b is not None and a != b
            for a, b in zip(shape, state_shape)):
        raise ValueError(derivative_message(
            name, state or f"the state {state_shape}",
            f"output shape {shape}"))


def check_stateless(name, scope, random_state):
    """Raises if the dynamics `name` changed state in `scope` (a
    `DrawCounter` around one evaluation): updated a variable other than
    their random layers' seeds (`random_state`), or added a loss."""
    seeds = {id(v) for v in random_state}
    changed = [v.path for v in scope.updated if id(v) not in seeds]
    if not changed and not scope.losses:
        return
    if any(path.endswith("seed_generator_state") for path in changed):
        advice = ("Draw random numbers with a keras.random.SeedGenerator "
                  "that a layer of the dynamics holds as an attribute (one "
                  "draw per solve), or with a fixed seed")
    elif changed:
        advice = ("Keep such layers out of the dynamics: to normalize "
                  "inside them, use GroupNormalization or "
                  "LayerNormalization (a BatchNormalization frozen with "
                  "trainable=False is fine)")
    else:
        advice = ("Regularise the outermost solve (kinetic_energy, "
                  "jacobian_norm) or the weights (kernel_regularizer)")
    what = (f"updates {', '.join(changed)}" if changed else
            "adds a loss (an activity_regularizer, add_loss, or a nested "
            "NeuralODE's regulariser)")
    raise ValueError(
        "Received an invalid value for argument `dynamics`, expected a "
        "layer that changes no state when called: a solve calls it many "
        "times, also backward in time. Received: dynamics="
        f"{name}, which {what}. {advice}.")


def derivative_message(name, expected, received=None):
    """The error of dynamics whose output does not fit the state."""
    return ("Received an invalid value for argument `dynamics`, expected a "
            "layer whose output (the time derivative) has the shape of its "
            f"input, {expected}. Received: dynamics={name}"
            + (f" with {received}" if received else ""))


def _combine(tf, y, dt, weights, ks):
    """`y + dt * sum(w * k)` over a nest, or `dt * sum(w * k)` if `y` is None.

    Each coefficient `dt * w` is a scalar in `dt`'s dtype (a float64 solve
    keeps float64 coefficients), so a term costs one product with a tensor
    and the sum one pass.
    """
    terms = [(dt * w, k) for w, k in zip(weights, ks) if w != 0]

    def component(*xs):
        y_, parts = (xs[0], xs[1:]) if y is not None else (None, xs)
        total = [c * x for (c, _), x in zip(terms, parts)]
        total = total if y_ is None else [y_, *total]
        return total[0] if len(total) == 1 else tf.add_n(total)

    nests = [k for _, k in terms]
    if y is not None:
        nests = [y] + nests
    return tf.nest.map_structure(component, *nests)


def _stages(tf, fn, t0, y0, f0, dt, tab):
    """The stage derivatives `k` of one step, `k[0] = f0`, and the last `y`."""
    k = [f0]
    y = y0
    for node, row in zip(tab.nodes, tab.matrix):
        y = _combine(tf, y0, dt, row, k)
        k.append(fn(t0 + node * dt, y))
    return k, y


def _dense_weights(tab):
    """TFP's dense output of a step, as weights of its stages.

    TFP interpolates a step by the quartic through `y0`, `y_mid` and `y1`
    with the slopes `f0` and `f1` at its ends, as coefficients `[a, b, c, d,
    e]` of `a x^4 + ... + e`, x in [0, 1]. In a first-same-as-last tableau's
    step `y1 = y0 + dt sum(weights * k)`, `y_mid = y0 + dt sum(mid * k)`,
    `f0 = k[0]` and `f1 = k[-1]`, so `e = y0` and each of `a` to `d` is `dt`
    times a fixed combination of the stages: one pass over them each.
    Returns those four combinations, lists of Python floats.
    """
    f0, f1 = np.eye(len(tab.mid))[[0, -1]]
    b, m = np.asarray(tab.weights), np.asarray(tab.mid)
    return [[float(x) for x in w] for w in (
        2 * (f1 - f0) - 8 * b + 16 * m,
        5 * f0 - 3 * f1 + 14 * b - 32 * m,
        f1 - 4 * f0 - 5 * b + 16 * m,
        f0)]


class _AdaptiveStep:
    """One step of an adaptive solve in TFP's loop, for any FSAL tableau.

    TFP's own step differs in six ways:

    - The stages, the solution, the error estimate and the dense output of
      the tableau `tab` are computed in the solve's dtype (TFP casts each
      coefficient through float32).
    - The step budget fails with a message that says what to do (TFP's own
      check says only "max_num_steps exceeded"), and where XLA or JAX cannot
      raise, ends the solve (the result is then NaN).
    - `STALL_STEPS` trial steps in a row that do not advance the time
      (rejected, or too short to change it: the steps shrink where the
      dynamics blow up or return NaN) end the solve, with a message that
      says when, instead of spending the rest of the budget there. scipy's
      and torchdiffeq's solvers stop at the first step too short to advance
      the time; a few such steps that succeed (as a float32 time far from 0
      may need) are no stall here: the solve goes on after them.
    - The error norm is the root mean square of the scaled error
      `e / (atol + rtol * max(|y0|, |y1|))`, as in Hairer's DOPRI5, scipy,
      torchdiffeq and DifferentialEquations.jl, so `rtol` and `atol` mean
      what they mean there. TFP's own ratio (despite its comment citing
      scipy) is the root mean square of the squared scaled errors, the
      square of an L4 norm: stricter than the RMS norm wherever the error is
      uneven over the state, which costs steps. Over a nest of tensors (the
      adjoint system) the norm is the largest of the components' norms where
      `error_mask` is True: torchdiffeq's mixed norm, and with the mask its
      seminorm.
    - The next step is `dt * clip(0.9 * norm^(-1/order), 0.1, 10)`, scipy's
      controller with a least factor of 0.1 (torchdiffeq's and diffrax's is
      0.2, and they never shrink a step after an accepted one), where TFP
      raises its squared ratio to the power -1/6. The step sizes are not
      differentiated (as in diffrax): backpropagation through the solve
      differentiates its arithmetic for the steps it took.
    - The dense output is computed only by the steps that TFP interpolates
      in (an accepted step that passes an output time); TFP's step computes
      it every time, and backpropagation then differentiates every one.
    - A step never ends more than a hair past the last output time
      (`_to_the_end`): the solution there is then a step's end, as in
      scipy and diffrax, not TFP's interpolation back from a step that
      went far past it (torchdiffeq interpolates so too). On a neural
      ODE's dynamics Dormand-Prince then takes the steps of scipy's RK45
      and ends on its solution (`benchmarks/work_precision.py`).

    Accepted steps are counted in the diagnostics' field
    `num_matrix_factorizations`, and the trial steps since the time last
    advanced in `num_jacobian_evaluations`, which an explicit method never
    uses.
    """

    def __init__(self, sub, *, tab, max_num_steps, what, error_mask, ok,
                 times, to_time=None):
        self._sub = sub
        self._to_time = to_time or (lambda s: s)  # for the messages
        self._ok = ok  # False: the start is not finite, take no step
        self._tab = tab
        self._dense = _dense_weights(tab)
        self.evals_per_step = len(tab.nodes)
        self._step_budget = max_num_steps
        self._what = what
        self._error_mask = error_mask
        self._times = times  # the output times, a vector

    @property
    def max_evals(self):
        return self._step_budget * self.evals_per_step

    # The step-size controller: safety factor, least and largest factor.
    SAFETY, DFACTOR, IFACTOR = 0.9, 0.1, 10.0
    # Trial steps in a row without advancing the time that end a solve.
    STALL_STEPS = 100

    def __call__(self, solver_state, diagnostics, ode_fn, atol, rtol):
        tf, where = self._sub.tf, self._sub.nest_where
        y0, f0, _, t0, dt, interpolation = solver_state
        # Times and step sizes are not differentiated. Stopped here, in the
        # loop's body, so that TensorFlow's gradient of the loop drops the
        # reductions of every term to a step-size gradient that nothing uses.
        t0, dt = tf.stop_gradient(t0), tf.stop_gradient(dt)
        idle = diagnostics.num_jacobian_evaluations
        going = idle < self.STALL_STEPS
        checks = [tf.debugging.assert_less(
            diagnostics.num_ode_fn_evaluations, self.max_evals,
            message=budget_message(self._what, self._step_budget),
        ), self._assert_going(tf, going, t0)] if self._sub.asserts else []
        with tf.control_dependencies(checks):  # eagerly None, and raised
            k, y1 = _stages(tf, ode_fn, t0, y0, f0, dt, self._tab)
        f1 = k[-1]
        error = _combine(tf, None, dt, self._tab.error, k)
        error_ratio = tf.stop_gradient(
            self._error_ratio(tf, y0, y1, error, atol, rtol))
        # A trial step into overflow (inf or NaN) is rejected and the step
        # cut tenfold, instead of a NaN step size stalling the solve.
        error_ratio = tf.where(tf.math.is_finite(error_ratio), error_ratio,
                               tf.constant(float("inf"), dt.dtype))
        running = ((diagnostics.num_ode_fn_evaluations < self.max_evals)
                   & self._ok & going)
        accept = (error_ratio <= 1) & running
        # TFP interpolates each output time in the last step taken, so only
        # an accepted step that passes one needs its dense output.
        passes = tf.reduce_any((self._times >= t0) & (self._times < t0 + dt))
        new_interpolation = tf.cond(
            accept & passes, lambda: self._dense_output(tf, y0, dt, k),
            lambda: interpolation)
        t1 = tf.where(accept, t0 + dt, t0)
        # A zero error gives an infinite factor, clipped to IFACTOR.
        next_dt = dt * tf.clip_by_value(
            self.SAFETY * error_ratio ** (-1.0 / self._tab.order),
            self.DFACTOR, self.IFACTOR)
        solver_state = self._sub.state(
            current_state=where(accept, y1, y0),
            current_derivative=where(accept, f1, f0),
            last_step_start=t0,
            # An exhausted budget or a stall ends the solve (time jumps to
            # infinity) and `integrate` returns NaN.
            current_time=tf.where(running, t1,
                                  tf.constant(float("inf"), t0.dtype)),
            step_size=self._to_the_end(tf, t1, next_dt),
            interpolating_coefficients=new_interpolation,
        )
        diagnostics = diagnostics._replace(
            num_ode_fn_evaluations=diagnostics.num_ode_fn_evaluations
            + self.evals_per_step,
            num_matrix_factorizations=(diagnostics.num_matrix_factorizations
                                       + tf.cast(accept, tf.int32)),
            num_jacobian_evaluations=tf.where(accept & (t0 + dt > t0),
                                              tf.zeros_like(idle), idle + 1),
        )
        return solver_state, diagnostics

    def _to_the_end(self, tf, t, dt):
        """`dt`, cut so that a step from `t` ends at most a hair past the
        last output time: the solution there is then the step's end, not
        TFP's interpolation back from far past it (scipy and diffrax end
        on it). (A step that the rounding lands on the time itself does not
        pass it; the next one, uncut, does, and gives the state there.)"""
        remaining = self._times[-1] - t
        return tf.where(remaining > 0,
                        tf.minimum(dt, remaining * (1 + 2.0**-10)), dt)

    def _assert_going(self, tf, going, t0):
        """Fails (on TensorFlow) where the solve stalled, with the time in
        the message."""
        fine = tf.logical_or(going, tf.logical_not(self._ok))
        if not tf.executing_eagerly():  # XLA drops it
            return tf.debugging.Assert(
                fine, [stall_message(self._what, ""), self._to_time(t0)])
        if not fine:  # a plain message, not Assert's summary of its data
            raise tf.errors.InvalidArgumentError(None, None, stall_message(
                self._what, str(self._to_time(t0).numpy())))
        return None

    def _dense_output(self, tf, y0, dt, k):
        """TFP's quartic of the step: a list of five nests like `y0`."""
        def coefficient(weights):
            if any(weights):
                return _combine(tf, None, dt, weights, k)
            return tf.nest.map_structure(tf.zeros_like, y0)  # bosh3's cubic

        return [coefficient(w) for w in self._dense] + [y0]

    def _error_ratio(self, tf, y0, y1, error, atol, rtol):
        """The RMS scaled error, the largest over the kept components.

        For the adjoint system this is torchdiffeq's mixed norm: the state,
        the adjoint and every parameter gradient each count as much as the
        others, however few elements they have.
        """
        scaled = tf.nest.map_structure(
            lambda a, b, e: e / (atol + rtol * tf.maximum(tf.abs(a),
                                                          tf.abs(b))),
            y0, y1, error)
        return _norm(tf, scaled, _mask(tf, self._error_mask, y0))


(OK, EXHAUSTED, NONFINITE_STATE, NONFINITE_DERIVATIVE, NONFINITE_SOLUTION,
 STALLED) = range(6)


def nonfinite_message(what, which):
    """The error of a solve that meets NaN or inf."""
    # No apostrophes: graph-mode assertions print them escaped.
    return (f"{what}: {which} holds NaN or inf. Check the inputs and the "
            "layers before the NeuralODE, and the weights of the dynamics (a "
            "diverged training run, a learning rate too high).")


def status_message(status, what, max_num_steps):
    """The error for a solve's status, None when it finished."""
    return {EXHAUSTED: lambda: budget_message(what, max_num_steps),
            NONFINITE_STATE: lambda: nonfinite_message(
                what, "the initial state"),
            NONFINITE_DERIVATIVE: lambda: nonfinite_message(
                what, "the first derivative (the output of the dynamics)"),
            NONFINITE_SOLUTION: lambda: nonfinite_message(
                what, "the fixed-step solution (the dynamics returned NaN or "
                "inf, or the steps are too long for them)"),
            STALLED: lambda: stall_message(what),
            }.get(status, lambda: None)()


def _check_finite(sub, nest, what, which, after=None):
    """Whether every element of `nest` is finite; raises if not, on
    TensorFlow outside XLA (which drops assertions). On JAX the status
    reports it (the backend raises after an eager solve)."""
    tf = sub.tf
    finite = functools.reduce(tf.logical_and, [
        tf.reduce_all(tf.math.is_finite(x)) for x in tf.nest.flatten(nest)])
    if after is not None:
        finite = finite | ~after  # reported by the earlier check
    if not sub.asserts:
        return finite
    check = tf.debugging.assert_equal(
        finite, True, message=nonfinite_message(what, which))
    with tf.control_dependencies([check] if check is not None else []):
        return tf.identity(finite)


def budget_message(what, max_num_steps):
    """The error of a solve that ran out of steps."""
    return (f"{what} did not finish within max_num_steps={max_num_steps} "
            "steps (accepted and rejected). The dynamics are stiff, exploding "
            "or not finite for this input. Raise `max_num_steps`, loosen "
            "`rtol`/`atol`, use a fixed-step solver, lower the learning rate "
            "or regularise the dynamics.")


def stall_message(what, time=None):
    """The error of a solve whose steps no longer advance the time; the
    time reached ends it, if known (`""` when a graph prints it after)."""
    # No apostrophes: graph-mode assertions print them escaped.
    return (f"{what} stalled: {_AdaptiveStep.STALL_STEPS} steps in a row did "
            "not advance the time (rejected, or too short to change it), as "
            "where the dynamics blow up or return NaN or inf, or where a "
            "float32 time is too large for the steps that the tolerances "
            "need. Check the inputs and the weights of the dynamics (a "
            "diverged training run, a learning rate too high), bound or "
            "regularise the dynamics, shorten the time span, solve in "
            "float64, or use a fixed-step solver."
            + ("" if time is None else f" Time reached: t={time}"))


def _mask(tf, error_mask, nest):
    """`error_mask` flattened like `nest`; all True when it is None."""
    if error_mask is None:
        return [True] * len(tf.nest.flatten(nest))
    return tf.nest.flatten(error_mask)


def _rms(tf, x):
    """Root mean square of `x`; 0 for an empty tensor (a state of size 0)."""
    size = tf.cast(tf.maximum(tf.size(x), 1), x.dtype)
    return tf.sqrt(tf.reduce_sum(tf.square(x)) / size)


def _norm(tf, nest, mask):
    """The largest root mean square over the components that `mask` keeps."""
    return functools.reduce(tf.maximum, [
        _rms(tf, x) for keep, x in zip(mask, tf.nest.flatten(nest)) if keep])


def _initial_step_size(tf, fn, t0, y0, f0, rtol, atol, max_step, mask,
                       order):
    """Hairer, Norsett & Wanner (1993), Solving ODEs I, Sec. II.4.

    The same heuristic as Hairer's DOPRI5 code, torchdiffeq and
    DifferentialEquations.jl, in the solve's own norm. Costs one evaluation
    of `fn`. Not differentiated.
    """
    dtype = t0.dtype
    norm = functools.partial(_norm, tf, mask=mask)
    scale = tf.nest.map_structure(lambda y: atol + rtol * tf.abs(y), y0)
    scaled = lambda nest: tf.nest.map_structure(tf.divide, nest, scale)
    d0 = norm(scaled(y0))
    d1 = norm(scaled(f0))
    h0 = tf.where(
        (d0 < 1e-5) | (d1 < 1e-5),
        tf.constant(1e-6, dtype),
        0.01 * d0 / tf.maximum(d1, tf.constant(1e-30, dtype)),
    )
    y1 = tf.nest.map_structure(lambda y, f: y + h0 * f, y0, f0)
    f1 = fn(t0 + h0, y1)
    diff = tf.nest.map_structure(tf.subtract, f1, f0)
    d2 = norm(scaled(diff)) / h0
    d12 = tf.maximum(d1, d2)
    h1 = tf.where(
        d12 <= 1e-15,
        tf.maximum(tf.constant(1e-6, dtype), h0 * 1e-3),
        (0.01 / tf.maximum(d12, tf.constant(1e-30, dtype))) ** (1.0 / order),
    )
    return tf.stop_gradient(tf.minimum(tf.minimum(100.0 * h0, h1), max_step))


INTEGRALS = ("divergence", "kinetic", "jacobian")


def augment(tf, fn, y0, *, vjp=None, kinetic=False, jacobian=False,
            trace=None, noise=None):
    """`(fn, y0, error_mask)` of the solve, with the integrals asked for.

    With none asked, `fn` and `y0` unchanged and no mask. Else the state is
    `(y, extra)`, `extra` a dict of per-example integrals (shape
    `(batch,)`, zero at the start; the derivative's Jacobian `J = df/dy`
    is taken per example):

    - `"divergence"` (`trace` `"exact"` or `"hutchinson"`): the integral of
      `trace(J)`, exact (one vector-Jacobian product per state element) or
      Hutchinson's estimate `noise^T J noise`. A continuous normalizing
      flow's change of log-density is minus this integral.
    - `"kinetic"` (`kinetic`): of `|f|^2`, Finlay et al.'s (2020) kinetic
      energy.
    - `"jacobian"` (`jacobian`): of `|noise^T J|^2`, Hutchinson's estimate of
      the squared Frobenius norm of `J` (Finlay et al.'s other regulariser).

    `noise` (like `y0`, needed by the estimates) rides in `extra["noise"]`
    with derivative zero, so that it is constant over the solve and passes
    every backend's gradient machinery as state. `vjp(g, x)` is the
    backend's `(g(x), pullback)`. Only `y` and the divergence control the
    step size: the regularisers feed back into nothing and add no steps.
    Extra arguments of `fn` (JAX's weights) pass through.
    """
    names = [name for name, on in zip(INTEGRALS, (trace, kinetic, jacobian))
             if on]
    if not names:
        return fn, y0, None
    axes = list(range(1, len(y0.shape)))
    zero = tf.zeros_like(tf.reduce_sum(y0, axis=axes))
    extra = {name: zero for name in names}
    mask = {name: name == "divergence" for name in names}
    if noise is not None:
        extra["noise"], mask["noise"] = noise, False
    probed = jacobian or trace == "hutchinson"

    def augmented(t, state, *args):
        y, extra = state
        out = {}
        if trace or jacobian:
            f, pullback = vjp(lambda x: fn(t, x, *args), y)
        else:
            f = fn(t, y, *args)
        if probed:
            probe = pullback(extra["noise"])  # noise^T J, per example
            out["noise"] = tf.zeros_like(extra["noise"])
        if trace == "hutchinson":
            out["divergence"] = tf.reduce_sum(probe * extra["noise"],
                                              axis=axes)
        elif trace == "exact":
            out["divergence"] = _exact_trace(tf, pullback, y)
        if kinetic:
            out["kinetic"] = tf.reduce_sum(tf.square(f), axis=axes)
        if jacobian:
            out["jacobian"] = tf.reduce_sum(tf.square(probe), axis=axes)
        return f, out

    return augmented, (y0, extra), (True, mask)


def integrals_of(ys, error_mask):
    """`(hs, integrals)` of a solution of `augment`'s state (its error
    mask tells): the states and the dict of integrals, without the noise."""
    if error_mask is None:
        return ys, {}
    hs, extra = ys
    return hs, {k: v for k, v in extra.items() if k != "noise"}


def _exact_trace(tf, pullback, y):
    """`trace(dg/dy)` per example from `pullback`, one product per element of
    an example's state (its rows of the Jacobian, one at a time)."""
    size = math.prod(y.shape[1:])
    flat = lambda x: tf.reshape(x, [-1, size])
    trace = tf.zeros_like(tf.reduce_sum(flat(y), axis=1))
    for i in range(size):
        unit = tf.reshape(tf.one_hot(i, size, dtype=y.dtype), y.shape[1:])
        trace += flat(pullback(tf.zeros_like(y) + unit))[:, i]
    return trace


def fixed_grid(t_start, times, num_steps=None, step_size=None):
    """The steps of a fixed-step solve: `[(start, end, n), ...]` per interval.

    Every output time is a step boundary: each interval between `t_start`
    and the output times is split into the fewest equal steps no longer than
    `step_size` (with `num_steps`, `step_size` is the whole span divided by
    it, so a solve to one time takes exactly `num_steps` steps).
    """
    if step_size is None:
        step_size = abs(times[-1] - t_start) / num_steps
    grid = []
    for start, end in zip([t_start, *times[:-1]], times):
        if start != end:
            steps = max(1, math.ceil(abs(end - start) / step_size - 1e-9))
            grid.append((start, end, steps))
    return grid


def integrate(sub, fn, t_start, t_end, y0, *, method, what, rtol=None,
              atol=None, first_step_size=None, max_num_steps=None,
              num_steps=None, step_size=None, unroll=False, error_mask=None,
              save_at=None, direction=None, span=None, bounded_loop=None):
    """Solves `dy/dt = fn(t, y)` from `t_start` to `t_end` (either order).

    Args:
        sub: the backend's `_tfp_compat.Substrate`.
        fn: `fn(t, y) -> dy/dt`, `y` any nest of floating tensors.
        t_start, t_end: Python floats, `t_start != t_end`; or (a solve
            inside a loop) `t_start` a scalar tensor of the state's dtype,
            `t_end` None, `direction` the sign of `t_end - t_start` (1.0 or
            -1.0), `span` the tensor `|t_end - t_start|` (computed from the
            Python times: the difference of two rounded times can be far
            off, or 0), no `save_at`, and for a fixed-step method
            `num_steps` (an int32 tensor allowed): its loop then runs a
            number of times known only when it runs, which reverse mode
            cannot differentiate on JAX.
        y0: the state at `t_start`.
        method: one of `ADAPTIVE` or `FIXED`.
        what: how error messages name this solve.
        rtol, atol, first_step_size, max_num_steps: adaptive methods'
            options (Python numbers; `first_step_size` None for Hairer's
            heuristic).
        num_steps, step_size: fixed-step methods' options, one of them set.
        unroll: a fixed-step method's steps laid out without a loop (with
            Python floats for the times only).
        error_mask: a nest of bools like `y0`: the components whose error
            the step-size control sees. Defaults to all.
        save_at: None, or Python floats from `t_start` towards `t_end`,
            strictly monotone, the last `t_end`: the times whose states to
            return.
        bounded_loop: None, or for an adaptive method a function
            `bounded_loop(cond, body, state, max_iterations)` that runs
            `body` while `cond` holds, at most `max_iterations` times, in a
            loop that reverse mode can differentiate (`_bounded_solve`).
            None: TFP's loop.

    Returns:
        `(y(t_end), counts)`, or with `save_at` `(ys, counts)`, `ys` the
        states at those times stacked on a new leading axis. `counts` is an
        int32 vector: evaluations of `fn` (including the first derivative
        and the initial step heuristic), accepted steps, rejected steps and
        the status (`OK`, `EXHAUSTED`, `NONFINITE_STATE`,
        `NONFINITE_DERIVATIVE`, `NONFINITE_SOLUTION`, `STALLED`). On TensorFlow
        outside XLA a failed solve raises; elsewhere its states are NaN and
        the status says why.
    """
    tf = sub.tf
    # The solve runs in s = |t - t_start|, from 0: a float32 state then
    # integrates as accurately at t_start = 1e8 as at 0 (in t itself, float32
    # would round every step of such a solve). The dynamics get t.
    sign = direction or (1.0 if t_end > t_start else -1.0)

    def fn_s(s, y):
        f = fn(t_start + sign * s, y)
        return f if sign > 0 else tf.nest.map_structure(tf.negative, f)

    times = ([span] if span is not None else
             [sign * (t - t_start) for t in
              ([t_end] if save_at is None else save_at)])
    ok = _check_finite(sub, y0, what, "the initial state")
    if method in _FIXED:
        ys, counts = _integrate_fixed(tf, fn_s, 0.0, times, y0,
                                      _FIXED[method], num_steps, step_size,
                                      unroll)
        solved = _check_finite(
            sub, ys, what, "the fixed-step solution (the dynamics returned "
            "NaN or inf, or the steps are too long for them)", after=ok)
        status = tf.where(ok, tf.where(solved, OK, NONFINITE_SOLUTION),
                          NONFINITE_STATE)
    else:
        ys, counts, status = _integrate_adaptive(
            sub, fn_s, 0.0, times, y0, tableau(sub, method), rtol=rtol,
            atol=atol, first_step_size=first_step_size,
            max_num_steps=max_num_steps, what=what, error_mask=error_mask,
            ok=ok, bounded_loop=bounded_loop,
            to_time=lambda s: t_start + sign * s)
    counts = tf.concat([counts, tf.reshape(tf.cast(status, tf.int32), [1])],
                       axis=0)
    if save_at is None:
        ys = tf.nest.map_structure(lambda y: y[-1], ys)
    return ys, counts


def differentiated_evals(evals, options):
    """Of the `evals` of a forward solve with `options` (`integrate`'s
    keyword arguments), those that backprop differentiates: all but the
    initial step heuristic's, as step sizes are not differentiated."""
    heuristic = (options["method"] in ADAPTIVE
                 and options.get("first_step_size") is None)
    return evals - 1 if heuristic else evals


def _vector(tf, values, dtype):
    """`values` as a vector of `dtype`: Python numbers as one constant (on
    JAX's substrate a list becomes an operation per element). In `dtype`
    from the start: JAX without float64 warns of a float64 constant."""
    if all(isinstance(v, (int, float)) for v in values):
        return tf.constant(np.asarray(values), dtype)
    return tf.convert_to_tensor(values, dtype)


def _integrate_fixed(tf, fn, s0, times, y0, tab, num_steps, step_size,
                     unroll=False):
    """A fixed-step solve in increasing time `s`; states at `times`.

    With Python floats the number of steps is static; a tensor span (one
    output time) takes `num_steps` steps, a tensor or an int. Several output
    times are one loop over the intervals between them (a program that does
    not grow with their number), each interval an inner loop of its own
    number of steps. Reverse mode on JAX records that inner loop at its
    longest interval's length for every interval: unevenly spaced output
    times cost backprop memory for `intervals x longest` steps, not for the
    steps taken. With `unroll` and a static number of steps, every step is
    laid out in the program, without loops.
    """
    dtype = tf.nest.flatten(y0)[0].dtype
    static = isinstance(times[-1], (int, float))
    grid = (fixed_grid(s0, times, num_steps, step_size) if static
            else [(s0, times[-1], num_steps)])
    most = max(n for _, _, n in grid) if static else None

    def step(t, dt, y):
        # Not differentiated (as the adaptive step's, which says why).
        t, dt = tf.stop_gradient(t), tf.stop_gradient(dt)
        k, _ = _stages(tf, fn, t, y, fn(t, y), dt, tab)
        return _combine(tf, y, dt, tab.weights, k)

    def solve(y, start, dt, steps):
        return tf.while_loop(
            lambda i, y: i < steps,
            lambda i, y: (i + 1, step(start + tf.cast(i, dtype) * dt, dt, y)),
            (tf.constant(0, tf.int32), y), maximum_iterations=most)[1]

    if unroll and static:
        y, outputs = y0, []
        for start, end, steps in grid:
            dt = (end - start) / steps
            for i in range(steps):
                y = step(tf.constant(start + i * dt, dtype),
                         tf.constant(dt, dtype), y)
            outputs.append(y)
        ys = tf.nest.map_structure(lambda *ys: tf.stack(ys), *outputs)
    elif len(grid) == 1:
        (start, end, steps), = grid
        start_ = tf.convert_to_tensor(start, dtype)
        dt = (tf.constant((end - start) / steps, dtype) if static else
              (end - start_) / tf.cast(steps, dtype))
        ys = tf.nest.map_structure(lambda y: y[None],
                                   solve(y0, start_, dt, steps))
    else:
        ys = tf.scan(lambda y, interval: solve(y, *interval), (
            _vector(tf, [s for s, _, _ in grid], dtype),
            _vector(tf, [(e - s) / n for s, e, n in grid], dtype),
            _vector(tf, [n for _, _, n in grid], tf.int32)), initializer=y0)
    if static and times[0] == s0:
        ys = tf.nest.map_structure(
            lambda y, y0: tf.concat([y0[None], y], axis=0), ys, y0)
    total = tf.cast(sum(n for _, _, n in grid), tf.int32)
    evals = total * (len(tab.nodes) + 1)
    return ys, tf.stack([evals, total, tf.constant(0, tf.int32)])


def _integrate_adaptive(sub, fn, s0, times, y0, tab, *, rtol, atol,
                        first_step_size, max_num_steps, what, error_mask, ok,
                        bounded_loop, to_time):
    """An adaptive solve in increasing time `s`; states at `times`.

    `ok` is False when the initial state is not finite: the solve then ends
    at once. Returns `(ys, counts, status)`.
    """
    tf = sub.tf
    dtype = tf.nest.flatten(y0)[0].dtype
    s0_ = tf.convert_to_tensor(s0, dtype)
    span = tf.convert_to_tensor(times[-1], dtype) - s0_
    f0 = fn(s0_, y0)
    f0_ok = _check_finite(
        sub, f0, what, "the first derivative (the output of the dynamics)",
        after=ok)
    ok = ok & f0_ok
    if first_step_size is None:
        step_size = _initial_step_size(tf, fn, s0_, y0, f0, rtol, atol,
                                       span, _mask(tf, error_mask, y0),
                                       tab.order)
        setup_evals = 2
    else:
        step_size = tf.constant(first_step_size, dtype)
        setup_evals = 1
    # A first step that reaches the last output time ends a hair past it:
    # TFP steps on until a step passes the time, and one that ends on it
    # does not, so it would cost a second step.
    step_size = tf.where(step_size >= span, span * (1 + 2.0**-10), step_size)

    times = _vector(tf, times, dtype)
    step = _AdaptiveStep(sub, tab=tab, max_num_steps=max_num_steps,
                         what=what, error_mask=error_mask, ok=ok, times=times,
                         to_time=to_time)
    initial = sub.state(
        current_state=y0,
        current_derivative=f0,
        last_step_start=s0_,
        current_time=s0_,
        step_size=step_size,
        interpolating_coefficients=[y0] * 5,
    )
    # rtol and atol as tensors of the solve's dtype: TFP would round them to
    # float32.
    rtol, atol = tf.constant(rtol, dtype), tf.constant(atol, dtype)
    if bounded_loop is None:
        results = sub.solve(step, fn, s0_, y0, times, initial, rtol=rtol,
                            atol=atol)
        states, diagnostics, last = (results.states, results.diagnostics,
                                     results.solver_internal_state)
    else:
        states, diagnostics, last = _bounded_solve(
            tf, bounded_loop, step, fn, times, initial, rtol=rtol, atol=atol,
            max_num_steps=max_num_steps)
    evals = diagnostics.num_ode_fn_evaluations
    in_budget = evals <= step.max_evals
    # Within the budget, only a stall sends the time to infinity.
    stalled = in_budget & ok & tf.math.is_inf(last.current_time)
    finished = in_budget & ok & ~stalled
    status = tf.where(
        ok, tf.where(finished, OK, tf.where(stalled, STALLED, EXHAUSTED)),
        tf.where(f0_ok, NONFINITE_STATE, NONFINITE_DERIVATIVE))
    # A failed solve's states are NaN, and so are their gradients (with
    # backprop a `where` would give zeros, as if the loss were flat).
    ys = tf.nest.map_structure(
        lambda y: y * tf.where(finished, tf.constant(1.0, y.dtype),
                               tf.constant(float("nan"), y.dtype)),
        states)
    # An exhausted budget's last trial step (evaluated where no assertion
    # stops it) is not a step.
    steps = tf.minimum(evals // step.evals_per_step, max_num_steps)
    accepted = tf.cast(diagnostics.num_matrix_factorizations, tf.int32)
    # TFP counts the evaluations of its steps only; ours came before them.
    counts = tf.stack([tf.cast(evals + setup_evals, tf.int32), accepted,
                       tf.cast(steps, tf.int32) - accepted])
    return ys, counts, status


# The loop state of `_bounded_solve` besides TFP's solver state: what
# `_AdaptiveStep` reads and updates of TFP's diagnostics.
_Diagnostics = collections.namedtuple(
    "_Diagnostics", ["num_ode_fn_evaluations", "num_matrix_factorizations",
                     "num_jacobian_evaluations"])


def _bounded_solve(tf, bounded_loop, step, fn, times, initial, *, rtol, atol,
                   max_num_steps):
    """TFP's adaptive loop, as one loop of at most `max_num_steps + 1` steps.

    TFP steps to each output time in turn, in nested unbounded loops that
    JAX cannot reverse-differentiate. This loop takes the same steps
    (`step`, an `_AdaptiveStep`) one after another, and after each accepted
    step writes the output times it passed, by TFP's interpolation of that
    step: as in TFP, a step passes the times in `[start, end)`, so the solve
    steps beyond the last time. The step past the budget ends the solve (as in
    TFP's loop), hence one iteration more than `max_num_steps`. Returns
    `(states, diagnostics, last)`: the states at `times`, stacked, the
    `_Diagnostics` and the last solver state.
    """
    zero = tf.constant(0, tf.int32)
    y0 = initial.current_state

    def body(carry):
        state, diagnostics, outputs = carry
        state, diagnostics = step(state, diagnostics, fn, atol, rtol)
        start, end = state.last_step_start, state.current_time
        passed = (times >= start) & (times < end)
        outputs = tf.cond(
            tf.reduce_any(passed),
            lambda: _write_passed(tf, outputs, passed, (times - start)
                                  / (end - start),
                                  state.interpolating_coefficients),
            lambda: outputs)
        return state, diagnostics, outputs

    last, diagnostics, states = bounded_loop(
        lambda carry: carry[0].current_time <= times[-1], body,
        (initial, _Diagnostics(zero, zero, zero), tf.nest.map_structure(
            lambda y: tf.stack([tf.zeros_like(y)] * times.shape[0]), y0)),
        max_num_steps + 1)
    return states, diagnostics, last


def _write_passed(tf, outputs, passed, x, coefficients):
    """`outputs` (stacked over times) with the times where `passed` set to
    the quartic `coefficients` (TFP's, highest power first) at `x`."""
    def write(out, *cs):
        shape = [-1] + [1] * (len(out.shape) - 1)
        x_ = tf.reshape(x, shape)
        value = cs[0] * x_ ** 4 + cs[1] * x_ ** 3 + cs[2] * x_ ** 2 + \
            cs[3] * x_ + cs[4]
        return tf.where(tf.reshape(passed, shape), value, out)

    return tf.nest.map_structure(write, outputs, *coefficients)


def integrate_adjoint(sub, adjoint_fn, t0, times, ys, dys, g0, *,
                      state_mask, seminorm, **options):
    """The backward pass of a solve saved at `times`, as torchdiffeq's.

    Solves the adjoint system `adjoint_fn` (state `(y, a, g)`) from the last
    output time back to `t0`, one segment per output time: at each time
    the state restarts from the forward solution `ys` there and that time's
    cotangent from `dys` joins the adjoint `a`. The segments between output
    times run in one loop, so the program (and its tracing and compile
    time) does not grow with the number of times. `g0` (a list) starts the
    parameter integrals; `options` go to `integrate` (a fixed-step method
    takes the forward solve's steps, in reverse).

    The error control sees the components of `y` and `a` that `state_mask`
    keeps (a nest of bools like one state; None for all) and, unless
    `seminorm`, the parameter integrals `g`. With `seminorm` it leaves them
    out (Kidger, Chen & Lyons 2021, "Hey, that's not an ODE"): they feed
    back into nothing, so their error need not limit the step size.

    Returns:
        `((y0, a0, g), num_evals)`, the evaluations of all segments.
    """
    tf = sub.tf
    at = lambda nest, i: tf.nest.map_structure(lambda x: x[i], nest)
    if state_mask is None:
        state_mask = tf.nest.map_structure(lambda _: True, at(ys, 0))
    options = dict(options, error_mask=(state_mask, state_mask,
                                        [not seminorm] * len(g0)))
    last = len(times) - 1
    first = times[0] != t0  # a segment from t0 to the first output time
    # A fixed-step method steps each segment as the forward grid did.
    fixed = options["method"] in _FIXED
    if fixed:
        steps = [n for *_, n in fixed_grid(t0, times, options.pop("num_steps"),
                                           options.pop("step_size"))]
    state = (at(ys, last), at(dys, last), g0)
    num_evals = tf.constant(0, tf.int32)
    # Unrolled steps take Python numbers: their segments run in Python too.
    unrolled = fixed and options.get("unroll", False)
    if last:
        # Otherwise the segments between output times run in one loop: a
        # graph (and a compile time) that does not grow with their number.
        # Each segment's length from the Python times: in the state's
        # dtype, two output times far from 0 and close together round to
        # a length far off, or to 0.
        dtype = tf.nest.flatten(ys)[0].dtype
        t, spans = ((times, None) if unrolled else (
            _vector(tf, times, dtype),
            _vector(tf, [0.0] + [abs(b - a) for a, b in zip(times,
                                                            times[1:])],
                    dtype)))
        if fixed:
            between = (steps[first:] if unrolled
                       else _vector(tf, steps[first:], tf.int32))

        def segment(i, state, num_evals):
            state, counts = integrate(
                sub, adjoint_fn, t[i], t[i - 1] if unrolled else None, state,
                direction=1.0 if t0 > times[-1] else -1.0,
                span=None if unrolled else spans[i],
                **({"num_steps": between[i - 1]} if fixed else {}),
                **options)
            _, a, g = state
            state = (at(ys, i - 1),
                     tf.nest.map_structure(tf.add, a, at(dys, i - 1)), g)
            return i - 1, state, num_evals + counts[0]

        if unrolled:
            for i in range(last, 0, -1):
                _, state, num_evals = segment(i, state, num_evals)
        else:
            _, state, num_evals = tf.while_loop(
                lambda i, *_: i > 0, segment,
                (tf.constant(last, tf.int32), state, num_evals))
    if first:
        state, counts = integrate(
            sub, adjoint_fn, times[0], t0, state,
            **({"num_steps": steps[0]} if fixed else {}), **options)
        num_evals += counts[0]
    return state, num_evals
