"""Every use of TensorFlow Probability's private API, in one place.

keras-node's adaptive solvers run inside the loop of
`tfp.math.ode.DormandPrince` (stepping to each output time, dense output),
with a Runge-Kutta step of its own. That needs five things TFP does not
publish, all from `tfp.math.ode.dormand_prince` (or its JAX substrate's
twin):

- `DormandPrince._solve`: the solve without the custom-gradient wrapper of
  the public `solve` (keras-node brings its own gradients);
- `DormandPrince._step`: overridden, to take our step (`Substrate.solver`);
- `_TABLEAU`: Dormand-Prince's coefficients;
- `_RungeKuttaSolverInternalState`: the loop's state, to start it with our
  first step size and to return it from our step;
- `rk_util.nest_where`: `where` over a nest.

They were checked against tensorflow-probability 0.25.0 (TensorFlow) and
tfp-nightly 0.26.0.dev20261027 (TFP's JAX substrate). `substrate()` refuses
other minor versions with a message naming the range and the version found,
and, in a supported version, any of the five that is missing.
"""

import collections
import functools
import re

# The TFP minor versions whose private API above was checked.
SUPPORTED = ((0, 25), (0, 26))
_CHECKED = "tensorflow-probability 0.25.0, tfp-nightly 0.26.0.dev20261027"
_PRIVATE = ("_TABLEAU", "_RungeKuttaSolverInternalState", "rk_util")


def check_version(version):
    """Raises ImportError unless TFP `version` (a string) is supported."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or not (SUPPORTED[0] <= tuple(map(int, match.groups()))
                             <= SUPPORTED[-1]):
        low, high = (".".join(map(str, v)) for v in (SUPPORTED[0],
                                                     SUPPORTED[-1]))
        raise ImportError(
            f"keras-node needs TensorFlow Probability {low} to {high}.x "
            f"(checked: {_CHECKED}), but found version {version}. Install "
            f"one of those, e.g. pip install 'tensorflow-probability[tf]>="
            f"{low},<0.26' (TensorFlow) or the tfp-nightly that keras-node's "
            "`jax` extra pins (JAX).")


def check_private(dp, version):
    """Raises ImportError unless the module `dp` has what we use of it."""
    missing = [name for name in _PRIVATE if not hasattr(dp, name)] + [
        f"DormandPrince.{name}" for name in ("_solve", "_step")
        if not hasattr(getattr(dp, "DormandPrince", None), name)]
    if missing:
        raise ImportError(
            f"TensorFlow Probability {version} lacks {', '.join(missing)}, "
            f"which keras-node uses (checked: {_CHECKED}).")


# What `_solver` gets of one substrate: its `tf` namespace, and the private
# pieces behind functions.
# `asserts`: whether TFP's assertions raise (TensorFlow); on JAX a solve's
# status reports failures instead.
Substrate = collections.namedtuple(
    "Substrate",
    ["tf", "asserts", "dopri5_tableau", "state", "nest_where", "solve"])


@functools.lru_cache(maxsize=None)
def substrate(backend):
    """The `Substrate` of TFP for Keras' `backend` ("tensorflow" or "jax")."""
    if backend == "jax":
        import tensorflow_probability.substrates.jax as tfp
        from tensorflow_probability.substrates.jax.math.ode import (
            dormand_prince as dp)
    else:
        import tensorflow_probability as tfp
        from tensorflow_probability.python.math.ode import (
            dormand_prince as dp)
    check_version(tfp.__version__)
    check_private(dp, tfp.__version__)

    class Solver(dp.DormandPrince):
        """TFP's adaptive loop, taking the steps of `step`."""

        def __init__(self, step, **kwargs):
            # No TFP step budget: `step` keeps its own.
            super().__init__(max_num_steps=None, **kwargs)
            self._keras_node_step = step

        def _step(self, solver_state, diagnostics, max_ode_fn_evals, ode_fn,
                  atol, rtol, safety, ifactor, dfactor):
            # `step` keeps its own budget and step-size controller.
            del max_ode_fn_evals, safety, ifactor, dfactor
            return self._keras_node_step(solver_state, diagnostics, ode_fn,
                                         atol, rtol)

    def solve(step, fn, t0, y0, times, initial, rtol, atol):
        """TFP's loop from `t0` over `times`, from the state `initial`.

        `step(solver_state, diagnostics, ode_fn, atol, rtol)` takes one step
        (with its own step-size controller) and returns the new solver state
        and diagnostics. Returns TFP's `Results`.
        """
        solver = Solver(step, rtol=rtol, atol=atol)
        return solver._solve(fn, t0, y0, solution_times=times,
                             previous_solver_internal_state=initial)

    t = dp._TABLEAU
    return Substrate(
        tf=dp.tf,
        asserts=backend != "jax",
        dopri5_tableau=(t.a, t.b, t.c_sol, t.c_error, t.c_mid),
        state=dp._RungeKuttaSolverInternalState,
        nest_where=dp.rk_util.nest_where,
        solve=solve,
    )
