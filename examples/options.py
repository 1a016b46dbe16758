"""The checks the examples' and benchmarks' command lines share."""

import argparse
import json
import math

from keras_node.training import write_atomic


def seed_option(text):
    """An argparse type: a seed that numpy and Keras both take."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 0 to {2**32 - 1}, received {text!r}")
    return value


def check_ranges(parser, args, positive=(), non_negative=()):
    """Stops with `parser`'s usage error for an option out of range (NaN and
    infinity are out of every range)."""
    for name in positive:
        if not 0 < getattr(args, name) < math.inf:
            parser.error(f"--{name.replace('_', '-')} must be positive, got "
                         f"{getattr(args, name)}")
    for name in non_negative:
        if not 0 <= getattr(args, name) < math.inf:
            parser.error(f"--{name.replace('_', '-')} must be at least 0, "
                         f"got {getattr(args, name)}")


def check_out_folder(parser, out, option="--out"):
    """Stops with `parser`'s usage error unless `out` is, or can become, a
    folder: checked before training, which it would otherwise lose."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                parser.error(f"{option} must be a folder, but {path} is a "
                             "file")
            return


def check_same_run(out, args, names, started):
    """Stops unless `args` repeat the options `names` of the run `out` holds
    (`started`: a checkpoint or a result is there); records them in
    `out/options.json` for a new run. A resumed run with other values would
    mix two runs (a solver, a batch size, a data seed)."""
    path = out / "options.json"
    options = {name: getattr(args, name) for name in names}
    if not (started and path.exists()):
        write_atomic(path, json.dumps(options, indent=2))
        return
    saved = json.loads(path.read_text())
    changed = [f"--{name.replace('_', '-')} {saved.get(name)} (this command: "
               f"{value})" for name, value in options.items()
               if saved.get(name) != value]
    if changed:
        raise SystemExit(
            f"{out} holds a run with other options: {', '.join(changed)}. "
            "Resume it with its own options, or pass another --out to train "
            "anew.")
