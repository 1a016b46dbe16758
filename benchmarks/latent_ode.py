"""Ours against torchdiffeq on the latent ODE of torchdiffeq's
`examples/latent_ode.py`.

    bash benchmarks/peers/setup.sh        # once: .venv-torch
    python -m benchmarks.latent_ode --seeds 0 1 2 --iterations 2000

For each seed, runs `python -m examples.latent_ode` (ours) and
`benchmarks/peers/torchdiffeq_latent_ode.py` (torchdiffeq, in
`.venv-torch`), one after the other in fresh processes (ours, torch, ours,
torch, ...), on the same data (the same 1000 noisy spirals to train on and
1000 held out), with the same model sizes, loss, optimizer, iterations and
tolerances and the same gradient method (`--gradient`). Prints a JSON
object: every run's final ELBO (the last iteration's), the root-mean-square
distances on the held-out series to the noiseless curves of the
reconstruction and of the extrapolation, the observations' own, the
training time and the last iteration's dynamics evaluations (torchdiffeq's
with its versions), per library the median over the seeds of the time and
the two distances, and `time_ratio` (ours over torchdiffeq's median time),
with the settings, the machine, the date, the commit and the versions.
"""

import argparse
import pathlib

from benchmarks.against_torchdiffeq import (ROOT, alternate, print_result,
                                            run_example)

MEDIAN_KEYS = ("train_time_s", "reconstruction_rmse", "extrapolation_rmse")


def run(library, seed, iterations, gradient):
    result = run_example(
        library, seed, "latent_ode", ["--iterations", str(iterations),
                                      "--seed", str(seed), "--gradient",
                                      gradient], root=ROOT)
    last = result["elbos"][-1]
    record = {key: result[key] for key in (
        "train_time_s", "reconstruction_rmse", "extrapolation_rmse",
        "observation_rmse")}
    record.update(final_elbo=last["elbo"], nfe_forward=last["nfe_forward"],
                  nfe_backward=last["nfe_backward"])
    if library != "keras-node":  # ours' versions are the JSON's own
        record["versions"] = result["versions"]
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--gradient", default="backprop",
                        choices=["backprop", "adjoint"])
    parser.add_argument("--json-out", type=pathlib.Path)
    args = parser.parse_args(argv)

    runs, median = alternate(
        lambda library, seed: run(library, seed, args.iterations,
                                  args.gradient),
        args.seeds, MEDIAN_KEYS)
    print_result("latent_ode", {"iterations": args.iterations,
                                "seeds": args.seeds,
                                "gradient": args.gradient},
                 runs, median, args.json_out)


if __name__ == "__main__":
    main()
