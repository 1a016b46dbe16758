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
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from benchmarks.machine import describe, provenance
from benchmarks.peers.run import print_json

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(library, seed, iterations, gradient, adjoint_norm):
    common = ["--iterations", str(iterations), "--seed", str(seed),
              "--gradient", gradient]
    if library == "keras-node":
        out = tempfile.mkdtemp(prefix="spiral-")
        norm = (["--adjoint-norm", adjoint_norm] if gradient == "adjoint"
                else [])
        argv = [sys.executable, "-m", "examples.spiral", *common, *norm,
                "--no-plot", "--out", out]
    else:
        python = ROOT / ".venv-torch" / "bin" / "python"
        if not python.exists():
            sys.exit(f"{python} is missing: run bash benchmarks/peers/"
                     "setup.sh first.")
        argv = [str(python), "-m", "benchmarks.peers.torchdiffeq_spiral",
                *common]
    print(f"{library}, seed {seed}", file=sys.stderr, flush=True)
    process = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if process.returncode:
        sys.exit(f"{library} failed:\n{process.stderr[-3000:]}")
    if library == "keras-node":
        result = json.loads((pathlib.Path(out) / "spiral.json").read_text())
    else:
        result = json.loads(process.stdout.strip().splitlines()[-1])
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

    runs = {"keras-node": [], "torchdiffeq": []}
    for seed in args.seeds:
        for library in runs:
            runs[library].append({"seed": seed, **run(
                library, seed, args.iterations, args.gradient,
                args.adjoint_norm)})
    median = {library: {key: statistics.median(r[key] for r in results)
                        for key in ("final_loss", "train_time_s")}
              for library, results in runs.items()}
    result = {
        "benchmark": "spiral",
        "iterations": args.iterations,
        "seeds": args.seeds,
        "gradient": args.gradient,
        "adjoint_norm": args.adjoint_norm,
        "median": median,
        "time_ratio": median["keras-node"]["train_time_s"]
        / median["torchdiffeq"]["train_time_s"],
        "loss_ratio": median["keras-node"]["final_loss"]
        / median["torchdiffeq"]["final_loss"],
        "runs": runs,
        "machine": describe(), **provenance(),
    }
    print_json(result, args.json_out)


if __name__ == "__main__":
    main()
