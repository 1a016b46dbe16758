"""Ours against torchdiffeq on the spiral of torchdiffeq's `ode_demo`.

    bash benchmarks/peers/setup.sh        # once: .venv-torch
    python -m benchmarks.spiral --seeds 0 1 2 --iterations 2000

For each seed, runs `python -m examples.spiral` (ours) and
`benchmarks/peers/torchdiffeq_spiral.py` (torchdiffeq, in `.venv-torch`),
one after the other in fresh processes (ours, torch, ours, torch, ...), on
the same problem, the same batches, iterations, optimizer and tolerances,
with the same gradient method (`--gradient`). Prints a JSON object: every
run's final loss over the whole trajectory and training time (the
whole-trajectory tests left out; torchdiffeq's with its versions), per
library the median of each over the seeds, and `time_ratio` (ours over
torchdiffeq's median time) and `loss_ratio` (likewise), with the settings,
the machine, the date, the commit and the versions.
"""

import argparse
import pathlib

from benchmarks.against_torchdiffeq import (ROOT, alternate, print_result,
                                            run_example)


def run(library, seed, iterations, gradient, adjoint_norm):
    norm = (["--adjoint-norm", adjoint_norm] if gradient == "adjoint"
            else [])
    result = run_example(
        library, seed, "spiral", ["--iterations", str(iterations), "--seed",
                                  str(seed), "--gradient", gradient],
        ours_options=norm, root=ROOT)
    record = {"final_loss": result["final_loss"],
              "train_time_s": result["train_time_s"]}
    if library != "keras-node":  # ours' versions are the JSON's own
        record["versions"] = result["versions"]
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--gradient", default="adjoint",
                        choices=["adjoint", "backprop"])
    parser.add_argument("--adjoint-norm", default="full",
                        choices=["full", "seminorm"],
                        help="ours; full is torchdiffeq's default "
                        "(default: %(default)s)")
    parser.add_argument("--json-out", type=pathlib.Path)
    args = parser.parse_args(argv)

    runs, median = alternate(
        lambda library, seed: run(library, seed, args.iterations,
                                  args.gradient, args.adjoint_norm),
        args.seeds, ("final_loss", "train_time_s"))
    print_result(
        "spiral", {"iterations": args.iterations, "seeds": args.seeds,
                   "gradient": args.gradient,
                   "adjoint_norm": args.adjoint_norm},
        runs, median, args.json_out,
        loss_ratio=median["keras-node"]["final_loss"]
        / median["torchdiffeq"]["final_loss"])


if __name__ == "__main__":
    main()
