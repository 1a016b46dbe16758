"""The `ContinuousNormalizingFlow` model."""

import inspect
import math

import keras

from keras_node import gradients, solvers
from keras_node._options import invalid, non_negative_float, positive_int
from keras_node.neural_ode import (NeuralODE, check_context, check_seed,
                                   checked_inputs, draw_noise,
                                   state_and_context)

_TRACES = ("exact", "hutchinson")
_NOISES = ("gaussian", "rademacher")


@keras.saving.register_keras_serializable(package="keras_node")
class ContinuousNormalizingFlow(keras.Model):
    """A density model: a neural ODE carrying the data to a standard normal.

    FFJORD's continuous normalizing flow (Grathwohl et al. 2019). The flow
    runs from data to base: `log_prob(x)` solves `dz/dt = dynamics(t, z)`
    from `z(t0) = x` to `t1` beside the integral of the divergence
    `trace(df/dz)`, and by the instantaneous change of variables

        log p(x) = log N(z(t1); 0, I) + integral from t0 to t1 of trace(df/dz)

    (Chen et al. 2018). `sample(n)` draws `z` from the base and solves the
    same dynamics back from `t1` to `t0`. The divergence is exact (one
    vector-Jacobian product per element of an example, for small
    dimensions) or Hutchinson's unbiased estimate `e^T (df/dz) e`, with one
    probe `e` per example, Gaussian or Rademacher, drawn at each call and
    fixed over its solve. The divergence's integral is under the solver's
    error control with the state.

    Train it as any Keras model, without labels: `compile(optimizer)` and
    `fit(x)`; the loss is the negative mean log-likelihood (in nats;
    `fit(x, sample_weight=w)` weighs it as Keras weighs its losses) plus
    the regularisers' losses, and `compile` takes no `loss`. Under a
    `tf.distribute` strategy each replica solves its share of the batch.
    `evaluate(x)` reports the same (with the regularisers, if any); the
    held-out negative log-likelihood alone is `-log_prob(x).mean()`.

    Solvers, tolerances, gradient methods and the evaluation counts are the
    `NeuralODE`'s (the flow holds one, `ode`): the gradient is the adjoint
    by default, `"backprop"` differentiates the solver. Both backends; on
    JAX, as for `NeuralODE`, the counts reach `fit`'s logs through
    `keras_node.callbacks.LogEvaluationCounts`.

    Args:
        dynamics: a Keras layer or model mapping the state `z` of shape
            `(batch, *event_shape)` to `dz/dt` of the same shape, optionally
            taking the time as an argument `t` (as `NeuralODE`'s).
        t0: the time of the data, a finite float. Defaults to `0.0`.
        t1: the time of the base distribution, a finite float other than
            `t0`. Defaults to `1.0`.
        rtol: as `NeuralODE`'s.
        atol: as `NeuralODE`'s.
        solver: as `NeuralODE`'s.
        gradient: as `NeuralODE`'s.
        trace: `"exact"` or `"hutchinson"`. Defaults to `"exact"`.
        noise: the probes' distribution, `"gaussian"` or `"rademacher"`;
            only with Hutchinson's trace or `jacobian_norm`, which share one
            probe. Defaults to `None`: `"gaussian"` where probes are drawn.
        kinetic_energy: the weight of Finlay et al.'s (2020) kinetic-energy
            regulariser, as `NeuralODE`'s. Defaults to `0.0`, off.
        jacobian_norm: the weight of their Jacobian-norm regulariser, as
            `NeuralODE`'s. Defaults to `0.0`, off.
        seed: an integer seeding the probes and `sample`, or `None`.
        **kwargs: base model arguments (`name`, `dtype`, ...).

    A conditional flow models `p(x | c)`: called on `[x, *context]`, its
    dynamics take `[z, *context]` (as `NeuralODE`'s), trained by
    `fit([x, c])`; `log_prob(x, context=c)` and `sample(n, context=c)`,
    one draw per row of `c` (or `n` draws given a `c` of one row).

    Call arguments:
        inputs: data points, a floating tensor `(batch, *event_shape)`, or
            a list `[x, *context]` (the context's rows going with `x`'s).
        training: passed to every call of the dynamics, as `NeuralODE`'s.

    Returns:
        `log p(x)` per example, `(batch,)`, in the inputs' dtype, as
        `NeuralODE`'s output: float64 inputs solve in float64, and under
        mixed precision the data are not rounded to half precision (a
        float64 flow solves in float64 and returns float64).

    As for Keras' `Dropout`, the seed generator's state is not saved: a
    loaded flow draws its probes and samples from the start of its seed's
    sequence again.

    Example:

    >>> import keras, numpy as np
    >>> from keras_node import ContinuousNormalizingFlow
    >>> dynamics = keras.Sequential([keras.layers.Dense(16, activation="tanh"),
    ...                              keras.layers.Dense(2)])
    >>> flow = ContinuousNormalizingFlow(dynamics, t1=0.5)
    >>> flow.compile(keras.optimizers.Adam(1e-2))
    >>> x = np.random.default_rng(0).normal(size=(64, 2)).astype("float32")
    >>> _ = flow.fit(x, batch_size=32, epochs=1, verbose=0)
    >>> tuple(flow.log_prob(x[:3]).shape), tuple(flow.sample(5, seed=1).shape)
    ((3,), (5, 2))
    """

    def __init__(self, dynamics, t0=0.0, t1=1.0, rtol=None, atol=None,
                 solver="dopri5", gradient="adjoint", trace="exact",
                 noise=None, kinetic_energy=0.0, jacobian_norm=0.0,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        self.autocast = False  # the ode chooses the solve's dtype
        self.ode = NeuralODE(dynamics, t0=t0, t1=t1, rtol=rtol, atol=atol,
                             solver=solver, gradient=gradient, name="ode",
                             dtype=self.dtype_policy)
        if trace not in _TRACES:
            raise invalid(ValueError if isinstance(trace, str) else TypeError,
                          "trace", '"exact" or "hutchinson"', trace)
        self.trace = trace
        self.kinetic_energy = non_negative_float("kinetic_energy",
                                                 kinetic_energy)
        self.jacobian_norm = non_negative_float("jacobian_norm", jacobian_norm)
        self._probed = trace == "hutchinson" or bool(self.jacobian_norm)
        if noise is not None and noise not in _NOISES:
            raise invalid(ValueError, "noise",
                          'None, "gaussian" or "rademacher"', noise)
        if noise is not None and not self._probed:
            raise invalid(ValueError, "noise",
                          'None: no probes are drawn with trace="exact" and '
                          "jacobian_norm=0", noise)
        self.noise = noise
        self.seed = check_seed(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.event_shape = None

    @property
    def dynamics(self):
        return self.ode.dynamics

    def build(self, input_shape):
        state_shape, context_shapes = state_and_context(input_shape)
        state_shape = tuple(state_shape)
        if len(state_shape) < 2 or None in state_shape[1:]:
            raise ValueError(
                "Received an invalid value for argument `input_shape`, "
                "expected (batch, *event_shape) with a known event shape. "
                f"Received: input_shape={input_shape}")
        self.event_shape = state_shape[1:]
        self.ode.build([state_shape, *context_shapes] if context_shapes
                       else state_shape)

    def compute_output_spec(self, inputs, training=None):
        inputs, _ = checked_inputs(inputs)
        return keras.KerasTensor(inputs.shape[:1],
                                 dtype=self.ode._output_dtype(inputs.dtype))

    def call(self, inputs, training=None):
        inputs, context = checked_inputs(inputs)
        z0 = keras.ops.cast(inputs, self.ode._state_dtype(inputs.dtype))
        noise = None
        if self._probed:
            noise = draw_noise(self.noise or "gaussian", z0,
                               self.seed_generator)
        zs, divergence, penalty = self.ode._solve(
            z0, trace=self.trace, kinetic_energy=self.kinetic_energy,
            jacobian_norm=self.jacobian_norm, noise=noise, training=training,
            context=context)
        if penalty is not None:
            self.add_loss(penalty)
        log_prob = _standard_normal_log_prob(zs[0]) + divergence[-1]
        return keras.ops.cast(log_prob, self.ode._output_dtype(inputs.dtype))

    def log_prob(self, x, context=None):
        """`log p(x)` per example, in nats: the model's call (of `[x,
        *context]` for a conditional flow; `context` a tensor or a list)."""
        return self(x if context is None else [x, *_as_list(context)])

    def sample(self, num_samples, seed=None, context=None):
        """`num_samples` draws from the model, `(num_samples, *event_shape)`:
        base draws solved back from `t1` to `t0`. `seed`: an integer, or
        `None` for the model's own seed generator. `context`: for a
        conditional flow, a tensor (or a list) of `num_samples` rows, one
        per draw, or of one row, the same for every draw."""
        num_samples = positive_int("num_samples", num_samples)
        if self.event_shape is None:
            raise ValueError(
                "ContinuousNormalizingFlow.sample needs the event shape: "
                "call, fit or build the model first.")
        seed = check_seed(seed)
        dtype = self.ode._state_dtype(self.compute_dtype)
        context = [keras.ops.convert_to_tensor(c)
                   for c in _as_list(context)]
        check_context(context, "context", "the context")
        for i, c in enumerate(context):
            if len(c.shape) < 1 or c.shape[0] not in (1, num_samples):
                raise ValueError(
                    "Received an invalid value for argument `context`, "
                    f"expected {num_samples} rows (num_samples), one per "
                    "draw, or one row for every draw. Received: a context "
                    f"of shape {tuple(c.shape)}")
            context[i] = keras.ops.broadcast_to(
                c, (num_samples, *c.shape[1:]))
        z = keras.random.normal(
            (num_samples, *self.event_shape), dtype=dtype,
            seed=self.seed_generator if seed is None else seed)
        xs, _, _ = self.ode._solve(z, reverse=True, context=context)
        return xs[0]

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        """Keras' `compile`, without `loss`: the loss is the flow's own."""
        if loss is not None:
            raise invalid(ValueError, "loss", "None: the loss of a "
                          "ContinuousNormalizingFlow is its negative "
                          "log-likelihood", loss)
        super().compile(optimizer=optimizer, **kwargs)

    def fit(self, *args, **kwargs):
        """Keras' `fit`; with arrays, `sample_weight` needs no `y`."""
        args, kwargs = _carry_weights(super().fit, args, kwargs)
        return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """Keras' `evaluate`; with arrays, `sample_weight` needs no `y`."""
        args, kwargs = _carry_weights(super().evaluate, args, kwargs)
        return super().evaluate(*args, **kwargs)

    def compile_from_config(self, config):
        """Compiles a loaded flow as it was saved (its optimizer's state is
        loaded next): Keras skips a model whose `compile` is its own."""
        config = keras.saving.deserialize_keras_object(config)
        config.pop("loss", None)  # None: the flow's own
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        """The negative mean log-likelihood, plus any added losses (the
        regularisers), each reduced as Keras reduces its losses (also
        across the replicas of a distribution strategy)."""
        loss = _NegativeLogLikelihood(name="nll", dtype=y_pred.dtype)(
            y_pred, y_pred, sample_weight)
        if self.losses:  # Keras' own aggregation of the added losses
            loss = loss + keras.ops.cast(super().compute_loss(
                x, y, y_pred, sample_weight, training), loss.dtype)
        return loss

    def get_config(self):
        ode = self.ode.get_config()
        config = {key: ode[key] for key in (
            "dynamics", "t0", "t1", "rtol", "atol", "solver", "gradient")}
        config.update(trace=self.trace, noise=self.noise,
                      kinetic_energy=self.kinetic_energy,
                      jacobian_norm=self.jacobian_norm, seed=self.seed,
                      name=self.name, trainable=self.trainable,
                      dtype=keras.dtype_policies.serialize(self.dtype_policy))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["dynamics"] = keras.saving.deserialize_keras_object(
            config["dynamics"])
        for key, module in (("solver", solvers), ("gradient", gradients)):
            if isinstance(config.get(key), dict):
                config[key] = module.get(config[key])
        return cls(**config)


def _carry_weights(method, args, kwargs):
    """`method`'s arguments with `x` as the (ignored) `y` where arrays come
    with a `sample_weight` but no `y`: Keras drops the weights of `(x, None,
    weights)`. Returns the new `args` and `kwargs`."""
    bound = inspect.signature(method).bind(*args, **kwargs)
    arguments = bound.arguments
    data = [arguments.get(key) for key in ("x", "y", "sample_weight")]
    if _drops_weights(*data):  # x, or the data of `[x, *context]`
        arguments["y"] = _as_list(data[0])[0]
    validation = arguments.get("validation_data")
    if isinstance(validation, (tuple, list)) and len(validation) == 3 and (
            _drops_weights(*validation)):
        x, _, weights = validation
        arguments["validation_data"] = (x, _as_list(x)[0], weights)
    return bound.args, bound.kwargs


def _drops_weights(x, y, sample_weight):
    return (hasattr(x, "shape") or isinstance(x, (list, tuple))) and (
        y is None and sample_weight is not None)


def _as_list(context):
    """`context` (a tensor, a list of them, or None) as a list."""
    if context is None:
        return []
    return list(context) if isinstance(context, (list, tuple)) else [context]


class _NegativeLogLikelihood(keras.losses.Loss):
    """`-log p(x)` from the model's output `log p(x)` (no labels)."""

    def call(self, y_true, y_pred):
        return -y_pred


def _standard_normal_log_prob(z):
    """`log N(z; 0, I)` per example, over all axes but the first."""
    axes = list(range(1, len(z.shape)))
    size = math.prod(z.shape[1:])
    return (-0.5 * keras.ops.sum(keras.ops.square(z), axis=axes)
            - 0.5 * size * math.log(2 * math.pi))
