"""What `spiral.py` and `latent_ode.py` share: an example of ours and its
torchdiffeq peer, each in a fresh process, alternated over seeds."""

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
LIBRARIES = ("keras-node", "torchdiffeq")


def run_example(library, seed, name, options, ours_options=(), root=ROOT):
    """Runs `python -m examples.NAME OPTIONS OURS_OPTIONS --no-plot --out
    TEMP` (library "keras-node", with this Python) or `.venv-torch/bin/python
    -m benchmarks.peers.torchdiffeq_NAME OPTIONS` (library "torchdiffeq",
    the venv under `root`) from the repository root, with TensorFlow's log
    level at 2, and returns its result: ours' `TEMP/NAME.json`, the peer's
    last line of output, parsed. Exits if the venv is missing or the
    process fails (with the end of its stderr); names the library and the
    seed on stderr first."""
    if library == "keras-node":
        out = tempfile.mkdtemp(prefix=f"{name}-")
        argv = [sys.executable, "-m", f"examples.{name}", *options,
                *ours_options, "--no-plot", "--out", out]
    else:
        python = root / ".venv-torch" / "bin" / "python"
        if not python.exists():
            sys.exit(f"{python} is missing: run bash benchmarks/peers/"
                     "setup.sh first.")
        argv = [str(python), "-m", f"benchmarks.peers.torchdiffeq_{name}",
                *options]
    print(f"{library}, seed {seed}", file=sys.stderr, flush=True)
    process = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if process.returncode:
        sys.exit(f"{library} failed:\n{process.stderr[-3000:]}")
    if library == "keras-node":
        return json.loads((pathlib.Path(out) / f"{name}.json").read_text())
    return json.loads(process.stdout.strip().splitlines()[-1])


def alternate(run, seeds, keys):
    """Calls `run(library, seed)` for each seed, ours then torchdiffeq's
    (ours, torch, ours, torch, ...), and returns `(runs, median)`: per
    library the list of `{"seed": seed, **record}` and the median over the
    seeds of each of `keys`."""
    runs = {library: [] for library in LIBRARIES}
    for seed in seeds:
        for library in LIBRARIES:
            runs[library].append({"seed": seed, **run(library, seed)})
    median = {library: {key: statistics.median(r[key] for r in results)
                        for key in keys}
              for library, results in runs.items()}
    return runs, median


def print_result(benchmark, settings, runs, median, json_out, **ratios):
    """Prints the JSON object of a comparison (also to `json_out`, a path
    or None): the benchmark's name, its `settings`, the medians,
    `time_ratio` (ours over torchdiffeq's median training time) and any
    other `ratios`, every run, the machine, the date, the commit and the
    versions."""
    times = [median[library]["train_time_s"] for library in LIBRARIES]
    print_json({"benchmark": benchmark, **settings, "median": median,
                "time_ratio": times[0] / times[1], **ratios, "runs": runs,
                "machine": describe(), **provenance()}, json_out)
