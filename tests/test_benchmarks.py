"""The benchmarks' shared parts; their long runs are not tests."""

import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the peers' and the GPU scripts need besides this environment.
PEER_PACKAGES = {"torch", "torchdiffeq", "diffrax", "equinox", "optax", "jax"}
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for path in (ROOT / "benchmarks").rglob("*.py")
    if path.name != "__init__.py")


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_imports_as_its_command_runs_it(name):
    """`python -m benchmarks.NAME` imports the module from the repository
    root, as each one's docstring says to run it."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name.split(".")[0] in PEER_PACKAGES:
            pytest.skip(f"{name} needs {error.name}")
        raise


def test_machine_records_the_cpu_and_the_onednn_setting(monkeypatch):
    from benchmarks.machine import describe

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    machine = describe()
    assert machine["tf_enable_onednn_opts"] == "1"
    assert isinstance(machine["cpu"], str) and machine["cpu"]
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    assert describe()["tf_enable_onednn_opts"] is None
