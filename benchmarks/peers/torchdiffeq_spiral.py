"""torchdiffeq's `examples/ode_demo.py`, as `examples/spiral.py` runs it.

    .venv-torch/bin/python -m benchmarks.peers.torchdiffeq_spiral \\
        --iterations 2000 --seed 0 [--gradient adjoint|backprop]

The same true trajectory (scipy's DOP853 at 1e-12, as ours), the same
random sub-trajectories (the same numpy generator and seed, so the very same
batches), the same network and initialisation scheme, RMSprop at 1e-3, the
mean absolute error, dopri5 at torchdiffeq's default tolerances (rtol 1e-7,
atol 1e-9). Prints one JSON line: the final loss over the whole trajectory
and the training time (whole-trajectory tests excluded, as in ours), with
the settings and the versions.
"""

import argparse
import json
import time

import numpy as np
import scipy.integrate
import torch
import torchdiffeq

from benchmarks.machine import versions

TRUE_A = np.array([[-0.1, 2.0], [-2.0, -0.1]])
TRUE_Y0 = np.array([2.0, 0.0])
DATA_SIZE, T1 = 1000, 25.0
BATCH_TIME, BATCH_SIZE = 10, 20


class ODEFunc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 50),
                                       torch.nn.Tanh(),
                                       torch.nn.Linear(50, 2))
        for m in self.net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, mean=0, std=0.1)
                torch.nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y ** 3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--test-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient", default="adjoint",
                        choices=["adjoint", "backprop"])
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(torch.get_num_threads())

    t_np = np.linspace(0.0, T1, DATA_SIZE)
    true_np = scipy.integrate.solve_ivp(
        lambda _, y: (y ** 3) @ TRUE_A, (0.0, T1), TRUE_Y0, t_eval=t_np,
        method="DOP853", rtol=1e-12, atol=1e-12).y.T.astype("float32")
    rng = np.random.default_rng(args.seed)  # ours draws the same batches
    starts = rng.integers(0, DATA_SIZE - BATCH_TIME,
                          size=args.iterations * BATCH_SIZE)
    t = torch.tensor(t_np, dtype=torch.float32)
    true_y = torch.tensor(true_np)
    y0 = torch.tensor(TRUE_Y0[None], dtype=torch.float32)

    func = ODEFunc()
    optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)
    odeint = (torchdiffeq.odeint_adjoint if args.gradient == "adjoint"
              else torchdiffeq.odeint)
    testing = 0.0
    started = time.perf_counter()
    for it in range(args.iterations):
        s = starts[it * BATCH_SIZE:(it + 1) * BATCH_SIZE]
        batch_y0 = true_y[s]
        batch_y = torch.stack([true_y[s + i] for i in range(BATCH_TIME)], 0)
        optimizer.zero_grad()
        pred = odeint(func, batch_y0, t[:BATCH_TIME], method="dopri5")
        loss = torch.mean(torch.abs(pred - batch_y))
        loss.backward()
        optimizer.step()
        if (it + 1) % args.test_every == 0:
            test_started = time.perf_counter()
            with torch.no_grad():
                whole = torchdiffeq.odeint(func, y0, t, method="dopri5")
                total = torch.mean(torch.abs(whole[:, 0] - true_y))
            testing += time.perf_counter() - test_started
            print(f"Iter {it + 1:04d} | Total Loss {total.item():.6f}",
                  flush=True)
    train_time = time.perf_counter() - started - testing
    with torch.no_grad():
        whole = torchdiffeq.odeint(func, y0, t, method="dopri5")
        final = torch.mean(torch.abs(whole[:, 0] - true_y)).item()
    print(json.dumps({"library": "torchdiffeq", "final_loss": final,
                      "train_time_s": train_time,
                      "iterations": args.iterations, "seed": args.seed,
                      "gradient": args.gradient,
                      "versions": versions()}))


if __name__ == "__main__":
    main()
