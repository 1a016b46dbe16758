"""The range checks the examples' and benchmarks' command lines share."""


def check_ranges(parser, args, positive=(), non_negative=()):
    """Stops with `parser`'s usage error for an option out of range."""
    for name in positive:
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in non_negative:
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0")
