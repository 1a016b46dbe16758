"""The README's and the results page's pictures, from the benchmarks' JSON.

    python -m benchmarks.figures    # docs/data/*.json -> docs/images/*.png
    python -m benchmarks.figures --collect-mnist runs/mnist-one-epoch \\
        --collect-peers runs/peers.json    # first, to record new runs

`--collect-mnist RUN` copies a run of `examples/mnist.py` (its
`metrics.json`, with the run's options, and `history.json`) into
`docs/data/mnist_one_epoch.json`, with the command that the options make,
and the date, the commit and the versions of the moment it is collected
(collect right after the run). `--collect-peers FILE` copies the JSON of
`benchmarks/peers/run.py` into `docs/data/peers_cpu.json`, with the
command, date, commit and versions that the JSON records. Then it draws,
from those files alone:

- `docs/images/mnist_one_epoch.png`: accuracy (train and held-out, every
  `--eval-every` iterations) and the solver's evaluations per iteration;
- `docs/images/step_time_cpu.png`: the median train step of ours and each
  peer, with the forward evaluations.
"""

import argparse
import json
import pathlib
import shlex

from benchmarks import machine

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data"
IMAGES = ROOT / "docs" / "images"
MNIST = "mnist_one_epoch.json"
PEERS = "peers_cpu.json"


def provenance(record=None):
    """The date, short commit, machine and versions of a benchmark's
    `record` (`machine.provenance()` with `"machine": machine.describe()`),
    by default of now."""
    if record is None:
        record = {**machine.provenance(), "machine": machine.describe()}
    commit, described = record["git_commit"], record["machine"]
    return {"date": record["date"][:10], "commit": commit and commit[:7],
            "machine": f"{described['cpu']}, {described['cpu_count']} CPUs",
            "versions": record["versions"]}


def mnist_command(options):
    """The `examples/mnist.py` command of a run's recorded options (its
    `metrics.json`'s `args`): those that differ from the defaults, and
    `--manual-dir`."""
    from examples.mnist_options import parse_args

    defaults = {name: str(value) if isinstance(value, pathlib.Path)
                else value for name, value in vars(parse_args([])).items()}
    words = ["python", "-m", "examples.mnist"]
    for name, value in options.items():
        if value == defaults.get(name) and name != "manual_dir":
            continue
        if value is None or value is False:
            continue
        words.append("--" + name.replace("_", "-"))
        if value is not True:
            words.append(str(value))
    return shlex.join(words)


def collect_mnist(run, data=DATA):
    run = pathlib.Path(run)
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    record = {**provenance(), "command": mnist_command(metrics["args"]),
              "metrics": metrics, "history": history}
    _write(data / MNIST, record)


def collect_peers(path, data=DATA):
    """With the run's own command, date, commit, machine and versions where
    its JSON records them, else (an older JSON) those of now."""
    result = json.loads(pathlib.Path(path).read_text())
    record = provenance(result if "versions" in result else None)
    _write(data / PEERS, {**record, "command": result.get("command"),
                          "result": result})


def _write(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def _caption(record):
    return (f"{record['date']}, commit {record['commit']}, "
            f"{record['machine']}")


def draw_mnist(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = record["history"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    points = history["accuracy"]
    for key, label in (("train_accuracy", "train"),
                       ("test_accuracy", "held-out")):
        left.plot([p["iteration"] for p in points],
                  [p[key] for p in points], marker=".", label=label)
    left.set(xlabel="iteration", ylabel="accuracy (%)", ylim=(80, 100),
             title=f"accuracy (test split at the end: "
                   f"{record['metrics']['test_accuracy']:.2f}%)")
    points = history["iterations"]
    for key, label in (("nfe_forward", "forward"),
                       ("nfe_backward", "backward")):
        right.plot([p["iteration"] for p in points],
                   [p[key] for p in points], label=label)
    right.set(xlabel="iteration", ylabel="evaluations",
              title="dynamics evaluations per iteration")
    for ax in (left, right):
        ax.legend()
    fig.suptitle("Neural-ODE MNIST classifier, one epoch on a CPU "
                 f"({_caption(record)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peers_settings(result):
    """The settings of a run.py JSON, for a title: batch, solver, tolerance
    and ours' gradient (run.py's defaults in a JSON from before it recorded
    them)."""
    from benchmarks.peers.run import DEFAULT_SOLVE

    solve = {**DEFAULT_SOLVE, **result}
    return (f"batch {result['batch_size']}, {solve['solver']} at "
            f"rtol = atol = {result['tolerance']:g}, {solve['gradient']}")


def draw_peers(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = record["result"]["summary"]
    names = sorted(summary, key=lambda name: summary[name]["median_step_s"])
    times = [summary[name]["median_step_s"] for name in names]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.4))
    bars = ax.barh(names, times,
                   color=["C0" if name == "keras_node" else "C7"
                          for name in names])
    for bar, name in zip(bars, names):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {bar.get_width():.3f} s, "
                f"{summary[name]['nfe_forward']:.0f} evaluations",
                va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(times) * 1.45)
    ax.set(xlabel="median train step (s), lower is better",
           title=f"MNIST train step, {peers_settings(record['result'])}\n"
                 f"({_caption(record)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw(data=DATA, images=IMAGES):
    """Draws every picture whose data is in `data`; returns their paths."""
    images.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, drawer, picture in (
            (MNIST, draw_mnist, "mnist_one_epoch.png"),
            (PEERS, draw_peers, "step_time_cpu.png")):
        source = data / name
        if source.exists():
            target = images / picture
            drawer(json.loads(source.read_text()), target)
            drawn.append(target)
    return drawn


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect-mnist", type=pathlib.Path)
    parser.add_argument("--collect-peers", type=pathlib.Path)
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--images", type=pathlib.Path, default=IMAGES)
    args = parser.parse_args(argv)
    if args.collect_mnist:
        collect_mnist(args.collect_mnist, args.data)
    if args.collect_peers:
        collect_peers(args.collect_peers, args.data)
    for path in draw(args.data, args.images):
        print(f"Wrote {path}")


if __name__ == "__main__":
    main()
