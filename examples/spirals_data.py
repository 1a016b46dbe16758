"""The noisy 2-D spirals of torchdiffeq's `examples/latent_ode.py`, in
numpy alone: the data and the held-out errors of `examples/latent_ode.py`
and of its torchdiffeq peer, `benchmarks/peers/torchdiffeq_latent_ode.py`,
which runs without Keras."""

import numpy as np

NUM_POINTS, NUM_OBSERVED = 1000, 100  # along a spiral; observed per series
STOP = 6 * np.pi  # the spirals' parameter runs over [0, STOP]
NOISE_STD = 0.3


def spiral_curves():
    """`(times, clockwise, counter_clockwise)`: the demo's two curves at
    `NUM_POINTS` times over [0, STOP], each `(NUM_POINTS, 2)`."""
    t = np.linspace(0.0, STOP, NUM_POINTS)
    angle = STOP + 1.0 - t  # clockwise, radius 15 / angle
    clockwise = np.stack([15.0 / angle * np.cos(angle) - 5.0,
                          15.0 / angle * np.sin(angle)], axis=1)
    counter = np.stack([0.3 * t * np.cos(t) + 5.0,
                        0.3 * t * np.sin(t)], axis=1)
    return t, clockwise, counter


def spirals(num, seed):
    """`(observed, truth, times)` for `num` series: the noisy observations
    `(num, 100, 2)`, the noiseless curve at those and the next 100 times
    `(num, 200, 2)`, and those 200 times from 0 (the dynamics do not depend
    on the time, so each series starts at t = 0).

    Each series follows either curve (even odds) from a random start past
    its first 100 points, as the demo's, and at least 200 points before
    its end (the demo's: 100), so that the truth to extrapolate exists."""
    t, clockwise, counter = spiral_curves()
    rng = np.random.default_rng(seed)
    starts = rng.integers(NUM_OBSERVED, NUM_POINTS - 2 * NUM_OBSERVED + 1,
                          size=num)
    windows = starts[:, None] + np.arange(2 * NUM_OBSERVED)
    turns_clockwise = rng.random(num) < 0.5
    truth = np.where(turns_clockwise[:, None, None], clockwise[windows],
                     counter[windows])
    observed = truth[:, :NUM_OBSERVED] + rng.normal(
        scale=NOISE_STD, size=(num, NUM_OBSERVED, 2))
    return (observed.astype("float32"), truth.astype("float32"),
            t[:2 * NUM_OBSERVED] - t[0])


def held_out_errors(decoded, observed, truth):
    """The root-mean-square distances to the noiseless curve `truth` of the
    series `decoded` at the 200 times: of the reconstruction (the observed
    times), of the extrapolation (the next 100) and, for scale, of the
    `observed` values themselves (about the noise's 0.3)."""
    rmse = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))
    return {"reconstruction_rmse": rmse(decoded[:, :NUM_OBSERVED],
                                        truth[:, :NUM_OBSERVED]),
            "extrapolation_rmse": rmse(decoded[:, NUM_OBSERVED:],
                                       truth[:, NUM_OBSERVED:]),
            "observation_rmse": rmse(observed, truth[:, :NUM_OBSERVED])}
