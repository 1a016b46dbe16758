"""Work against precision of the adaptive solvers, beside scipy's; JSON.

    python -m benchmarks.work_precision [--problems rotation lotka_volterra
        mlp] [--tols 1e-3 1e-4 ...]
    KERAS_BACKEND=jax .venv-jax/bin/python -m benchmarks.work_precision

For each problem and tolerance (`rtol = atol`), the float64 forward solve of
each adaptive solver of `NeuralODE` (traced, as `fit` runs it): its
evaluations, accepted and rejected steps, and its largest error against the
reference; beside them scipy's `solve_ivp` with `RK45` (the same
Dormand-Prince pair, the same error norm) and `DOP853` at the same
tolerance (their evaluations, `nfev`). The problems, each a batch of
states solved at once (scipy gets the batch as one flat state, so that the
root mean square error norm is over the same numbers):

- `rotation`: `dh/dt = h A^T`, a damped rotation (the tests' linear
  problem), two states over [0, 2]; reference: the matrix exponential.
- `lotka_volterra`: `dx/dt = 1.5 x - x y`, `dy/dt = x y - 3 y` from (1, 1)
  and (2, 0.5) over [0, 10]; reference: scipy's DOP853 at 1e-13.
- `mlp`: a neural ODE's dynamics at initialisation, `W2 tanh(W1 h + b1) +
  b2` (2 -> 32 -> 2, Glorot-uniform weights, seed 0), four states over
  [0, 1]; reference: scipy's DOP853 at 1e-13.

A solve that does not finish within `--max-num-steps` is recorded with
`"nfe": null, "error": null`. Prints one JSON object with the machine.
"""

import argparse
import pathlib

import numpy as np

from benchmarks.machine import describe, provenance
from benchmarks.peers.run import print_json

SOLVERS = ("dopri5", "tsit5", "bosh3", "adaptive_heun")
PEERS = ("RK45", "DOP853")
TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
A = np.array([[-0.5, 2.0], [-2.0, -0.5]])


def _mlp_weights():
    rng = np.random.default_rng(0)
    glorot = lambda n, m: rng.uniform(-1, 1, (n, m)) * np.sqrt(6 / (n + m))
    return glorot(2, 32), np.zeros(32), glorot(32, 2), np.zeros(2)


def problem(name):
    """`(f, h0, t1, exact)`: `f(h)` on a batch of states in numpy, and
    `exact(h0, t1)` the reference solution."""
    import scipy.integrate
    import scipy.linalg

    if name == "rotation":
        return (lambda h: h @ A.T, np.array([[1.0, 0.0], [0.5, -2.0]]), 2.0,
                lambda h0, t1: h0 @ scipy.linalg.expm(A * t1).T)
    if name == "lotka_volterra":
        def f(h):
            x, y = h[:, :1], h[:, 1:]
            return np.concatenate([1.5 * x - x * y, x * y - 3 * y], 1)
        h0, t1 = np.array([[1.0, 1.0], [2.0, 0.5]]), 10.0
    else:
        w1, b1, w2, b2 = _mlp_weights()
        f = lambda h: np.tanh(h @ w1 + b1) @ w2 + b2
        h0 = np.random.default_rng(1).normal(size=(4, 2))
        t1 = 1.0

    def exact(h0, t1):
        flat = lambda t, y: f(y.reshape(h0.shape)).ravel()
        solution = scipy.integrate.solve_ivp(
            flat, (0.0, t1), h0.ravel(), method="DOP853", rtol=1e-13,
            atol=1e-13)
        return solution.y[:, -1].reshape(h0.shape)

    return f, h0, t1, exact


def dynamics(name):
    """The problem's dynamics as a float64 Keras layer."""
    import keras

    if name == "rotation":
        layer = keras.layers.Dense(2, use_bias=False, dtype="float64")
        layer.build((None, 2))
        layer.set_weights([A.T])
        return layer
    if name == "mlp":
        w1, b1, w2, b2 = _mlp_weights()
        # On JAX, Keras 3.15's "tanh" computes float64 in float32 (the
        # troubleshooting guide's float64 section).
        activation = "tanh"
        if keras.backend.backend() == "jax":
            import jax.numpy as jnp

            activation = jnp.tanh
        model = keras.Sequential([
            keras.layers.Dense(32, activation=activation, dtype="float64"),
            keras.layers.Dense(2, dtype="float64")])
        model.build((None, 2))
        model.set_weights([w1, b1, w2, b2])
        return model

    class LotkaVolterra(keras.layers.Layer):
        def call(self, h):
            x, y = h[:, :1], h[:, 1:]
            return keras.ops.concatenate([1.5 * x - x * y, x * y - 3 * y], 1)

    return LotkaVolterra(dtype="float64")


def traced(layer):
    """`layer`'s call as `fit` runs it: a `tf.function` on TensorFlow; on
    JAX the layer compiles its solve itself."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(layer)
    return layer


def ours(name, solver, tol, max_num_steps):
    from keras_node import NeuralODE, solvers

    _, h0, t1, _ = problem(name)
    ode = NeuralODE(dynamics(name), t1=t1, rtol=tol, atol=tol,
                    solver=type(solvers.get(solver))(
                        max_num_steps=max_num_steps), dtype="float64")
    try:
        h1 = np.asarray(traced(ode)(h0))
    except Exception as error:  # an exhausted budget, on TensorFlow
        if "max_num_steps" not in str(error):
            raise
        h1 = np.full_like(h0, np.nan)
    if not np.all(np.isfinite(h1)):  # unfinished: no counts to report
        return h1, {"nfe": None}
    return h1, {"nfe": float(ode.num_forward_evals),
                "steps_accepted": float(ode.steps_accepted),
                "steps_rejected": float(ode.steps_rejected)}


def peer(name, method, tol):
    import scipy.integrate

    f, h0, t1, _ = problem(name)
    solution = scipy.integrate.solve_ivp(
        lambda t, y: f(y.reshape(h0.shape)).ravel(), (0.0, t1), h0.ravel(),
        method=method, rtol=tol, atol=tol)
    return solution.y[:, -1].reshape(h0.shape), {"nfe": solution.nfev}


def run(problems, tols, max_num_steps):
    rows = {}
    for name in problems:
        _, h0, t1, exact = problem(name)
        reference = exact(h0, t1)
        rows[name] = {}
        for label in (*SOLVERS, *(f"scipy_{m}" for m in PEERS)):
            points = []
            for tol in tols:
                if label.startswith("scipy_"):
                    h1, counts = peer(name, label[len("scipy_"):], tol)
                else:
                    h1, counts = ours(name, label, tol, max_num_steps)
                error = float(np.max(np.abs(h1 - reference)))
                points.append({"tol": tol, **counts,
                               "error": error if np.isfinite(error)
                               else None})
            rows[name][label] = points
    return rows


def main(argv=None):
    import keras

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+",
                        choices=("rotation", "lotka_volterra", "mlp"),
                        default=["rotation", "lotka_volterra", "mlp"])
    parser.add_argument("--tols", type=float, nargs="+", default=list(TOLS),
                        help="rtol = atol of each solve (default: 1e-3 to "
                        "1e-10)")
    parser.add_argument("--max-num-steps", type=int, default=100_000)
    parser.add_argument("--json-out", type=pathlib.Path)
    args = parser.parse_args(argv)
    if min(args.tols) <= 0:
        parser.error(f"--tols must be positive, got {min(args.tols)}")
    if args.max_num_steps < 1:
        parser.error(f"--max-num-steps must be positive, got "
                     f"{args.max_num_steps}")
    import scipy

    result = {"benchmark": "work_precision",
              "backend": keras.backend.backend(), "scipy": scipy.__version__,
              "problems": run(args.problems, args.tols, args.max_num_steps),
              "machine": describe(), **provenance()}
    print_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
