"""One evaluation of the README model's dynamics (or its whole solve, or
the layers around its ODE), ours against PyTorch's and torchdiffeq's.

    python -m benchmarks.peers.dynamics_cost [--rounds 3] [--repeats 50]

A train step with a fixed-step solver and backprop is little more than its
dynamics' evaluations, forward and backward, so the kernels of the two
frameworks bound what any solver code can win there. This times them alone:
the dynamics of `examples/mnist.py` (two 3x3 convolutions 64->64 with tanh,
on a 128x6x6x64 state), as a compiled `tf.function` with Keras' layers (this
Python) and as `torchdiffeq_step.Dynamics` (`.venv-torch`), each in a fresh
process, alternated for `--rounds` rounds. Each run reports the median over
`--repeats` calls of the forward evaluation and of the forward evaluation
with the gradient to the state and to every weight (what backprop through a
solver step differentiates). Prints one JSON object: per framework the
median over rounds, `ratio` (ours over PyTorch's) for both, every round's
raw result and the machine.

`--part around` times instead the rest of the model, the ODE taken out:
the down-sampling layers and the head, from 28x28 images to logits, with
the gradient to every weight (what a train step adds to the solve). It
also times each of its `STAGES` alone (`stages`), with the gradient to the
stage's input and weights, to show which layers differ between the two
frameworks.

`--part ode` times the whole solve of the same state, the `NeuralODE`
layer against torchdiffeq's `ODEBlock` of `torchdiffeq_step.py` with the
solver and gradient that `--solver`, `--gradient` and `--num-steps` choose
(as in `train_step.py`): a train step's solve, forward and backward, and
nothing else. Each run also reports its evaluations of the dynamics in one
forward solve (`nfe_forward`).
"""

import argparse
import json
import pathlib
import statistics
import sys

from benchmarks.machine import describe, provenance
from benchmarks.peers.run import run_json
from benchmarks.profile_step import median_time
from benchmarks.train_step import SOLVE_DEFAULTS, add_solve_arguments

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIELDS = ["forward_s", "forward_backward_s"]
# torchdiffeq_step.METHODS, named here without importing torch.
PEER_SOLVERS = ["dopri5", "tsit5", "bosh3", "rk4"]
# The layers around the ODE in stages that both models have: a name, the
# stage's layers in `without_ode`'s Keras model and its modules in
# torchdiffeq_step's model without the ODE block. (Keras puts the ReLU
# inside the convolution and the padding in a layer; PyTorch the other way
# round.)
STAGES = [
    ("conv 3x3 1->64, relu", slice(0, 1), slice(0, 2)),
    ("group norm 26x26x64", slice(1, 2), slice(2, 3)),
    ("pad, conv 4x4/2, relu", slice(2, 4), slice(3, 5)),
    ("group norm 13x13x64", slice(4, 5), slice(5, 6)),
    ("pad, conv 4x4/2", slice(5, 7), slice(6, 7)),
    ("head: group norm 6x6x64, relu, mean, dense", slice(7, None),
     slice(7, None)),
]


def measure_tensorflow(repeats, batch_size, part="dynamics",
                       solve=SOLVE_DEFAULTS):
    import keras
    import numpy as np
    import tensorflow as tf
    from examples.mnist_common import (build_model, ode_layer,
                                       solver_and_gradient, without_ode)

    keras.utils.set_random_seed(0)
    solver, gradient = solver_and_gradient(
        solve["solver"], solve["num_steps"], solve["gradient"])
    model = build_model(solver=solver, gradient=gradient)
    rng = np.random.default_rng(0)
    if part in ("dynamics", "ode"):
        ode = ode_layer(model)
        net = ode.dynamics if part == "dynamics" else ode
        x = tf.constant(rng.normal(size=(batch_size, 6, 6, 64))
                        .astype("float32"))
        wrt = [x]  # the state's gradient too
    else:
        net = without_ode(model)
        x = tf.constant(rng.random((batch_size, 28, 28, 1), "float32"))
        wrt = []

    def times(net, x, wrt):
        @tf.function
        def forward():
            return net(x)

        @tf.function
        def forward_backward():
            with tf.GradientTape() as tape:
                tape.watch(wrt)
                f = net(x)
            return tape.gradient(f, [*wrt, *net.trainable_variables])

        # `.numpy()` waits for the result.
        return {"forward_s": median_time(lambda: forward().numpy(), repeats),
                "forward_backward_s": median_time(
                    lambda: [g.numpy() for g in forward_backward()], repeats)}

    result = {"library": "tensorflow", "version": tf.__version__,
              **times(net, x, wrt)}
    if part == "ode":
        net(x)
        result["nfe_forward"] = float(ode.num_forward_evals)
    if part == "around":
        result["stages"] = {}
        for name, layers, _ in STAGES:
            stage = keras.Sequential(net.layers[layers])
            result["stages"][name] = times(stage, x, wrt)
            x = stage(x)
            wrt = [x]  # later stages: the gradient to their input too
    return result


def measure_torch(repeats, batch_size, threads, part="dynamics",
                  solve=SOLVE_DEFAULTS):
    import torch
    from torch import nn

    from benchmarks.peers.torchdiffeq_step import (Dynamics, ODEBlock,
                                                   build_model)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if part == "dynamics":
        dynamics = Dynamics()
        net = lambda h: dynamics(0.0, h)  # noqa: E731
        parameters = list(dynamics.parameters())
        x = torch.randn(batch_size, 64, 6, 6)
    elif part == "ode":
        dynamics = Dynamics()
        net = ODEBlock(dynamics, solve["solver"], solve["gradient"],
                       solve["num_steps"])
        parameters = list(net.parameters())
        x = torch.randn(batch_size, 64, 6, 6)
    else:
        model = build_model()
        net = nn.Sequential(*[m for m in model if not isinstance(m, ODEBlock)])
        parameters = list(net.parameters())
        x = torch.rand(batch_size, 1, 28, 28)

    def times(net, x, parameters, to_input):
        def forward():
            with torch.no_grad():
                return net(x)

        def forward_backward():
            inputs = x.clone().requires_grad_(to_input)
            f = net(inputs)
            wrt = [inputs] if to_input else []
            return torch.autograd.grad(f, [*wrt, *parameters],
                                       torch.ones_like(f))

        return {"forward_s": median_time(forward, repeats),
                "forward_backward_s": median_time(forward_backward, repeats)}

    result = {"library": "torch", "version": torch.__version__,
              **times(net, x, parameters, part != "around")}
    if part == "ode":
        dynamics.evals = 0
        with torch.no_grad():
            net(x)
        result["nfe_forward"] = float(dynamics.evals)
    if part == "around":
        result["stages"] = {}
        for i, (name, _, modules) in enumerate(STAGES):
            stage = net[modules]
            result["stages"][name] = times(stage, x, list(stage.parameters()),
                                           i > 0)
            with torch.no_grad():
                x = stage(x)
    return result


def run_child(library, repeats, batch_size, threads, part="dynamics",
              solve=SOLVE_DEFAULTS):
    python = sys.executable if library == "tensorflow" else str(
        ROOT / ".venv-torch/bin/python")
    result = run_json(
        [python, "-m", "benchmarks.peers.dynamics_cost", "--child", library,
         "--repeats", str(repeats), "--batch-size", str(batch_size),
         "--threads", str(threads), "--part", part, "--solver",
         solve["solver"], "--gradient", solve["gradient"], "--num-steps",
         str(solve["num_steps"])], library)
    if result is None:
        sys.exit(f"{library} failed: see above.")
    return result


def summarize(runs):
    """Per library the median over rounds of each time, and `ratio` (ours
    over PyTorch's); with `stages`, the same for each stage."""
    summary = {library: {field: statistics.median(r[field] for r in results)
                         for field in FIELDS}
               for library, results in runs.items()}
    summary["ratio"] = {field: summary["tensorflow"][field]
                        / summary["torch"][field] for field in FIELDS}
    if "stages" in runs["tensorflow"][0]:
        summary["stages"] = {
            name: summarize({library: [r["stages"][name] for r in results]
                             for library, results in runs.items()})
            for name, *_ in STAGES}
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2,
                        help="PyTorch's intra-op threads (as the peers' "
                             "train steps)")
    parser.add_argument("--part", choices=["dynamics", "ode", "around"],
                        default="dynamics",
                        help="the ODE's dynamics, its whole solve, or the "
                        "layers around the ODE (default: %(default)s)")
    add_solve_arguments(parser)
    parser.add_argument("--child", choices=["tensorflow", "torch"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    solve = {key: getattr(args, key) for key in SOLVE_DEFAULTS}
    if args.part != "ode" and solve != SOLVE_DEFAULTS:
        parser.error("--solver, --gradient and --num-steps apply to "
                     "--part ode only")
    if args.solver not in PEER_SOLVERS:
        parser.error(f"--solver: one of {PEER_SOLVERS} (those of "
                     f"torchdiffeq_step.py), not {args.solver!r}")
    if args.child == "tensorflow":
        print(json.dumps(measure_tensorflow(args.repeats, args.batch_size,
                                            args.part, solve)))
        return
    if args.child == "torch":
        print(json.dumps(measure_torch(args.repeats, args.batch_size,
                                       args.threads, args.part, solve)))
        return
    runs = {"tensorflow": [], "torch": []}
    for _ in range(args.rounds):
        for library in runs:
            runs[library].append(run_child(library, args.repeats,
                                           args.batch_size, args.threads,
                                           args.part, solve))
    print(json.dumps({**summarize(runs), "runs": runs, "part": args.part,
                      **(solve if args.part == "ode" else {}),
                      "batch_size": args.batch_size, "rounds": args.rounds,
                      "repeats": args.repeats, "threads": args.threads,
                      "machine": describe(), **provenance()}, indent=1))


if __name__ == "__main__":
    main()
