"""torchdiffeq's `examples/latent_ode.py`, as `examples/latent_ode.py` runs
it.

    .venv-torch/bin/python -m benchmarks.peers.torchdiffeq_latent_ode \\
        --iterations 2000 --seed 0 [--gradient backprop|adjoint]

The demo's model and loss: an RNN cell (Linear(2 + 25, 25), tanh) reads
each series backwards from a zero hidden state and a Linear(25, 8) gives the
mean and log-variance of `q(z0 | x)`; a reparameterised draw of `z0` goes
through `odeint` (`--gradient backprop`, the demo's default) or
`odeint_adjoint` (`adjoint`, its `--adjoint`) with dopri5 at rtol = atol =
1e-5 (ours'; the demo keeps torchdiffeq's defaults) over the 100 observed
times, with the dynamics Linear(4, 20), ELU, Linear(20, 20), ELU,
Linear(20, 4), and a decoder Linear(4, 20), ReLU, Linear(20, 2); the loss is
the batch mean of the Gaussian negative log-likelihood (noise 0.3, summed
over times and coordinates) plus `KL(q || N(0, I))`. Adam at 1e-2 on the
whole training set each iteration, torch's default initialisation, seeded
with `--seed`. The data are ours, to the bit (`examples/spirals_data.py`):
1000 training series drawn with `--seed`, 1000 held out with `--seed + 1`.

Every `--print-every` iterations (and at the last) prints the iteration's
ELBO. At the end, decodes the posterior means of the held-out series at the
200 times and prints one JSON line: the root-mean-square distances to the
noiseless curves of the reconstruction (the 100 observed times), of the
extrapolation (the next 100) and of the observations themselves, the
training time (the training loop alone, as ours: `model.fit`), the ELBOs
with the last iteration's dynamics evaluations (forward, and backward with
the adjoint; null with backprop, whose backward pass evaluates none), the
settings and the versions.
"""

import argparse
import json
import time

import numpy as np
import torch
import torchdiffeq

from benchmarks.machine import versions
from examples.spirals_data import (NOISE_STD, NUM_OBSERVED, held_out_errors,
                                   spirals)

LATENT_DIM, HIDDEN, RNN_UNITS = 4, 20, 25  # the demo's sizes
TOL = 1e-5  # rtol and atol of the solves, ours'
SERIES = 1000


class LatentODEfunc(torch.nn.Module):
    """The demo's dynamics, counting their evaluations."""

    def __init__(self):
        super().__init__()
        self.elu = torch.nn.ELU(inplace=True)
        self.fc1 = torch.nn.Linear(LATENT_DIM, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = torch.nn.Linear(HIDDEN, LATENT_DIM)
        self.evals = 0

    def forward(self, t, x):
        self.evals += 1
        return self.fc3(self.elu(self.fc2(self.elu(self.fc1(x)))))


class RecognitionRNN(torch.nn.Module):
    """The demo's encoder: from `(batch, times, 2)` observations, the
    `(batch, 2 * LATENT_DIM)` statistics of `q(z0 | x)`, reading the times
    backwards from a zero hidden state."""

    def __init__(self):
        super().__init__()
        self.i2h = torch.nn.Linear(2 + RNN_UNITS, RNN_UNITS)
        self.h2o = torch.nn.Linear(RNN_UNITS, 2 * LATENT_DIM)

    def forward(self, x):
        h = torch.zeros(x.shape[0], RNN_UNITS)
        for t in reversed(range(x.shape[1])):
            h = torch.tanh(self.i2h(torch.cat((x[:, t], h), dim=1)))
        return self.h2o(h)


class Decoder(torch.nn.Module):
    """The demo's decoder, from each latent state to the plane."""

    def __init__(self):
        super().__init__()
        self.relu = torch.nn.ReLU(inplace=True)
        self.fc1 = torch.nn.Linear(LATENT_DIM, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, 2)

    def forward(self, z):
        return self.fc2(self.relu(self.fc1(z)))


def negative_elbo(observed, decoded, mean, log_var):
    """The batch mean of `-log N(observed; decoded, NOISE_STD^2)` (summed
    over times and coordinates) plus `KL(N(mean, exp(log_var)) || N(0, I))`
    (summed over the latent dimensions): the demo's loss."""
    variance = NOISE_STD ** 2
    nll = torch.sum(0.5 * (np.log(2.0 * np.pi * variance)
                           + (observed - decoded) ** 2 / variance),
                    dim=(1, 2))
    kl = 0.5 * torch.sum(torch.exp(log_var) + mean ** 2 - 1.0 - log_var,
                         dim=-1)
    return torch.mean(nll + kl)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--print-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient", default="backprop",
                        choices=["backprop", "adjoint"])
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(torch.get_num_threads())

    observed, _, times = spirals(SERIES, seed=args.seed)
    test_observed, test_truth, _ = spirals(SERIES, seed=args.seed + 1)
    x = torch.tensor(observed)
    t = torch.tensor(times, dtype=torch.float32)

    func, encoder, decoder = LatentODEfunc(), RecognitionRNN(), Decoder()
    optimizer = torch.optim.Adam(
        [*func.parameters(), *decoder.parameters(), *encoder.parameters()],
        lr=0.01)
    odeint = (torchdiffeq.odeint_adjoint if args.gradient == "adjoint"
              else torchdiffeq.odeint)
    elbos = []
    started = time.perf_counter()
    for it in range(1, args.iterations + 1):
        optimizer.zero_grad()
        statistics = encoder(x)
        mean, log_var = statistics[:, :LATENT_DIM], statistics[:, LATENT_DIM:]
        z0 = mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape)
        func.evals = 0
        latent_path = odeint(func, z0, t[:NUM_OBSERVED], method="dopri5",
                             rtol=TOL, atol=TOL).permute(1, 0, 2)
        nfe_forward = func.evals
        loss = negative_elbo(x, decoder(latent_path), mean, log_var)
        func.evals = 0
        loss.backward()
        nfe_backward = func.evals
        optimizer.step()
        if it % args.print_every == 0 or it == args.iterations:
            elbos.append({"iteration": it, "elbo": -loss.item(),
                          "nfe_forward": float(nfe_forward),
                          "nfe_backward": (float(nfe_backward)
                                           if args.gradient == "adjoint"
                                           else None)})
            print(f"Iter: {it}, elbo: {-loss.item():.4f}", flush=True)
    train_time = time.perf_counter() - started

    with torch.no_grad():
        mean = encoder(torch.tensor(test_observed))[:, :LATENT_DIM]
        decoded = decoder(torchdiffeq.odeint(
            func, mean, t, method="dopri5", rtol=TOL, atol=TOL
        ).permute(1, 0, 2)).numpy()
    print(json.dumps({
        "library": "torchdiffeq",
        **held_out_errors(decoded, test_observed, test_truth),
        "train_time_s": train_time, "iterations": args.iterations,
        "series": SERIES, "seed": args.seed, "gradient": args.gradient,
        "elbos": elbos, "versions": versions()}))


if __name__ == "__main__":
    main()
