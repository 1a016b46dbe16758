"""The machine a benchmark ran on, when, and with what, for its JSON output.

Step times depend on the CPU and on TensorFlow's use of oneDNN, which
TensorFlow turns on by default only on some CPUs (see
`docs/guides/troubleshooting.md`, "Slow training"); both are recorded.
"""

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Where a copy of the repository without its .git (the GPU machines') finds
# the commit it was copied from: written by tools/device-wheels.sh.
COMMIT_FILE = pathlib.Path(".whl") / "commit.json"
# The distributions whose versions a result depends on (those installed are
# recorded). tensorflow-probability and tfp-nightly provide the same module;
# where both are installed (.venv-jax sees the system's packages) both are
# listed, and the one imported is the first on sys.path.
PACKAGES = ("numpy", "keras", "keras-node", "tensorflow",
            "tensorflow-probability", "tfp-nightly", "jax", "jaxlib",
            "torch", "torchdiffeq", "diffrax")


# The vector instructions that decide which kernels oneDNN and PyTorch use:
# two CPUs of one model name ("AMD EPYC" on a VM) may differ in them.
VECTOR_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                   "amx_tile")


def _cpuinfo(key):
    """The first value of `key` in /proc/cpuinfo (Linux), else None."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return None


def rss_mib(pid="self"):
    """The resident memory of process `pid` in MiB (Linux), else None."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_model():
    """The CPU's model name (Linux), else what `platform` knows."""
    return (_cpuinfo("model name") or platform.processor()
            or platform.machine())


def cpu_features():
    """Which of `VECTOR_FEATURES` the CPU has (Linux), else None."""
    flags = _cpuinfo("flags")
    if flags is None:
        return None
    return [f for f in VECTOR_FEATURES if f in flags.split()]


def describe():
    """A dict: platform, CPU model, vector features and count, Python, and
    the `TF_ENABLE_ONEDNN_OPTS` setting (None: TensorFlow's default)."""
    return {"platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_features": cpu_features(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}


def versions():
    """A dict: Python's version and those of the installed `PACKAGES`, read
    from their metadata (nothing is imported)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def provenance():
    """A dict: the date (UTC, ISO 8601), the repository's commit and
    whether tracked files differ from it, and `versions()`. Outside a git
    checkout the commit and the flag come from `COMMIT_FILE` if there is
    one, else both are None."""
    def git(*command):
        try:
            return subprocess.run(["git", *command], cwd=ROOT, text=True,
                                  capture_output=True, check=True
                                  ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    if commit is not None:
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    else:
        try:
            recorded = json.loads((ROOT / COMMIT_FILE).read_text())
        except (OSError, ValueError):
            recorded = {}
        commit = recorded.get("git_commit")
        dirty = recorded.get("git_dirty")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "git_commit": commit, "git_dirty": dirty,
            "versions": versions()}
