"""How `NeuralODE` differentiates its solve, chosen as Keras chooses optimizers.

`NeuralODE(..., gradient="backprop")` takes a method's name with its default
options; `NeuralODE(..., gradient=gradients.Adjoint(rtol=1e-6))` sets them.

- `"adjoint"` (`Adjoint`, the default): optimise-then-discretise. The
  backward pass solves the adjoint equation from `t1` back to `t0`; memory
  does not grow with the number of steps. The gradient is that of the ODE,
  up to the backward solve's error: it approximates, but is not, the
  derivative of the forward solver's arithmetic (torchdiffeq's
  `odeint_adjoint`, diffrax's `BacksolveAdjoint`).
- `"backprop"` (`Backprop`): discretise-then-optimise. Reverse-mode
  differentiation through the solver's own operations: the exact gradient of
  the discrete solve (for the steps it took; step sizes are not
  differentiated), with memory growing with the number of steps
  (torchdiffeq's `odeint`, diffrax's `RecursiveCheckpointAdjoint` without
  checkpointing).
"""

import keras

from keras_node._options import Options, invalid, positive_float, resolve

__all__ = ["Gradient", "Adjoint", "Backprop", "get"]


class Gradient(Options):
    """Base class of the gradient methods."""


@keras.saving.register_keras_serializable(package="keras_node")
class Adjoint(Gradient):
    """The adjoint method: memory constant in the number of solver steps.

    The backward pass integrates the adjoint system
    `(h, a, g)' = (f, -a^T df/dh, -a^T df/dtheta)` from the last output time
    back to `t0`, restarting `h` from the forward solution at each output
    time, with the layer's solver. Gradients reach the initial state and
    every floating weight that the dynamics read.

    Args:
        rtol: relative tolerance of the backward solve (adaptive solvers
            only), a positive float. Defaults to the layer's `rtol`.
        atol: absolute tolerance of the backward solve. Defaults to the
            layer's `atol`.
        norm: the backward solve's error norm (adaptive solvers only).
            `"full"` is torchdiffeq's default: the largest of the
            root-mean-square errors of the state, of the adjoint and of each
            parameter gradient. `"seminorm"` leaves out the parameter
            gradients (Kidger, Chen & Lyons 2021, "Hey, that's not an ODE"),
            which feed back into nothing: often fewer backward steps, rarely
            a few more (another sequence of steps; torchdiffeq's seminorm
            does the same). Defaults to `"seminorm"`.
    """

    name = "adjoint"

    def __init__(self, rtol=None, atol=None, norm="seminorm"):
        self.rtol = None if rtol is None else positive_float("rtol", rtol)
        self.atol = None if atol is None else positive_float("atol", atol)
        if norm not in ("full", "seminorm"):
            raise invalid(ValueError, "norm", '"full" or "seminorm"', norm)
        self.norm = norm

    def get_config(self):
        return {"rtol": self.rtol, "atol": self.atol, "norm": self.norm}


@keras.saving.register_keras_serializable(package="keras_node")
class Backprop(Gradient):
    """Backpropagation through the solver: the discrete solve's gradient.

    Exact for the arithmetic of the steps taken (step sizes are held fixed,
    as in torchdiffeq and diffrax): a fixed-step solver's gradient matches
    finite differences of its solve, an adaptive solver's differs from them
    by how the step sizes would move (about `rtol`); memory grows with
    the number of steps, as every stage is kept for the backward pass.

    On JAX, which cannot reverse-differentiate an unbounded loop, an
    adaptive solver then takes its steps in a loop bounded by its
    `max_num_steps` and checkpointed, as diffrax's
    `RecursiveCheckpointAdjoint` does: the same steps and outputs as the
    adjoint's forward solve; memory for about `2 sqrt(max_num_steps)`
    solver states (the state, its derivative, the last step's
    interpolation) and one step's stages, however many steps it takes; the
    backward pass reruns each forward step twice. A fixed-step solver
    there, with unevenly spaced `save_at` times, keeps every interval's
    stages for as many steps as the longest interval takes.
    """

    name = "backprop"


def get(identifier):
    """A gradient method from `"adjoint"`, `"backprop"`, a dict or an object."""
    return resolve(identifier, Gradient, (Adjoint, Backprop), "gradient")
