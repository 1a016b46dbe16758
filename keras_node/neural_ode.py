"""The `NeuralODE` layer."""

import inspect
import math
import numbers
import warnings

import keras
import numpy as np

from keras_node import _nfe_metric, _solver, gradients, solvers
from keras_node._keras_compat import (calling_model, flatten_layers,
                                      in_dynamics, leaving_no_node,
                                      seed_generators, serialize_shared)
from keras_node._options import (finite_float, invalid, non_negative_float,
                                 positive_float)

# keras-node 0.1.0's flat arguments, now options of the solver or gradient.
_MOVED = {"adjoint_rtol": "gradients.Adjoint(rtol=...)",
          "adjoint_atol": "gradients.Adjoint(atol=...)",
          "adjoint_norm": "gradients.Adjoint(norm=...)",
          "first_step_size": "solvers.DormandPrince(first_step_size=...)",
          "max_num_steps": "solvers.DormandPrince(max_num_steps=...)"}


@keras.saving.register_keras_serializable(package="keras_node")
class NeuralODE(keras.layers.Layer):
    """Integrates `dh/dt = dynamics(h)` from `t0` to `t1`; returns `h(t1)`.

    The solve uses an adaptive Runge-Kutta method (by default TensorFlow
    Probability's Dormand-Prince 5(4), `tfp.math.ode.DormandPrince`; also
    Tsit5, Bosh3 and Heun's) or a fixed-step one (Euler, midpoint, RK4): see
    `keras_node.solvers`. Only the final state is returned, unless `save_at`
    asks for the states at several times. Gradients come from the adjoint
    method by default: the backward pass solves the adjoint equation from
    `t1` back to `t0` instead of recording the forward solve, so memory does
    not grow with the number of solver steps; `gradient="backprop"`
    differentiates the solver's own operations instead (see
    `keras_node.gradients`).

    What gets gradients: the initial state `h0`, the context (below) and
    every floating weight that the dynamics read (their own, and another
    layer's that they read, as a `Lambda` may). The times `t0` and `t1` are
    constants. The adjoint gradient is approximate: it is exact for the ODE,
    up to the error of the backward solve (`gradients.Adjoint(rtol, atol)`);
    it is not the exact derivative of the forward solver's arithmetic.
    Backprop's is, for the steps taken (step sizes are not differentiated),
    at a memory cost that grows with the number of steps.

    Function evaluations are counted inside the graph, forward and backward
    separately (the backward count is of the adjoint system, one dynamics
    evaluation and one vector-Jacobian product each; with backprop, the
    forward evaluations differentiated, all but the one that Hairer's first
    step size costs). They are readable after a call as
    `num_forward_evals` and `num_backward_evals`, with the forward solve's
    `steps_accepted` and `steps_rejected`, and appear in `model.fit`'s logs
    and progress bar as `nfe_forward`, `nfe_backward`, `steps_accepted` and
    `steps_rejected` (`evaluate`'s and validation's logs leave out
    `nfe_backward`: they solve no backward). A layer whose model holds
    other `NeuralODE` layers logs them under its name instead
    (`ode1_nfe_forward`, ...), in functional and subclassed models alike; a
    layer without a `name` warns once when it finds out (adding a second
    layer renames the first one's keys). Name the layers to choose the
    keys. On JAX the counts reach the logs through
    `keras_node.callbacks.LogEvaluationCounts` (its docstring says why).

    Mixed precision: under a `mixed_float16` or `mixed_bfloat16` policy the
    dynamics compute in half precision, but the state, the solver and the
    adjoint stay in float32 (float64 inputs, or a layer of dtype float64,
    solve in float64, with the solver's coefficients in float64), and the
    output has the input's dtype (a float64 layer's is float64).
    Random layers in the dynamics (`Dropout`, `GaussianNoise`, or any layer
    holding a `keras.random.SeedGenerator`) draw once per solve, as
    Keras' `recurrent_dropout` draws one mask for every time step: each
    evaluation of a solve, and of its adjoint's backward solve, sees the
    same draw, so that the dynamics stay one smooth function of `t` and `h`,
    and the next solve draws anew. Dynamics that change other state are an
    error: a `BatchNormalization` in training (frozen, it is fine) and a
    loss (`activity_regularizer`, `add_loss`). Not supported: dynamics
    with several outputs, gradients with respect to `t0` or `t1` (per-example
    end times `T` with their gradients: solve `dh/ds = T f(h)` over [0, 1],
    `T` a context).
    In a loop's body (a `keras.layers.RNN` cell, without `unroll`) the
    layer does not record the backward count, and on JAX no count, and
    there JAX refuses the regularisers and random layers in the dynamics.
    XLA on TensorFlow: XLA drops an adaptive solver's `max_num_steps` error
    (an exhausted budget returns NaN instead), so on TensorFlow a layer with
    an adaptive solver sets `supports_jit = False`, and Keras trains its
    model without XLA even when `compile(jit_compile=True)` asks for it (it
    warns). Fixed-step solvers have no budget and allow XLA. On a CPU, leave
    XLA off (as `"auto"` does on a machine without GPUs): XLA's CPU
    compiler runs the convolutions' weight gradients inside the solver's
    loop slowly, and a train step with RK4 and backprop measured 16 to 40
    times slower under XLA, unless its steps were unrolled
    (`solvers.RK4(..., unroll=True)`; see the troubleshooting guide). On
    JAX, where no solve can raise inside a loop anyway, `"auto"` compiles
    the train step; there the layer lays the dynamics' convolutions out for
    XLA's fast CPU kernels itself, so the loop is not slow (on a CPU
    TensorFlow is still the faster backend).

    Backends: TensorFlow, and JAX through TFP's JAX substrate (which needs
    `tfp-nightly`). On JAX an exhausted `max_num_steps`, or a solve that
    stalls (its steps no longer advancing the time, where the dynamics
    blow up), returns NaN (an eager call raises a `RuntimeError`),
    `gradient="backprop"` with an adaptive solver steps in a bounded,
    checkpointed loop (see `gradients.Backprop`), and the counts reach
    `fit`'s logs only through the `keras_node.callbacks.LogEvaluationCounts`
    callback (Keras' JAX trainer builds its logs from metric variables
    alone).

    Args:
        dynamics: a Keras layer or model mapping the state `h` of shape
            `(batch, *state_shape)` to `dh/dt` of the same shape. If its
            `call` accepts an argument named `t`, it receives the current
            time as a scalar tensor; otherwise the dynamics are autonomous.
        t0: the initial time, a finite float. Defaults to `0.0`.
        t1: the final time, a finite float other than `t0`; `t1 < t0`
            integrates backward in time. Defaults to `1.0`.
        rtol: relative tolerance of each step of an adaptive solver, a
            positive float; must be left out for a fixed-step solver.
            Defaults to `1e-3` (adaptive solvers).
        atol: absolute tolerance, likewise. Defaults to `1e-3`.
        solver: `"dopri5"`, `"tsit5"`, `"bosh3"`, `"adaptive_heun"`,
            `"euler"`, `"midpoint"`, `"rk4"`, or a `keras_node.solvers`
            object with options (the first step, the step budget; the
            number or size of fixed steps). Defaults to `"dopri5"`.
        gradient: `"adjoint"`, `"backprop"`, or a `keras_node.gradients`
            object (`gradients.Adjoint(rtol=None, atol=None,
            norm="seminorm")`: the backward solve's tolerances, defaulting
            to the layer's, and its error norm). Defaults to `"adjoint"`.
        kinetic_energy: weight of the kinetic-energy regulariser of Finlay
            et al. (2020), "How to train your neural ODE", a non-negative
            float. When positive, the layer adds to the model's losses this
            times the batch mean of `integral from t0 to t1 of |f(t, h)|^2`
            (the squares summed over each example's state; up to the last
            of `save_at` if given), which favours straight, slow paths. The
            integral is solved beside `h` in the same solve and its gradient
            comes from the same gradient method; it adds no steps (its error
            does not control the step size). Whether it lowers the steps of
            a trained model depends on the model: see the benchmarks'
            README. Defaults to `0.0`, off.
        save_at: `None`, or the times at which to return the state: a
            sequence of floats from `t0` towards `t1`, strictly monotone,
            each within `[t0, t1]`, the last not `t0` (a float32 time
            that is `t0` or `t1` in float32 counts as it). The solve ends at
            the last of them, and the output gains a time axis: `(batch,
            len(save_at), *state_shape)`, as torchdiffeq's
            `odeint(f, h0, t)` or diffrax's `SaveAt(ts=...)`. Fixed-step
            solvers step onto every one of these times. Loss terms on any
            of the states get their gradients from one backward pass.
            Defaults to `None`: only `h(t1)`, no time axis.
        augment_dim: the number of zero channels to append to the state's
            last axis before the solve (features of a vector, channels of
            an `NHWC` image) and to drop after it: Dupont et al.'s (2019)
            augmented neural ODE, whose flow can separate what a plain
            one's cannot (trajectories of an ODE do not cross). The
            dynamics then map `(..., channels + augment_dim)` to the same
            shape; the output keeps the input's shape. An argument of the
            layer rather than a wrapper, so that the dynamics' shape check,
            the counts and the kinetic energy (over all channels) see the
            state actually solved. Defaults to `0`, none.
        jacobian_norm: weight of Finlay et al.'s other regulariser, a
            non-negative float: this times the batch mean of `integral of
            |e^T df/dh|^2 dt`, Hutchinson's unbiased estimate of the
            integrated squared Frobenius norm of the dynamics' Jacobian,
            with one standard Gaussian probe `e` per example, drawn afresh
            at each call and fixed over its solve. Solved beside `h` as the
            kinetic energy is (it adds no steps), at the cost of one
            vector-Jacobian product per evaluation (and second derivatives
            in the backward pass). Defaults to `0.0`, off.
        seed: an integer seeding the probes of `jacobian_norm`, or `None`
            (only with `jacobian_norm` on). Defaults to `None`. As for
            Keras' `Dropout`, the seed generator's state is not saved: a
            loaded layer draws from the start of its seed's sequence.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: the initial state `h(t0)`, a floating tensor; or a list
            `[h(t0), *context]`: then the dynamics take `[h, *context]`,
            floating tensors constant over the solve (a class embedding, a
            condition, a control), as diffrax's `args` or a closure in
            torchdiffeq. The context gets its gradients as the weights do
            (with the adjoint, integrated backward beside them; the seminorm
            leaves them out of the error control). It is cast to the
            state's dtype (float32 under mixed precision, or float64).
        training: passed to every call of the dynamics, also by the
            adjoint's backward solve (after this call has returned, where
            Keras no longer knows it). Defaults to Keras' own (True in
            `fit`).

    Input shape:
        `(batch, *state_shape)`, any number of state dimensions; a
        context's shape is the dynamics' business.

    Output shape:
        The input's shape and dtype, `h(t1)`; with `save_at`,
        `(batch, len(save_at), *state_shape)`.

    Example:

    >>> import keras
    >>> from keras_node import NeuralODE, solvers
    >>> dynamics = keras.Sequential([keras.layers.Dense(16, activation="tanh"),
    ...                              keras.layers.Dense(4)])
    >>> inputs = keras.Input((4,))
    >>> outputs = NeuralODE(dynamics, t0=0.0, t1=1.0, solver="tsit5")(inputs)
    >>> model = keras.Model(inputs, outputs)
    >>> tuple(model(keras.ops.ones((2, 4))).shape)
    (2, 4)
    >>> fixed = NeuralODE(dynamics, solver=solvers.RK4(num_steps=8),
    ...                   gradient="backprop")
    >>> tuple(fixed(keras.ops.ones((2, 4))).shape), float(fixed.steps_accepted)
    ((2, 4), 8.0)
    """

    def __init__(
        self,
        dynamics,
        t0=0.0,
        t1=1.0,
        rtol=None,
        atol=None,
        solver="dopri5",
        gradient="adjoint",
        kinetic_energy=0.0,
        save_at=None,
        augment_dim=0,
        jacobian_norm=0.0,
        seed=None,
        **kwargs,
    ):
        moved = sorted(set(kwargs) & set(_MOVED))
        if moved:
            raise TypeError(
                f"NeuralODE no longer takes `{moved[0]}`: use "
                f"{_MOVED[moved[0]]} (keras-node 0.2). "
                f"Received: {moved[0]}={kwargs[moved[0]]!r}")
        super().__init__(**kwargs)
        self._named = kwargs.get("name") is not None
        if not isinstance(dynamics, keras.layers.Layer):
            raise TypeError(
                "Received an invalid value for argument `dynamics`, expected "
                "a Keras layer or model mapping the state to its time "
                f"derivative. Received: dynamics={dynamics!r} of type "
                f"{type(dynamics).__name__}"
            )
        self.dynamics = dynamics
        self.t0 = finite_float("t0", t0)
        self.t1 = finite_float("t1", t1)
        if self.t1 == self.t0:
            raise ValueError(
                "Received an invalid value for argument `t1`, expected a time "
                f"other than t0={self.t0}. Received: t1={t1}"
            )
        self.solver = solvers.get(solver)
        self.gradient = gradients.get(gradient)
        self.rtol, self.atol = self._tolerances(rtol, atol)
        self.kinetic_energy = non_negative_float("kinetic_energy",
                                                 kinetic_energy)
        self.jacobian_norm = non_negative_float("jacobian_norm", jacobian_norm)
        self.seed = check_seed(seed, unused=None if self.jacobian_norm else
                               "no probes are drawn with jacobian_norm=0")
        self.seed_generator = (keras.random.SeedGenerator(self.seed)
                               if self.jacobian_norm else None)
        self.save_at = (None if save_at is None
                        else _save_times(save_at, self.t0, self.t1))
        if getattr(self.solver, "step_size", None) is not None:
            self._check_num_fixed_steps()
        if isinstance(augment_dim, bool) or not isinstance(
                augment_dim, numbers.Integral):
            raise invalid(TypeError, "augment_dim", "a non-negative integer",
                          augment_dim)
        if augment_dim < 0:
            raise invalid(ValueError, "augment_dim", "a non-negative integer",
                          augment_dim)
        self.augment_dim = int(augment_dim)
        self._time_dependent = "t" in inspect.signature(
            dynamics.call
        ).parameters
        # TFP's solver runs in float32 or float64, never in half precision.
        self.autocast = False
        # XLA compiles the step-budget assertion away (an exhausted budget
        # then gives NaN, not an error): on TensorFlow Keras trains adaptive
        # solvers without XLA, even when asked for it; fixed-step solvers
        # have no budget to lose.
        # JAX cannot raise inside a loop at all, and without jit its `fit`
        # would run every operation eagerly, recompiling the solver's loops
        # at each step.
        self.supports_jit = (keras.backend.backend() != "tensorflow"
                             or not self.solver.adaptive)
        self.evaluation_counts = _nfe_metric.EvaluationCounts(self)
        self._backward_evals_host = 0.0
        # False after a solve that no gradient tape recorded (`evaluate`'s,
        # on TensorFlow): its logs then leave `nfe_backward` out.
        self._differentiated = True
        self.shares_model = False  # found out when called in a model
        _backend()  # a missing or unsupported TFP fails here, not in `fit`

    def _check_num_fixed_steps(self):
        """Refuses a `step_size` that makes too many steps over the span."""
        num_steps = sum(n for _, _, n in _solver.fixed_grid(
            self.t0, self.output_times, step_size=self.solver.step_size))
        if num_steps > solvers.MAX_FIXED_STEPS:
            raise ValueError(
                "Received an invalid value for argument `solver`, expected a "
                f"step_size making at most {solvers.MAX_FIXED_STEPS} steps "
                f"from t0={self.t0} to t1={self.t1}. Received: solver="
                f"{self.solver!r} ({num_steps} steps)")

    def _tolerances(self, rtol, atol):
        """`(rtol, atol)` checked against the solver and gradient method."""
        if not self.solver.adaptive:
            for name, value in (("rtol", rtol), ("atol", atol)):
                if value is not None:
                    raise ValueError(
                        f"Received an invalid value for argument `{name}`, "
                        f"expected None: the fixed-step solver "
                        f"{self.solver!r} has no tolerances (choose its "
                        f"`num_steps` or `step_size`). Received: "
                        f"{name}={value!r}")
            adjoint = self.gradient
            if isinstance(adjoint, gradients.Adjoint) and (
                    adjoint.rtol is not None or adjoint.atol is not None
                    or adjoint.norm != "seminorm"):
                raise ValueError(
                    "Received an invalid value for argument `gradient`, "
                    "expected an adjoint without tolerances or norm: the "
                    "backward solve takes the fixed-step solver's steps. "
                    f"Received: gradient={adjoint!r}")
            return None, None
        return (positive_float("rtol", 1e-3 if rtol is None else rtol),
                positive_float("atol", 1e-3 if atol is None else atol))

    @property
    def num_forward_evals(self):
        """Dynamics evaluations of the last forward solve (a float tensor)."""
        return keras.ops.copy(self._forward_evals)

    @property
    def steps_accepted(self):
        """Accepted steps of the last forward solve (a float tensor)."""
        return keras.ops.copy(self._steps_accepted)

    @property
    def steps_rejected(self):
        """Rejected steps of the last forward solve (0 for fixed steps)."""
        return keras.ops.copy(self._steps_rejected)

    @property
    def num_backward_evals(self):
        """Adjoint-system evaluations of the last backward solve."""
        if keras.backend.backend() == "jax":
            # Counted on the host: a JAX backward pass has no layer state.
            return keras.ops.convert_to_tensor(
                self._backward_evals_host, "float32")
        return keras.ops.copy(self._backward_evals)

    def build(self, input_shape):
        input_shape, context_shapes = state_and_context(input_shape)
        if self.augment_dim and tuple(input_shape)[-1] is None:
            raise invalid(
                ValueError, "augment_dim", "0 for inputs whose last axis (the "
                f"channels) has no known size, here {tuple(input_shape)}",
                self.augment_dim)
        # Under a distribution strategy each replica counts its own solve;
        # reading gives the mean over replicas.
        # (An initializer, not a value: Keras' symbolic build of a subclassed
        # model creates variables in a stateless scope.)
        counter = lambda name: keras.Variable(
            "zeros", shape=(), dtype="float32", trainable=False, name=name,
            aggregation="mean", synchronization="on_read",
        )
        self._forward_evals = counter("num_forward_evals")
        self._backward_evals = counter("num_backward_evals")
        self._steps_accepted = counter("steps_accepted")
        self._steps_rejected = counter("steps_rejected")
        # A symbolic call builds the dynamics (also those without `build`).
        state_shape = self._augmented(input_shape)
        spec = self._dynamics_output_spec(state_shape, context_shapes)
        _solver.check_derivative(
            self.dynamics.name, spec, state_shape,
            state=f"the state {state_shape}" + (
                f" ({input_shape[-1]} channels and "
                f"augment_dim={self.augment_dim})" if self.augment_dim
                else ""))

    def _augmented(self, shape):
        """The solver's state shape for inputs of `shape`."""
        shape = tuple(shape)
        if not self.augment_dim or shape[-1] is None:
            return shape
        return (*shape[:-1], shape[-1] + self.augment_dim)

    def save_own_variables(self, store):
        if keras.backend.backend() == "jax":  # the host's count, saved too
            self._backward_evals.assign(self._backward_evals_host)
        super().save_own_variables(store)

    def load_own_variables(self, store):
        # keras-node 0.1.0 saved two counters; the step counts start at 0.
        if len(store.keys()) == 2:
            store = {"0": store["0"], "1": store["1"], "2": 0.0, "3": 0.0}
        super().load_own_variables(store)
        if keras.backend.backend() == "jax":
            self._backward_evals_host = float(self._backward_evals.value)

    def _dynamics_output_spec(self, input_shape, context_shapes=()):
        dtype = self._state_dtype(self.compute_dtype)
        state = keras.KerasTensor(input_shape, dtype=dtype)
        context = [keras.KerasTensor(shape, dtype=dtype)
                   for shape in context_shapes]
        kwargs = {}
        if self._time_dependent:
            kwargs["t"] = keras.KerasTensor((), dtype=state.dtype)
        # Leaving no node: the model may apply the dynamics itself too.
        with leaving_no_node(self.dynamics):
            return self.dynamics([state, *context] if context else state,
                                 **kwargs)

    def _state_dtype(self, input_dtype):
        """float64 for float64 inputs or a float64 layer, else float32 (also
        under mixed precision)."""
        dtypes = {keras.backend.standardize_dtype(d)
                  for d in (input_dtype, self.compute_dtype)}
        return "float64" if "float64" in dtypes else "float32"

    def _output_dtype(self, input_dtype):
        """As any Keras layer's, a float64 layer's output is float64; else
        the input's dtype (also under mixed precision)."""
        return "float64" if self.compute_dtype == "float64" else input_dtype

    @property
    def output_times(self):
        """The times whose states the layer returns: `save_at` or `(t1,)`."""
        return (self.t1,) if self.save_at is None else self.save_at

    def compute_output_shape(self, input_shape):
        input_shape, _ = state_and_context(input_shape)
        if self.save_at is None:
            return tuple(input_shape)
        return (input_shape[0], len(self.save_at), *input_shape[1:])

    def compute_output_spec(self, inputs, training=None):
        inputs, _ = checked_inputs(inputs)
        return keras.KerasTensor(self.compute_output_shape(inputs.shape),
                                 dtype=self._output_dtype(inputs.dtype))

    def call(self, inputs, training=None):
        inputs, context = checked_inputs(inputs)
        model = calling_model(self)
        if model is not None:
            self.note_model(model)
        h0 = keras.ops.cast(inputs, self._state_dtype(inputs.dtype))
        if self.augment_dim:  # zero channels, dropped after the solve
            h0 = keras.ops.pad(h0, [[0, 0]] * (len(h0.shape) - 1)
                               + [[0, self.augment_dim]])
        noise = None
        if self.jacobian_norm:
            noise = draw_noise("gaussian", h0, self.seed_generator)
        hs, _, penalty = self._solve(
            h0, kinetic_energy=self.kinetic_energy,
            jacobian_norm=self.jacobian_norm, noise=noise, training=training,
            context=context)
        if penalty is not None:
            self.add_loss(penalty)
        if self.augment_dim:
            hs = hs[..., :inputs.shape[-1]]
        hs = hs[0] if self.save_at is None else keras.ops.moveaxis(hs, 0, 1)
        return keras.ops.cast(hs, self._output_dtype(inputs.dtype))

    def _solve(self, h0, *, reverse=False, kinetic_energy=0.0,
               jacobian_norm=0.0, trace=None, noise=None, training=None,
               context=()):
        """Solves from `h0` and records the counts; the solve of `call` and
        of `ContinuousNormalizingFlow`.

        Returns `(hs, divergence, penalty)`: the states at the output times
        (stacked first); with `trace` (`_solver.augment`'s, as `noise`),
        the divergence integrated up to each of them, else None; and the
        regularisers' loss for these weights (their integrals up to the last
        output time, averaged over the batch), None with both off.
        `reverse`: from `t1` back to `t0` instead (one output time, `t0`).
        `training`: the dynamics' `training` argument, in the forward and
        in the backward solve. `context`: tensors that the dynamics take
        after the state (cast to `h0`'s dtype).
        """
        t0, times = ((self.t1, (self.t0,)) if reverse
                     else (self.t0, self.output_times))
        self._differentiated = _backend().records_gradient()
        forward, adjoint = self._solve_options(reverse)
        generators, draws = seed_generators(self.dynamics), {}
        # Inside another NeuralODE's dynamics, a solve per evaluation: not
        # counted (the dynamics must change no state).
        nested, looped = in_dynamics(), []
        hs, integrals, counts = _backend().solve(
            self.dynamics, h0, time_dependent=self._time_dependent,
            t0=t0, times=times, forward=forward, adjoint=adjoint,
            gradient=self.gradient.name,
            seminorm=getattr(self.gradient, "norm", None) == "seminorm",
            # (`looped` is known by the time the backward pass runs.)
            on_backward_evals=lambda evals: None if nested or looped
            else self._record_backward_evals(evals),
            kinetic=bool(kinetic_energy), jacobian=bool(jacobian_norm),
            trace=trace, noise=noise, training=training,
            random_state=[generator.state for generator in generators],
            draws=draws, context=[keras.ops.cast(c, h0.dtype)
                                  for c in context])
        counts = keras.ops.cast(counts, "float32")
        # In a loop's body on JAX (an RNN cell's in `scan`) no state can
        # change. (TensorFlow's backend skips the backward count itself,
        # in a `while_loop`'s gradient.)
        if not nested and _backend().in_loop(counts,
                                             self._forward_evals.value):
            looped.append(True)
            self._check_loop_body(
                regularised=bool(kinetic_energy or jacobian_norm),
                random=noise is not None or any(draws.values()))
        for generator in generators:  # past one evaluation's draws
            for _ in range(draws.get(id(generator.state), 0)):
                generator.next()
        counters = () if nested or looped else (
            self._forward_evals, self._steps_accepted, self._steps_rejected)
        for i, counter in enumerate(counters):
            counter.assign(counts[i])
        # The integrals run from the solve's start: negative backward in time.
        sign = 1.0 if times[-1] > t0 else -1.0
        penalty = None
        for name, weight in (("kinetic", kinetic_energy),
                             ("jacobian", jacobian_norm)):
            if name in integrals:
                term = sign * weight * batch_mean(integrals[name][-1])
                penalty = term if penalty is None else penalty + term
        return hs, integrals.get("divergence"), penalty

    def _check_loop_body(self, regularised, random):
        """Raises for what cannot run in a loop's body on JAX: a regulariser
        (its loss cannot leave the loop) and random draws (their seed
        generators cannot advance)."""
        problem = (
            "the loss of kinetic_energy or jacobian_norm cannot leave the "
            "loop" if regularised else
            "random layers in the dynamics and Hutchinson's trace estimator "
            "cannot draw (their seed generators cannot advance)" if random
            else None)
        if problem:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' is called in a loop's "
                f"body (a `keras.layers.RNN` cell's, in JAX's `scan`), where "
                f"{problem}. Unroll the loop: "
                "`keras.layers.RNN(cell, unroll=True)`.")

    def note_model(self, model):
        """Marks this layer as sharing `model` if that holds other
        `NeuralODE` layers: its counts are then logged under its name
        (warns once, unless the layer was given its name)."""
        if not self.shares_model and any(
                isinstance(layer, NeuralODE) and layer is not self
                for layer in flatten_layers(model)):
            self.shares_model = True
            if self._named:
                return
            warnings.warn(
                f"NeuralODE '{self.name}' shares its model with other "
                f"NeuralODE layers: its counts are logged as "
                f"'{self.name}_nfe_forward', '{self.name}_nfe_backward', "
                f"'{self.name}_steps_accepted' and "
                f"'{self.name}_steps_rejected' (alone in a model, a layer "
                "logs 'nfe_forward', ...). Name the layers to choose the "
                "keys.", stacklevel=2)

    def _record_backward_evals(self, num_evals):
        """Called by the backward pass (on JAX, on the host)."""
        if keras.backend.backend() == "jax":
            self._backward_evals_host = float(num_evals)
        else:
            self._backward_evals.assign(keras.ops.cast(num_evals, "float32"))

    def _solve_options(self, reverse=False):
        """Keyword arguments of the forward and the backward solve."""
        ends = (f"from t0={self.t0} to t1={self.t1}",
                f"from t1={self.t1} back to t0={self.t0}")
        forward = dict(
            self.solver.options(), rtol=self.rtol, atol=self.atol,
            what=f"NeuralODE '{self.name}' (forward solve {ends[reverse]})",
        )
        adjoint = dict(
            forward,
            what=f"NeuralODE '{self.name}' (adjoint solve {ends[not reverse]})",
        )
        if isinstance(self.gradient, gradients.Adjoint) and \
                self.solver.adaptive:
            adjoint.update(
                rtol=self.gradient.rtol or self.rtol,
                atol=self.gradient.atol or self.atol)
        return forward, adjoint

    def get_config(self):
        config = {
            "dynamics": serialize_shared(self.dynamics),
            "t0": self.t0,
            "t1": self.t1,
            "rtol": self.rtol,
            "atol": self.atol,
            "solver": keras.saving.serialize_keras_object(self.solver),
            "gradient": keras.saving.serialize_keras_object(self.gradient),
            "kinetic_energy": self.kinetic_energy,
            "save_at": None if self.save_at is None else list(self.save_at),
            "augment_dim": self.augment_dim,
            "jacobian_norm": self.jacobian_norm,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config):
        config = _upgrade_config(config)
        config["dynamics"] = keras.saving.deserialize_keras_object(
            config["dynamics"]
        )
        for key, module in (("solver", solvers), ("gradient", gradients)):
            if isinstance(config.get(key), dict):
                config[key] = module.get(config[key])
        return cls(**config)


def _upgrade_config(config):
    """A config of keras-node 0.1.0 (flat solver and adjoint options) in
    today's form; today's configs pass unchanged."""
    config = dict(config)
    if not set(config) & set(_MOVED):
        return config
    config["solver"] = solvers.DormandPrince(
        first_step_size=config.pop("first_step_size", None),
        max_num_steps=config.pop("max_num_steps", 1000))
    config["gradient"] = gradients.Adjoint(
        rtol=config.pop("adjoint_rtol", None),
        atol=config.pop("adjoint_atol", None),
        norm=config.pop("adjoint_norm", "seminorm"))
    return config


def _backend():
    """The module that solves on Keras' backend (imported on first use).
    Raises `ImportError` if its packages are missing, or if TFP is of a
    version whose private API keras-node has not checked."""
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            from keras_node import _jax_backend

            return _jax_backend
        from keras_node import _tf_backend

        return _tf_backend
    except ModuleNotFoundError as error:  # not an unsupported version's
        needs = {"jax": "jax and tfp-nightly",
                 "tensorflow": "tensorflow and tensorflow-probability"}
        raise ImportError(
            f"NeuralODE on Keras' {backend} backend needs {needs[backend]} "
            f"({error}). Install them with: pip install "
            f"'keras-node[{backend}]'") from error


def _save_times(save_at, t0, t1):
    """`save_at` as a tuple of floats, checked against `t0` and `t1`."""
    expected = (f"a non-empty sequence of finite floats from t0={t0} towards "
                f"t1={t1}, strictly monotone and within [t0, t1], not "
                "ending at t0")
    if isinstance(save_at, (str, bytes)) or not hasattr(save_at, "__len__"):
        raise invalid(TypeError, "save_at", expected, save_at)
    times = []
    for time in save_at:
        if isinstance(time, bool) or not isinstance(time, numbers.Real):
            raise invalid(TypeError, "save_at", expected, save_at)
        # A float32 (or float16) time that is t0 or t1 in its precision is
        # that time: np.linspace(t0, t1, n, dtype="float32") ends at t1,
        # whichever way float32 rounds t1.
        if isinstance(time, np.floating) and np.finfo(time).bits < 64:
            time = next((t for t in (t0, t1) if type(time)(t) == time), time)
        times.append(float(time))
    sign = 1.0 if t1 > t0 else -1.0
    steps = [sign * (b - a) for a, b in zip([t0] + times, times)]
    if not times or not all(math.isfinite(t) for t in times) \
            or steps[0] < 0 or any(step <= 0 for step in steps[1:]) \
            or sign * (times[-1] - t1) > 0 or times[-1] == t0:
        # As floats: float32 times print as in range when they are not.
        raise invalid(ValueError, "save_at", expected, times)
    return tuple(times)


def draw_noise(kind, like, seed):
    """Probe vectors shaped like `like`: standard `"gaussian"` or
    `"rademacher"` (+1 or -1, equally likely), one per example."""
    shape = keras.ops.shape(like)
    if kind == "gaussian":
        return keras.random.normal(shape, dtype=like.dtype, seed=seed)
    signs = keras.random.randint(shape, 0, 2, seed=seed)
    return keras.ops.cast(2 * signs - 1, like.dtype)


def batch_mean(values):
    """The mean over the batch, as a sum: Keras 3.15's `ops.mean` computes
    float64 in float32 on JAX. Zero for an empty batch (a replica's share of
    a last, short batch), as Keras' own losses."""
    batch = keras.ops.cast(keras.ops.shape(values)[0], values.dtype)
    return keras.ops.divide_no_nan(keras.ops.sum(values), batch)


def check_seed(seed, unused=None):
    """`seed`, checked: None or an integer; None if `unused` says why
    nothing is drawn."""
    if seed is not None and (isinstance(seed, bool)
                             or not isinstance(seed, numbers.Integral)):
        raise invalid(TypeError, "seed", "None or an integer", seed)
    if seed is not None and unused:
        raise invalid(ValueError, "seed", f"None: {unused}", seed)
    return None if seed is None else int(seed)  # Keras refuses numpy ints


def state_and_context(inputs):
    """`(state, context)`: a `NeuralODE`'s inputs (or their shapes), `h0`
    or `[h0, *context]`, as `h0` and a list."""
    if isinstance(inputs, (list, tuple)) and inputs and not isinstance(
            inputs[0], (numbers.Integral, type(None))):
        return inputs[0], list(inputs[1:])
    return inputs, []


def checked_inputs(inputs):
    """`state_and_context(inputs)` of a call's tensors; raises unless they
    are all floating."""
    state, context = state_and_context(inputs)
    check_floating(state, context)
    return state, context


def check_floating(inputs, context=()):
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise TypeError(
            "Received an invalid value for argument `inputs`, expected a "
            "floating tensor (the initial state). Received: inputs of dtype "
            f"{dtype}"
        )
    check_context(context, "inputs", "the initial state and the context",
                  first=1)


def check_context(context, name, what, first=0):
    """Raises for a tensor of `context` (the argument `name`'s, holding
    `what`, from index `first`) that is not floating."""
    for k, tensor in enumerate(context, start=first):
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise TypeError(
                f"Received an invalid value for argument `{name}`, expected "
                f"floating tensors ({what}). Received: {name}[{k}] of dtype "
                f"{dtype} (embed integer labels first, e.g. with "
                "`keras.layers.Embedding`)")
