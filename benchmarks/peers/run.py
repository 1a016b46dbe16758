"""Times our MNIST neural-ODE train step against torchdiffeq and diffrax.

    bash benchmarks/peers/setup.sh        # once: .venv-torch and .venv-jax
    python -m benchmarks.peers.run --rounds 3 --steps 10

Runs ours (`benchmarks/train_step.py --child 1e-3`, with this Python) and each
peer (`torchdiffeq_step.py`, `diffrax_step.py`, with its venv's Python) in
turn, each in a fresh process, for `--rounds` rounds (A B C ... A B C ...),
so that a slow spell of the machine hits them all alike. Every run does
`--warmup` untimed and `--steps` timed train steps of the same model, batch,
tolerances and data. Prints a table and a JSON object: per library the
median over rounds of the median step time, of the minimum step time, of the
forward and backward evaluations and of the peak resident memory, and
`ratio_to_ours` (its median step time over ours); plus every round's raw
result (a peer's with its versions), the command and its settings, the
machine, the date, the commit and the versions of this Python's packages
(ours'). A failed run is reported on stderr and left out.

`--gpu` runs them all on a GPU with this one Python (see the README here,
"On a GPU"): ours through `keras_jax_step.py` on Keras' JAX backend.

`--solver-table` runs, instead of ours and `--peers`, the configurations of
`SOLVER_TABLE` (solvers and gradient methods, see the README here; with
`--gpu`, `GPU_SOLVER_TABLE`) in the same way, and gives each of ours
`ratio_to_peer`, its median step time over torchdiffeq's with the same
solver and gradient, and `ratio_to_diffrax`, over diffrax's with the same
solver and the matching gradient (RecursiveCheckpointAdjoint for backprop,
BacksolveAdjoint for the adjoint) where the table has it.
"""

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys

from benchmarks.machine import describe, provenance

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OURS = "keras_node"
PEERS = ["torchdiffeq", "diffrax-backsolve-slices", "diffrax-recursive-slices",
         "diffrax-backsolve-stock", "diffrax-recursive-stock"]
DEFAULT_PEERS = PEERS[:4]
NUM_STEPS = 4  # the fixed-step solvers' steps over [0, 1]
# The solve without --solver-table: each script's default (a diffrax peer's
# gradient is in its name).
DEFAULT_SOLVE = {"solver": "dopri5", "gradient": "adjoint"}


def comparisons(*solves):
    """(library, solver, gradient) configurations: for each `(solver,
    gradient, peers)` of `solves`, ours with that solve, then each peer
    with the same solver (torchdiffeq with the same gradient; a diffrax
    peer's gradient is in its name), so that a round alternates each of
    ours with its peers, and a run cut short by a time limit leaves whole
    comparisons."""
    return [config for solver, gradient, peers in solves
            for config in [(OURS, solver, gradient),
                           *[(peer, solver,
                              gradient if peer == "torchdiffeq" else None)
                             for peer in peers]]]


# --solver-table: each solver and gradient method of ours against
# torchdiffeq's, and diffrax's where it has the matching one.
SOLVER_TABLE = comparisons(
    ("dopri5", "adjoint", ["torchdiffeq", "diffrax-backsolve-slices"]),
    ("tsit5", "adjoint", ["torchdiffeq"]),
    ("bosh3", "adjoint", ["torchdiffeq"]),
    ("dopri5", "backprop", ["torchdiffeq"]),
    ("tsit5", "backprop", ["torchdiffeq", "diffrax-recursive-slices"]),
    ("bosh3", "backprop", ["torchdiffeq"]),
    ("rk4", "backprop", ["torchdiffeq"]),
    ("rk4", "adjoint", ["torchdiffeq"]),
)
# --solver-table --gpu: ours runs on Keras' JAX backend; its adaptive
# solvers with the adjoint, and Tsit5 with backprop (a bounded, checkpointed
# loop there) against diffrax's `RecursiveCheckpointAdjoint`. Diffrax, on
# JAX too, is their closest peer (stock convolutions: the slices are for
# XLA:CPU).
GPU_SOLVER_TABLE = comparisons(
    *[(solver, "adjoint", ["torchdiffeq", "diffrax-backsolve-stock"])
      for solver in ("dopri5", "tsit5", "bosh3")],
    ("tsit5", "backprop", ["diffrax-recursive-stock"]),
    ("rk4", "backprop", ["torchdiffeq"]),
    ("rk4", "adjoint", ["torchdiffeq"]),
)
# A diffrax peer's adjoint, by the gradient method it matches.
DIFFRAX_ADJOINT = {"backprop": "recursive", "adjoint": "backsolve"}
FIELDS = ["median_step_s", "min_step_s", "nfe_forward", "nfe_backward",
          "peak_rss_mib", "peak_device_mib"]


def label(library, solver=None, gradient=None):
    return " ".join(filter(None, (library, solver, gradient)))


def command(library, steps, warmup, batch_size, gpu=False, solver=None,
            gradient=None):
    """The argv that runs `library` once and prints its JSON line.

    With `gpu`, every library runs with this Python (a GPU machine's one
    environment holding JAX, PyTorch and diffrax), ours on Keras' JAX
    backend and torchdiffeq on CUDA. `solver` and `gradient` (None: each
    script's default, Dormand-Prince with the adjoint) choose the solve.
    """
    common = ["--steps", str(steps), "--warmup", str(warmup),
              "--batch-size", str(batch_size)]
    if solver is not None:
        if library == OURS:
            common += ["--solver", solver, "--gradient", gradient,
                       "--num-steps", str(NUM_STEPS)]
        elif library == "torchdiffeq":
            common += ["--method", solver, "--gradient", gradient,
                       "--num-steps", str(NUM_STEPS)]
        else:  # diffrax: the gradient is in the library's name
            common += ["--solver", solver]
    if library == OURS:
        if gpu:
            return [sys.executable, "-m", "benchmarks.peers.keras_jax_step",
                    *common]
        return [sys.executable, "-m", "benchmarks.train_step",
                "--child", "1e-3", *common]
    if library == "torchdiffeq":
        if gpu:
            return [sys.executable, "-m", "benchmarks.peers.torchdiffeq_step",
                    "--device", "cuda", *common]
        return [str(ROOT / ".venv-torch/bin/python"),
                "-m", "benchmarks.peers.torchdiffeq_step", *common]
    _, adjoint, conv = library.split("-")
    python = sys.executable if gpu else str(ROOT / ".venv-jax/bin/python")
    return [python, "-m", "benchmarks.peers.diffrax_step",
            "--adjoint", adjoint, "--conv", conv, *common]


def run_once(library, steps, warmup, batch_size, gpu=False, solver=None,
             gradient=None):
    """The run's JSON result, or None (reported on stderr) if it failed.

    The result also goes to stderr at once, so that a run killed by a time
    limit leaves what it had measured.
    """
    argv = command(library, steps, warmup, batch_size, gpu, solver, gradient)
    # JAX may take the GPU (diffrax_step.py defaults to the CPU).
    env = ({"KERAS_BACKEND": "jax",
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
           if gpu else {})
    return run_json(argv, label(library, solver, gradient), env)


def run_json(argv, what, env=None):
    """Runs `argv` from the repository root and returns its last line of
    output as JSON, or None if it failed (reported on stderr as `what`).

    Exits if `argv[0]`, a peer's Python, is missing.
    """
    if not pathlib.Path(argv[0]).exists():
        sys.exit(f"{argv[0]} is missing: run `bash benchmarks/peers/setup.sh`"
                 " first.")
    process = subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        print(f"{what} failed (exit {process.returncode}):\n"
              f"{process.stderr[-3000:]}", file=sys.stderr)
        return None
    print(lines[-1], file=sys.stderr, flush=True)
    return json.loads(lines[-1])


def print_json(result, path=None):
    """Prints `result` as indented JSON, and writes it to `path` if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(summary, name, baseline):
    """`name`'s median step time over `baseline`'s, or None."""
    times = [summary.get(key, {}).get("median_step_s")
             for key in (name, baseline)]
    return times[0] / times[1] if None not in times and times[1] else None


def summarize(runs, ours=OURS):
    """Per library: the median over rounds of each field, and the ratio to
    `ours` (none if `ours` is None)."""
    summary = {}
    for library, results in runs.items():
        results = [r for r in results if r is not None]
        summary[library] = {field: median([r.get(field) for r in results])
                            for field in FIELDS}
        summary[library]["rounds"] = len(results)
    for library, entry in summary.items():
        if ours is not None:
            entry["ratio_to_ours"] = ratio(summary, library, ours)
    return summary


def summarize_solvers(runs, configs=SOLVER_TABLE):
    """As `summarize`, with each of ours' ratios to its peers in `configs`
    instead: torchdiffeq's with the same solver and gradient, diffrax's
    with the same solver and the matching adjoint."""
    summary = summarize(runs, ours=None)
    for library, solver, gradient in configs:
        if library != OURS:
            continue
        name = label(library, solver, gradient)
        peer = label("torchdiffeq", solver, gradient)
        summary[name]["peer"] = peer if peer in summary else None
        summary[name]["ratio_to_peer"] = ratio(summary, name, peer)
        diffrax = [label(other, other_solver) for other, other_solver, _
                   in configs
                   if other.startswith("diffrax-") and other_solver == solver
                   and other.split("-")[1] == DIFFRAX_ADJOINT[gradient]]
        if diffrax:
            summary[name]["diffrax_peer"] = diffrax[0]
            summary[name]["ratio_to_diffrax"] = ratio(summary, name,
                                                      diffrax[0])
    return summary


RATIO_HEADERS = {"ratio_to_ours": "x ours", "ratio_to_peer": "x torch",
                 "ratio_to_diffrax": "x diffrax"}


def cell(value, spec):
    """A table's cell: `value` formatted by `spec`, or "-" for None."""
    return "-" if value is None else format(value, spec)


def table(summary, ratios=("ratio_to_ours",)):
    width = max(26, *(len(library) + 2 for library in summary))
    header = (f"{'library':<{width}}{'median s':>10}{'min s':>10}"
              f"{'NFE fwd':>9}{'NFE bwd':>9}{'RSS MiB':>9}{'GPU MiB':>9}"
              + "".join(f"{RATIO_HEADERS[r]:>{len(RATIO_HEADERS[r]) + 2}}"
                        for r in ratios))
    rows = [header, "-" * len(header)]
    for library, e in summary.items():
        rows.append(
            f"{library:<{width}}{cell(e['median_step_s'], '.4f'):>10}"
            f"{cell(e['min_step_s'], '.4f'):>10}"
            f"{cell(e['nfe_forward'], '.0f'):>9}"
            f"{cell(e['nfe_backward'], '.0f'):>9}"
            f"{cell(e['peak_rss_mib'], '.0f'):>9}"
            f"{cell(e['peak_device_mib'], '.0f'):>9}"
            + "".join(f"{cell(e.get(r), '.2f'):>{len(RATIO_HEADERS[r]) + 2}}"
                      for r in ratios))
    return "\n".join(rows)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--peers", nargs="+", choices=PEERS,
                        default=DEFAULT_PEERS,
                        help="peers to time besides ours (default: "
                        "%(default)s)")
    parser.add_argument("--gpu", action="store_true",
                        help="run all on the GPU with this Python: ours on "
                             "Keras' JAX backend, torchdiffeq on CUDA, "
                             "diffrax on JAX's CUDA")
    parser.add_argument("--solver-table", action="store_true",
                        help="run SOLVER_TABLE's solvers and gradient "
                             "methods (with --gpu, GPU_SOLVER_TABLE's) "
                             "instead of ours and --peers")
    parser.add_argument("--json-out", type=pathlib.Path,
                        help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps", "warmup", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    if args.solver_table:
        configs = GPU_SOLVER_TABLE if args.gpu else SOLVER_TABLE
    else:
        configs = [(library, None, None)
                   for library in [OURS, *dict.fromkeys(args.peers)]]
    runs = {label(*config): [] for config in configs}
    for round_index in range(args.rounds):
        for library, solver, gradient in configs:
            name = label(library, solver, gradient)
            print(f"round {round_index + 1}/{args.rounds}: {name}",
                  file=sys.stderr, flush=True)
            runs[name].append(
                run_once(library, args.steps, args.warmup, args.batch_size,
                         args.gpu, solver, gradient))
    if args.solver_table:
        summary = summarize_solvers(runs, configs)
        ratios = ("ratio_to_peer", "ratio_to_diffrax")
    else:
        summary, ratios = summarize(runs), ("ratio_to_ours",)
    result = {
        "benchmark": "peers-solvers" if args.solver_table else "peers",
        "command": shlex.join(["python", "-m", "benchmarks.peers.run",
                               *argv]),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "tolerance": 1e-3,
        **({"num_steps": NUM_STEPS} if args.solver_table else
           {**DEFAULT_SOLVE, "peers": list(dict.fromkeys(args.peers))}),
        "gpu": args.gpu,
        "summary": summary,
        "runs": runs,
        "machine": describe(), **provenance(),
    }
    print(table(summary, ratios))
    print_json(result, args.json_out)


if __name__ == "__main__":
    main()
