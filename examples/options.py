"""The checks the examples' and benchmarks' command lines share."""

import argparse
import math


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
