"""The trajectory, augmented-ODE and flow examples: their data, and short
runs.

The figures they are for (losses against torchdiffeq, NODE against ANODE,
flows against TFP's FFJORD) come from longer runs: `benchmarks/spiral.py`,
`examples/annuli.py`, `examples/cnf.py`, `benchmarks/cnf.py`.
"""

import json

import numpy as np
import pytest

from examples import annuli, cnf, spiral


def test_annuli_data_are_the_papers():
    x, y = annuli.annuli(2000, seed=0)
    radius = np.linalg.norm(x, axis=1)
    r1, r2, r3 = annuli.RADII
    assert np.all(radius[y == 0] < r1)
    assert np.all((radius[y == 1] > r2) & (radius[y == 1] < r3))
    assert np.sum(y == 0) == np.sum(y == 1) == 1000


def test_annuli_training_logs_each_iterations_own_figures():
    # 40 points in batches of 16, 16 and 8: five iterations, no more, each
    # with its own batch's accuracy (a whole number of its points), not
    # Keras' running mean over the epoch.
    x, y = annuli.annuli(40, seed=0)
    model, points = annuli.train(0, x, y, iterations=5, batch_size=16,
                                 seed=0, verbose=False)
    assert int(model.optimizer.iterations.numpy()) == len(points) == 5
    for point, size in zip(points, [16, 16, 8, 16, 16]):
        correct = point["binary_accuracy"] * size
        assert correct == pytest.approx(round(correct), abs=1e-4)
        assert point["loss"] > 0


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


def test_spiral_dynamics_draw_each_kernel_anew():
    dynamics = spiral.make_dynamics()
    dynamics.build((None, 2))
    first, second = (np.asarray(layer.kernel) for layer in dynamics.layers[1:])
    assert not np.allclose(first.ravel(), second.T.ravel())
    assert not np.allclose(first.ravel(), second.ravel())
    assert 0.05 < np.std(np.concatenate([first.ravel(), second.ravel()])) \
        < 0.15  # N(0, 0.1)


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


def test_toy_densities_are_ffjords():
    moons = cnf.two_moons(4000, seed=0)
    assert moons.shape == (4000, 2) and moons.dtype == np.float32
    # Two half circles of radius 2 (noise 0.2 after scaling) about centres
    # (-1, -0.5) and (1, 0.5).
    radii = [np.linalg.norm(moons - centre, axis=1)
             for centre in ([-1.0, -0.5], [1.0, 0.5])]
    off_circle = np.min([np.abs(radius - 2.0) for radius in radii], axis=0)
    assert np.mean(off_circle < 0.6) > 0.99
    gaussians = cnf.eight_gaussians(8000, seed=0) * np.sqrt(2)
    angles = np.round(np.arctan2(gaussians[:, 1], gaussians[:, 0])
                      / (np.pi / 4)) % 8
    assert np.all(np.bincount(angles.astype(int), minlength=8) > 800)
    np.testing.assert_allclose(np.mean(np.linalg.norm(gaussians, axis=1)),
                               4.0, atol=0.1)
    # The true density integrates to 1 (a Riemann sum over [-5, 5]^2), and
    # its NLL on its own samples is the mixture's entropy: about 8 separate
    # Gaussians', log(8) + log(2 pi e 0.125) = 2.838.
    grid = np.linspace(-5, 5, 401)
    points = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    mass = np.sum(np.exp(cnf.eight_gaussians_log_prob(points))) * 0.025 ** 2
    np.testing.assert_allclose(mass, 1.0, atol=1e-3)
    nll = -np.mean(cnf.eight_gaussians_log_prob(
        cnf.eight_gaussians(100_000, seed=1).astype("float64")))
    assert 2.82 < nll < 2.84


@pytest.mark.slow
def test_cnf_example_runs_and_writes_its_figures(tmp_path, capsys):
    summary = cnf.main(["--iterations", "3", "--batch-size", "64",
                        "--units", "16", "--test-points", "400",
                        "--print-every", "1", "--tol", "1e-3",
                        "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "two_moons iteration 3: loss " in printed
    assert "eight_gaussians: held-out negative log-likelihood " in printed
    saved = json.loads((tmp_path / "cnf.json").read_text())
    for name in ("two_moons", "eight_gaussians"):
        assert [p["iteration"] for p in saved["iterations"][name]] == [1, 2, 3]
        assert np.isfinite(summary[name]["held_out_nll"])
        assert summary[name]["nfe_forward_last_20"] > 0
        assert (tmp_path / f"cnf_{name}.png").stat().st_size > 0


@pytest.mark.parametrize("option, value, message", [
    ("--iterations", "0", "--iterations must be positive"),
    ("--tol", "-1e-3", "--tol must be positive"),
    ("--jacobian-norm", "-1", "--jacobian-norm must be at least 0"),
    ("--learning-rate", "inf", "--learning-rate must be positive, got inf"),
    ("--seed", "-1", "argument --seed: expected an integer from 0 to "
     "4294967295, received '-1'"),
])
def test_cnf_example_rejects_bad_options(option, value, message, capsys):
    with pytest.raises(SystemExit):
        cnf.parse_args([f"{option}={value}"])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cnf.parse_args(["--datasets", "two_moons", "two_moons"])
    assert "--datasets names a dataset twice: two_moons two_moons" in \
        capsys.readouterr().err


@pytest.mark.parametrize("example, argv, message", [
    (annuli, ["--iterations=0"], "--iterations must be positive"),
    (annuli, ["--points=-5"], "--points must be positive"),
    (annuli, ["--augment-dims", "0", "-1"], "--augment-dims must be at least 0"),
    (spiral, ["--iterations=0"], "--iterations must be positive"),
    (annuli, ["--augment-dims", "1", "1"],
     "--augment-dims names a model twice: 1 1"),
    (spiral, ["--gradient", "backprop", "--adjoint-norm", "full"],
     "--adjoint-norm is for --gradient adjoint"),
    (spiral, ["--out", __file__],
     f"--out must be a folder, but {__file__} is a file"),
    (annuli, ["--out", f"{__file__}/run"],
     f"--out must be a folder, but {__file__} is a file"),
    (annuli, ["--seed", "-1"], "argument --seed: expected an integer from 0 "
     "to 4294967295, received '-1'"),
    (spiral, ["--seed", "4294967296"], "argument --seed: expected an "
     "integer from 0 to 4294967295, received '4294967296'"),
])
def test_examples_reject_bad_options(example, argv, message, capsys):
    with pytest.raises(SystemExit):
        example.main(argv)
    assert message in capsys.readouterr().err
