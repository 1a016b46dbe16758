"""The trajectory and augmented-ODE examples: their data, and short runs.

The figures they are for (losses against torchdiffeq, NODE against ANODE)
come from longer runs: `benchmarks/spiral.py`, `examples/annuli.py`.
"""

import json

import numpy as np
import pytest

from examples import annuli, spiral


def test_annuli_data_are_the_papers():
    x, y = annuli.annuli(2000, seed=0)
    radius = np.linalg.norm(x, axis=1)
    r1, r2, r3 = annuli.RADII
    assert np.all(radius[y == 0] < r1)
    assert np.all((radius[y == 1] > r2) & (radius[y == 1] < r3))
    assert np.sum(y == 0) == np.sum(y == 1) == 1000


@pytest.mark.slow
def test_annuli_example_runs_and_writes_its_figures(tmp_path):
    summary = annuli.main(["--iterations", "20", "--points", "256",
                           "--out", str(tmp_path)])
    assert set(summary) == {"NODE", "ANODE (+1)"}
    saved = json.loads((tmp_path / "annuli.json").read_text())
    for name, points in saved["iterations"].items():
        assert [p["iteration"] for p in points] == list(range(1, 21))
        # Dormand-Prince counts: 2 + 6 per step.
        assert all((p["nfe_forward"] - 2) % 6 == 0 for p in points)
        assert 0 <= summary[name]["test_accuracy"] <= 100
    assert (tmp_path / "annuli.png").stat().st_size > 0


def test_spiral_batches_are_windows_of_the_true_trajectory():
    t, y = spiral.true_trajectory()
    assert t.shape == (1000,) and y.shape == (1000, 2)
    np.testing.assert_allclose(y[0], [2.0, 0.0])
    x, windows = spiral.batches(y, iterations=3, seed=0)
    assert x.shape == (60, 2) and windows.shape == (60, 10, 2)
    # Each window starts at its initial state and follows the trajectory.
    np.testing.assert_array_equal(windows[:, 0], x)
    starts = [int(np.flatnonzero(np.all(y == x0, axis=1))[0]) for x0 in x]
    for start, window in zip(starts, windows):
        np.testing.assert_array_equal(window, y[start:start + 10])


@pytest.mark.slow
def test_spiral_example_runs_and_writes_its_figures(tmp_path, capsys):
    result = spiral.main(["--iterations", "4", "--test-every", "2",
                          "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "Iter 0002 | Total Loss " in printed
    assert [p["iteration"] for p in result["losses"]] == [2, 4]
    assert np.isfinite(result["final_loss"])
    assert json.loads((tmp_path / "spiral.json").read_text())[
        "final_loss"] == result["final_loss"]
    assert (tmp_path / "spiral.png").stat().st_size > 0
