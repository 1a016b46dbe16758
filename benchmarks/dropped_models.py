"""What a dropped model leaves in memory, per model; JSON.

    python -m benchmarks.dropped_models [--models 20]
    KERAS_BACKEND=jax .venv-jax/bin/python -m benchmarks.dropped_models

What a hyperparameter search or a notebook does: build a model, use it,
drop it, build the next. For each loop body (`predict`, `evaluate`, `fit`
of one small batch) and each model (`keras`, a plain MLP 2 -> 50 tanh -> 2;
`neural_ode`, a `NeuralODE` of that MLP), it builds `--models` models in
turn, runs the body, deletes the model and collects garbage. It reports
what one more model leaves behind, averaged over all but the first: the
growth of the number of objects that Python's garbage collector tracks and
of the process' resident memory (Linux). A model that is freed leaves no
objects; memory also grows as allocators keep freed pages. Prints one JSON
object with the machine.
"""

import argparse
import gc
import pathlib

from benchmarks.machine import describe, provenance, rss_mib
from benchmarks.peers.run import print_json

BODIES = ("predict", "evaluate", "fit")
MODELS = ("keras", "neural_ode")


def build(kind):
    import keras

    from keras_node import NeuralODE

    mlp = keras.Sequential([keras.layers.Dense(50, activation="tanh"),
                            keras.layers.Dense(2)])
    layer = mlp if kind == "keras" else NeuralODE(mlp)
    model = keras.Sequential([keras.Input((2,)), layer])
    model.compile(optimizer="adam", loss="mse")
    return model


def run(body, model, x):
    if body == "predict":
        model.predict(x, verbose=0)
    elif body == "evaluate":
        model.evaluate(x, x, verbose=0)
    else:
        model.fit(x, x, epochs=1, verbose=0)


def measure(body, kind, models, x):
    """Objects and MiB left behind per model (all but the first)."""
    counts = []
    for _ in range(models + 1):
        model = build(kind)
        run(body, model, x)
        del model
        gc.collect()
        counts.append((len(gc.get_objects()), rss_mib()))
    (objects0, rss0), (objects1, rss1) = counts[0], counts[-1]
    return {"objects_per_model": (objects1 - objects0) / models,
            "rss_mib_per_model": (None if rss0 is None
                                  else (rss1 - rss0) / models)}


def main(argv=None):
    import keras
    import numpy as np

    from examples.options import check_ranges

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=20,
                        help="models measured after the first (default: "
                        "%(default)s)")
    parser.add_argument("--bodies", nargs="+", choices=BODIES,
                        default=list(BODIES),
                        help="what each model does (default: all)")
    parser.add_argument("--json-out", type=pathlib.Path)
    args = parser.parse_args(argv)
    check_ranges(parser, args, positive=("models",))
    x = np.random.default_rng(0).normal(size=(32, 2)).astype("float32")
    result = {"benchmark": "dropped_models",
              "backend": keras.backend.backend(), "models": args.models,
              "left_behind": {
                  body: {kind: measure(body, kind, args.models, x)
                         for kind in MODELS}
                  for body in args.bodies},
              "machine": describe(), **provenance()}
    print_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
