"""How close each train step of the solver table runs to this CPU's
arithmetic peak, and what the goal of 0.7x the peer's step time asks.

    python -m benchmarks.peers.roofline --table runs/solver_table.json

A train step of the README's MNIST model is almost all convolutions, whose
floating-point operations the model and the evaluations of its dynamics
fix. Per example, a Conv2D or Dense call does 2 x (its kernel's size) x
(its output's positions) of them, and its backward pass twice that (the
gradients to its input and to its kernel), or once for a layer that reads
the images (they need no gradient). The dynamics cost their forward
count once per forward evaluation, twice per backward evaluation with
backprop (the vector-Jacobian product of a forward evaluation; where a run
does not count them, as torchdiffeq's, every forward evaluation is taken
as differentiated) and three times with the adjoint (the dynamics again
and their product). The rest (normalisations, activations, the solver's
own arithmetic, Adam) is left out, so a step's count is a lower bound.

`--table` is a `run.py --solver-table` JSON. Each of its configurations'
count over its median step time is the rate its step reached; over this
CPU's peak, the share of the peak. The peak is the best rate of a float32
product of two `--size` (4096) square matrices, by numpy or by the Keras
backend (TensorFlow's oneDNN kernels can beat numpy's BLAS: on an AVX-512
EPYC, 491-501 against 248-250 GFLOP/s); the JSON has both. For each of
ours, `goal_share` is the share that a step at 0.7x its torchdiffeq peer's
time would need. Run it on the machine that made the table. Prints a table
and one JSON object.
"""

import argparse
import json
import math
import pathlib
import time

import numpy as np

from benchmarks.machine import describe, provenance
from benchmarks.peers.run import DIFFRAX_ADJOINT, OURS, cell, print_json

GOAL = 0.7  # ours at most this times the peer's step time


def model_flops(model, ode):
    """Per example: the forward and backward operations of the Conv2D and
    Dense layers around `ode` in `model`, and one evaluation of `ode`'s
    dynamics."""
    def flops(layer):
        return 2 * math.prod(layer.kernel.shape) * math.prod(
            layer.output.shape[1:-1])

    forward = backward = 0
    for layer in model.layers:
        if layer is not ode and hasattr(layer, "kernel"):
            forward += flops(layer)
            backward += flops(layer) * (
                1 if layer.input is model.inputs[0] else 2)
    dynamics = sum(flops(layer) for layer in ode.dynamics.layers
                   if hasattr(layer, "kernel"))
    return {"around_forward": forward, "around_backward": backward,
            "dynamics": dynamics}


def gradient_of(name):
    """The gradient method of a solver table's label: ours and
    torchdiffeq's name it, diffrax's is in its library's name."""
    library, *rest = name.split()
    if library.startswith("diffrax-"):
        adjoint = library.split("-")[1]
        return next(gradient for gradient, matching in DIFFRAX_ADJOINT.items()
                    if matching == adjoint)
    return rest[1]


def step_flops(counts, batch_size, gradient, nfe_forward, nfe_backward):
    """A train step's operations, or None if its evaluations are unknown."""
    if nfe_forward is None:
        return None
    if gradient == "backprop":
        backward = 2 * (nfe_forward if nfe_backward is None else nfe_backward)
    elif nfe_backward is None:
        return None
    else:
        backward = 3 * nfe_backward
    evaluations = nfe_forward + backward
    return batch_size * (counts["around_forward"] + counts["around_backward"]
                         + evaluations * counts["dynamics"])


def sgemm_rates(size=4096, repeats=5):
    """The best rate, in operations a second, of a float32 product of two
    `size` x `size` matrices: by numpy, and by the Keras backend."""
    import keras

    def backend_product(a, b):
        product = keras.ops.matmul(a, b)
        # JAX computes asynchronously; TensorFlow has finished here.
        getattr(product, "block_until_ready", lambda: None)()

    rng = np.random.default_rng(0)
    a, b = (rng.random((size, size), dtype=np.float32) for _ in range(2))
    rates = {}
    for library, product, operands in (
            ("numpy", np.matmul, (a, b)),
            (keras.backend.backend(), backend_product,
             [keras.ops.convert_to_tensor(x) for x in (a, b)])):
        product(*operands)  # warm-up: threads, pages, kernels
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            product(*operands)
            best = min(best, time.perf_counter() - start)
        rates[library] = 2 * size**3 / best
    return rates


def rows(summary, counts, batch_size, peak):
    """Per configuration of the table's `summary`: its step's operations
    (GFLOP), their rate (GFLOP/s) and share of `peak`; for ours also what a
    step at `GOAL` times the peer's time would need."""
    result = {}
    for name, entry in summary.items():
        flops = step_flops(counts, batch_size, gradient_of(name),
                           entry["nfe_forward"], entry["nfe_backward"])
        step = entry["median_step_s"]
        row = {"gflop": None if flops is None else flops / 1e9,
               "median_step_s": step,
               "gflops": None if None in (flops, step) else flops / step / 1e9}
        row["share_of_peak"] = (None if row["gflops"] is None
                                else row["gflops"] * 1e9 / peak)
        if name.startswith(OURS + " ") and entry.get("peer"):
            peer_step = summary[entry["peer"]]["median_step_s"]
            row["goal_step_s"] = (None if peer_step is None
                                  else GOAL * peer_step)
            row["goal_share"] = (None if None in (flops, peer_step) else
                                 flops / (GOAL * peer_step) / peak)
        result[name] = row
    return result


def table(result):
    width = max(len(name) for name in result) + 2
    header = (f"{'configuration':<{width}}{'GFLOP':>8}{'step s':>9}"
              f"{'GFLOP/s':>9}{'of peak':>9}{'goal needs':>12}")
    lines = [header, "-" * len(header)]
    for name, row in result.items():
        lines.append(f"{name:<{width}}{cell(row['gflop'], '.1f'):>8}"
                     f"{cell(row['median_step_s'], '.3f'):>9}"
                     f"{cell(row['gflops'], '.0f'):>9}"
                     f"{cell(row['share_of_peak'], '.0%'):>9}"
                     f"{cell(row.get('goal_share'), '.0%'):>12}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=pathlib.Path, required=True,
                        help="a JSON written by run.py --solver-table")
    parser.add_argument("--size", type=int, default=4096,
                        help="the matrices' size for the peak rate")
    parser.add_argument("--json-out", type=pathlib.Path,
                        help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error("--size must be at least 1")
    try:
        solver_table = json.loads(args.table.read_text())
    except (OSError, ValueError) as error:
        parser.error(f"--table: cannot read {args.table} as JSON ({error})")
    if solver_table.get("benchmark") != "peers-solvers":
        parser.error(f"--table: {args.table} is not the JSON of "
                     "run.py --solver-table")
    if solver_table.get("gpu"):
        parser.error(f"--table: {args.table} was measured on a GPU; this "
                     "compares steps with the CPU's peak")

    import keras  # after the arguments: importing a backend takes seconds

    from examples.mnist_common import build_model, ode_layer

    model = build_model()
    counts = model_flops(model, ode_layer(model))
    rates = sgemm_rates(args.size)
    peak = max(rates.values())
    result = rows(solver_table["summary"], counts,
                  solver_table["batch_size"], peak)
    print(table(result))
    print_json({
        "benchmark": "roofline",
        "peak_gflops": peak / 1e9,
        "sgemm_size": args.size,
        "sgemm_gflops": {library: rate / 1e9
                         for library, rate in rates.items()},
        "per_example_flops": counts,
        "goal": GOAL,
        "rows": result,
        "table": {key: solver_table.get(key) for key in
                  ("date", "git_commit", "machine", "batch_size", "gpu")},
        "keras_backend": keras.backend.backend(),
        "numpy": np.__version__,
        "machine": describe(), **provenance(),
    }, args.json_out)


if __name__ == "__main__":
    main()
