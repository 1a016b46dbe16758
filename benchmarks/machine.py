"""The machine a benchmark ran on, for its JSON output.

Step times depend on the CPU and on TensorFlow's use of oneDNN, which
TensorFlow turns on by default only on some CPUs (see
`docs/guides/troubleshooting.md`, "Slow training"); both are recorded.
"""

import os
import pathlib
import platform


def cpu_model():
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe():
    """A dict: platform, CPU model and count, Python, and the
    `TF_ENABLE_ONEDNN_OPTS` setting (None: TensorFlow's default)."""
    return {"platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}
