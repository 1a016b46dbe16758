"""The examples: run each from the repository root, `python -m examples.<name>`."""
