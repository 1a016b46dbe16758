"""ODE solvers for `NeuralODE`, chosen as Keras chooses optimizers.

`NeuralODE(..., solver="tsit5")` takes a solver's name with its default
options; `NeuralODE(..., solver=solvers.Tsit5(max_num_steps=200))` sets
them. The layer's `rtol` and `atol` apply to the adaptive solvers.

| name              | class           | order | evaluations a step | steps    |
| ----------------- | --------------- | ----- | ------------------ | -------- |
| `"dopri5"`        | `DormandPrince` | 5(4)  | 6                  | adaptive |
| `"tsit5"`         | `Tsit5`         | 5(4)  | 6                  | adaptive |
| `"bosh3"`         | `Bosh3`         | 3(2)  | 3                  | adaptive |
| `"adaptive_heun"` | `AdaptiveHeun`  | 2(1)  | 2                  | adaptive |
| `"euler"`         | `Euler`         | 1     | 1                  | fixed    |
| `"midpoint"`      | `Midpoint`      | 2     | 2                  | fixed    |
| `"rk4"`           | `RK4`           | 4     | 4                  | fixed    |

The adaptive solvers take each step with an embedded error estimate, accept
it when the root mean square of the error scaled by `atol + rtol * |y|` is
at most 1 (the norm of Hairer's DOPRI5, scipy and torchdiffeq), end their
last step on the last output time (a hair past it), and return states
between steps by quartic interpolation (cubic Hermite for Bosh3 and Heun's
method). They run in the loop of `tfp.math.ode.DormandPrince`.
Fixed-step solvers take a static number of equal steps, landing on every
output time: no step budget to exhaust, and shapes that XLA compiles well.
"""

import keras

from keras_node._options import (Options, invalid, positive_float,
                                 positive_int, resolve)

__all__ = ["Solver", "DormandPrince", "Tsit5", "Bosh3", "AdaptiveHeun",
           "Euler", "Midpoint", "RK4", "get"]

# The most steps a fixed-step solve may take (`num_steps`, or the steps
# that `step_size` makes over the layer's span).
MAX_FIXED_STEPS = 10**7


class Solver(Options):
    """Base class of the solvers. `name` is the string that selects it."""

    adaptive = False

    def options(self):
        """Plain keyword arguments of the solve (for the backends)."""
        return {"method": self.name, **self.get_config()}


class AdaptiveSolver(Solver):
    """An embedded Runge-Kutta pair with step-size control.

    Args:
        first_step_size: the size of the first step, a positive float, or
            `None` to choose it from the problem with Hairer's heuristic (as
            torchdiffeq and DifferentialEquations.jl do), which costs one
            evaluation and saves many. Defaults to `None`.
        max_num_steps: the most steps, accepted and rejected, that one solve
            may take before it fails with an error (on JAX, and under XLA on
            TensorFlow, the solve returns NaN instead): the forward solve, or
            the adjoint's backward solve between two output times (one
            segment a time of `save_at`). Defaults to `1000`.
    """

    adaptive = True

    def __init__(self, first_step_size=None, max_num_steps=1000):
        self.first_step_size = (
            None if first_step_size is None
            else positive_float("first_step_size", first_step_size))
        self.max_num_steps = positive_int("max_num_steps", max_num_steps,
                                          upper=2**31 // 8)

    def get_config(self):
        return {"first_step_size": self.first_step_size,
                "max_num_steps": self.max_num_steps}


@keras.saving.register_keras_serializable(package="keras_node")
class DormandPrince(AdaptiveSolver):
    """Dormand-Prince 5(4): `tfp.math.ode.DormandPrince`, the default.

    torchdiffeq's `"dopri5"`, diffrax's `Dopri5`, MATLAB's `ode45`. Six
    evaluations a step (first same as last).
    """

    name = "dopri5"


@keras.saving.register_keras_serializable(package="keras_node")
class Tsit5(AdaptiveSolver):
    """Tsitouras 5(4) (2011), the DiffEqFlux tutorial's solver.

    SciML's default, diffrax's `Tsit5` (torchdiffeq 0.2.5 has none). Six
    evaluations a step (first same as last), usually a little more accurate
    than Dormand-Prince for the same steps.
    """

    name = "tsit5"


@keras.saving.register_keras_serializable(package="keras_node")
class Bosh3(AdaptiveSolver):
    """Bogacki-Shampine 3(2), MATLAB's `ode23`: cheap, for loose tolerances.

    torchdiffeq's `"bosh3"`, diffrax's `Bosh3`. Three evaluations a step
    (first same as last).
    """

    name = "bosh3"


@keras.saving.register_keras_serializable(package="keras_node")
class AdaptiveHeun(AdaptiveSolver):
    """Heun's method 2(1), with Euler's for the error estimate.

    torchdiffeq's `"adaptive_heun"`, diffrax's `Heun`. Two evaluations a
    step (first same as last), the cheapest step of the adaptive solvers;
    being of order 2, it takes many more steps than Bosh3 as the tolerance
    tightens. (torchdiffeq's other second-order pair, `"fehlberg2"`, is
    left out: stepping with the second-order solution of Fehlberg's 1(2)
    pair, it estimates the error as `dt (k3 - k1) / 512`, far below the
    step's own error unless the steps are tiny.)
    """

    name = "adaptive_heun"


class FixedStepSolver(Solver):
    """A Runge-Kutta method with equal steps.

    Takes `num_steps` or `step_size`, not both. With `save_at`, every output
    time is a step boundary: each interval between output times takes the
    fewest equal steps no longer than `step_size` (with `num_steps`, the
    whole span divided by `num_steps`).

    Args:
        num_steps: the number of steps from `t0` to `t1`, a positive
            integer. Defaults to `10` when `step_size` is not given.
        step_size: the longest step, a positive float. Defaults to `None`.
        unroll: `True` to lay the steps out one after another in the
            program instead of running them in a loop, as the `unroll` of
            Keras' recurrent layers. The program then grows with the number
            of steps (tracing and compiling take longer), so keep it for a
            few steps. It pays under TensorFlow's XLA on a CPU
            (`jit_compile=True`), which runs a convolution's weight
            gradient inside a loop many times slower than outside (on JAX
            the layer avoids that itself).
            Defaults to `False`.
    """

    def __init__(self, num_steps=None, step_size=None, unroll=False):
        if num_steps is not None and step_size is not None:
            raise ValueError(
                f"{type(self).__name__} takes `num_steps` or `step_size`, not "
                f"both. Received: num_steps={num_steps!r}, "
                f"step_size={step_size!r}")
        if step_size is None:
            self.num_steps = positive_int(
                "num_steps", 10 if num_steps is None else num_steps,
                upper=MAX_FIXED_STEPS)
            self.step_size = None
        else:
            self.num_steps = None
            self.step_size = positive_float("step_size", step_size)
        if not isinstance(unroll, bool):
            raise invalid(TypeError, "unroll", "True or False", unroll)
        self.unroll = unroll

    def get_config(self):
        return {"num_steps": self.num_steps, "step_size": self.step_size,
                "unroll": self.unroll}


@keras.saving.register_keras_serializable(package="keras_node")
class Euler(FixedStepSolver):
    """The explicit Euler method: order 1, one evaluation a step.
    """

    name = "euler"


@keras.saving.register_keras_serializable(package="keras_node")
class Midpoint(FixedStepSolver):
    """The explicit midpoint method: order 2, two evaluations a step.
    """

    name = "midpoint"


@keras.saving.register_keras_serializable(package="keras_node")
class RK4(FixedStepSolver):
    """The classical Runge-Kutta method: order 4, four evaluations a step.
    """

    name = "rk4"


_SOLVERS = (DormandPrince, Tsit5, Bosh3, AdaptiveHeun, Euler, Midpoint,
            RK4)
# Each solver's docstring ends with its family's arguments.
for _cls in _SOLVERS:
    _family = AdaptiveSolver if _cls.adaptive else FixedStepSolver
    _cls.__doc__ = (_cls.__doc__.rstrip() + "\n\n"
                    + _family.__doc__.split("\n\n", 1)[1])


def get(identifier):
    """A solver from a name (`"dopri5"`, ...), a config dict or a solver."""
    return resolve(identifier, Solver, _SOLVERS, "solver")
