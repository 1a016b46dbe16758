"""The trajectory, latent-ODE, augmented-ODE and flow examples: their data,
and short runs.

The figures they are for (losses against torchdiffeq, NODE against ANODE,
flows against TFP's FFJORD) come from longer runs: `benchmarks/spiral.py`,
`examples/annuli.py`, `examples/cnf.py`, `benchmarks/cnf.py`.
"""

import json
import time

import numpy as np
import pytest

from examples import annuli, cnf, latent_ode, spiral


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


def test_latent_ode_series_follow_the_demos_spirals():
    observed, truth, times = latent_ode.spirals(400, seed=0)
    assert observed.shape == (400, 100, 2) and truth.shape == (400, 200, 2)
    # Evenly spaced from 0, as the demo's curve parameter over [0, 6 pi].
    np.testing.assert_allclose(np.diff(times), 6 * np.pi / 999, rtol=1e-9)
    assert times[0] == 0.0 and times.shape == (200,)
    # Each series is a stretch of one of the two curves, past their first
    # 100 points.
    _, clockwise, counter = latent_ode.spiral_curves()
    turns = []
    for series in truth:
        for k, curve in enumerate((clockwise, counter)):
            start = np.flatnonzero(np.all(
                np.isclose(curve, series[0], atol=1e-5), axis=1))
            if len(start) and np.allclose(
                    curve[start[0]:start[0] + 200], series, atol=1e-5):
                assert 100 <= start[0] <= 800
                turns.append(k)
                break
        else:
            pytest.fail("a series is on neither curve")
    assert 150 < sum(turns) < 250  # even odds
    # The counter-clockwise curve has radius 0.3 t about (5, 0).
    t = np.linspace(0, 6 * np.pi, 1000)
    np.testing.assert_allclose(np.linalg.norm(counter - [5, 0], axis=1),
                               0.3 * t, atol=1e-12)
    noise = observed - truth[:, :100]
    np.testing.assert_allclose(np.std(noise), 0.3, rtol=0.02)
    assert abs(np.mean(noise)) < 0.01


def test_latent_ode_held_out_errors_split_the_times():
    observed, truth, _ = latent_ode.spirals(50, seed=0)
    # Off by 0.5 on the observed times, by 2 on the next: the two errors
    # each see only their own times.
    decoded = truth + np.concatenate([np.full((50, 100, 2), 0.5),
                                      np.full((50, 100, 2), 2.0)], axis=1)
    errors = latent_ode.held_out_errors(decoded, observed, truth)
    assert errors["reconstruction_rmse"] == pytest.approx(0.5)
    assert errors["extrapolation_rmse"] == pytest.approx(2.0)
    assert errors["observation_rmse"] == pytest.approx(0.3, rel=0.05)


def test_latent_ode_posterior_draws_and_its_kl():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(1, 4))
    log_var = rng.normal(size=(1, 4)) - 1.0
    statistics = np.tile(np.concatenate([mean, log_var], -1),
                         (20000, 1)).astype("float32")
    posterior = latent_ode.Posterior(seed=1)
    np.testing.assert_allclose(
        posterior(statistics, training=False), np.tile(mean, (20000, 1)),
        rtol=1e-6)
    draws = np.asarray(posterior(statistics, training=True))
    np.testing.assert_allclose(np.mean(draws, 0), mean[0], atol=0.03)
    np.testing.assert_allclose(np.std(draws, 0), np.exp(0.5 * log_var[0]),
                               rtol=0.03)
    # KL(q || N(0, I)) against a Monte Carlo estimate from the draws:
    # the mean over draws of log q(z) - log N(z; 0, I).
    std = np.exp(0.5 * log_var[0])
    log_q = np.sum(-0.5 * ((draws - mean[0]) / std) ** 2 - np.log(std), -1)
    log_p = np.sum(-0.5 * draws ** 2, -1)
    kl = float(np.asarray(posterior.losses[-1]))
    np.testing.assert_allclose(kl, np.mean(log_q - log_p), rtol=0.03)
    assert kl > 0


def test_latent_ode_likelihood_is_the_gaussian_one():
    from scipy import stats

    rng = np.random.default_rng(0)
    x, decoded = rng.normal(size=(2, 3, 100, 2)).astype("float32")
    expected = -np.sum(stats.norm.logpdf(x, decoded, 0.3), axis=(1, 2))
    np.testing.assert_allclose(
        latent_ode.negative_log_likelihood(x, decoded), expected, rtol=1e-5)


def test_latent_ode_extrapolation_shares_the_trained_weights():
    observed, _, times = latent_ode.spirals(8, seed=0)
    model, extrapolation = latent_ode.build_models(times)
    # Decoding the posterior mean, both models agree on the observed times
    # to the solves' global error at rtol = atol = 1e-5 (they take
    # different steps, each ending its last on its own t1): 4e-4 apart.
    reconstruction = model.predict(observed, verbose=0)
    whole = extrapolation.predict(observed, verbose=0)
    assert whole.shape == (8, 200, 2)
    np.testing.assert_allclose(whole[:, :100], reconstruction, atol=1e-3)
    assert not np.allclose(whole[:, 100:], whole[:, :100], atol=1e-3)


@pytest.mark.slow
def test_latent_ode_example_runs_and_resumes_as_if_never_stopped(
        tmp_path, capsys, monkeypatch):
    # Fewer series than the figure's four panels: one panel each.
    argv = ["--print-every", "2", "--series", "3", "--out"]
    save, late = latent_ode.ResumableCheckpoint.save, [0.0]

    class Clock:  # the example's, 20 s later after each checkpoint write
        @staticmethod
        def perf_counter():
            return time.perf_counter() + late[0]

    def slow_save(self):
        late[0] += 20.0
        save(self)
    with monkeypatch.context() as patch:
        patch.setattr(latent_ode, "time", Clock)
        patch.setattr(latent_ode.ResumableCheckpoint, "save", slow_save)
        whole = latent_ode.main(argv + [str(tmp_path / "whole"),
                                        "--iterations", "4"])
    printed = capsys.readouterr().out
    # The training time leaves out the writes (the one after iteration 2),
    # as the demo's has none: counted, it alone would make 20 s of the time
    # to iteration 4 (iterations 3 and 4 took up to 5.3 s in the full suite
    # on a busy machine).
    times = [p["train_time_s"] for p in whole["elbos"]]
    assert 0 < times[1] - times[0] < 20.0
    assert "Iter: 2, elbo: " in printed and "Iter: 4, elbo: " in printed
    assert [p["iteration"] for p in whole["elbos"]] == [2, 4]
    # On the same batch each time, Adam raises the ELBO.
    assert whole["elbos"][1]["elbo"] > whole["elbos"][0]["elbo"]
    for point in whole["elbos"]:  # Dormand-Prince: 2 + 6 per step
        assert (point["nfe_forward"] - 2) % 6 == 0
        assert point["nfe_backward"] > 0
    assert 0.25 < whole["observation_rmse"] < 0.35
    assert np.isfinite(whole["extrapolation_rmse"])
    saved = json.loads((tmp_path / "whole" / "latent_ode.json").read_text())
    assert saved["reconstruction_rmse"] == whole["reconstruction_rmse"]
    assert (tmp_path / "whole" / "latent_ode.png").stat().st_size > 0
    assert not (tmp_path / "whole" / "backup").exists()

    # Killed after training to iteration 2, resumed to 4.
    out, argv = tmp_path / "cut", argv[:-1] + ["--no-plot", "--out"]

    def killed(*args):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(latent_ode, "held_out_errors", killed)
        with pytest.raises(KeyboardInterrupt):
            latent_ode.main(argv + [str(out), "--iterations", "2"])
    with pytest.raises(SystemExit, match=(
            rf"{out} holds a run with other options: --learning-rate 0.01 "
            r"\(this command: 0.02\)")):
        latent_ode.main(argv + [str(out), "--learning-rate", "0.02"])
    with pytest.raises(SystemExit, match=(
            rf"{out / 'backup'} holds a run at iteration 2, past --iterations "
            r"1: resume it with --iterations 2 or more, or pass another")):
        latent_ode.main(argv + [str(out), "--iterations", "1"])
    capsys.readouterr()
    resumed = latent_ode.main(argv + [str(out), "--iterations", "4"])
    printed = capsys.readouterr().out
    assert (f"Resuming from the checkpoint in {out / 'backup'} at iteration "
            "2.") in printed
    assert "Iter: 2," not in printed and "Iter: 4," in printed
    # The same weights, Adam state and posterior draws as the uninterrupted
    # run: the same ELBOs and held-out errors.
    assert resumed["iterations"] == 4
    assert [p["iteration"] for p in resumed["elbos"]] == [2, 4]
    for a, b in zip(whole["elbos"], resumed["elbos"]):
        assert a["elbo"] == pytest.approx(b["elbo"], rel=1e-6)
    assert resumed["reconstruction_rmse"] == pytest.approx(
        whole["reconstruction_rmse"], rel=1e-6)
    assert not (out / "backup").exists()  # the results are written


def test_latent_ode_history_that_is_missing_or_damaged_starts_afresh(
        tmp_path, capsys):
    path = tmp_path / "history.json"
    point = {"iteration": 2, "elbo": -5.0, "nfe_forward": 8,
             "nfe_backward": 6, "train_time_s": 1.5}
    path.write_text(json.dumps([point, {**point, "iteration": 4}]))
    assert latent_ode.resume_elbos(path, 3) == [point]
    assert latent_ode.resume_elbos(path, 0) == []  # a new run
    for damaged in ([{**point, "train_time_s": "1.5"}],
                    [{"iteration": 2, "elbo": -5.0}], {"iteration": 2}, "["):
        path.write_text(damaged if isinstance(damaged, str)
                        else json.dumps(damaged))
        assert latent_ode.resume_elbos(path, 3) == []
        assert (f"Warning: {path} is missing or damaged (" in
                capsys.readouterr().out)
    path.unlink()
    assert latent_ode.resume_elbos(path, 3) == []
    assert "the ELBO history and the training time start afresh" in \
        capsys.readouterr().out


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
    (latent_ode, ["--series=0"], "--series must be positive"),
    (latent_ode, ["--learning-rate=nan"],
     "--learning-rate must be positive, got nan"),
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
