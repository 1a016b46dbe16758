"""Times a training step of the MNIST neural-ODE model in PyTorch + torchdiffeq.

    .venv-torch/bin/python -m benchmarks.peers.torchdiffeq_step \
        [--method dopri5|tsit5|bosh3|rk4] [--gradient adjoint|backprop] \
        [--num-steps 4] [--steps 10] [--warmup 3] [--batch-size 128] \
        [--device cuda]

The model of `examples/mnist.py: build_model`, layer for layer: Conv 3x3
1->64 relu, GroupNorm(64, 64), ZeroPad 1 + Conv 4x4 stride 2 relu,
GroupNorm(64, 64), ZeroPad 1 + Conv 4x4 stride 2 (64x6x6), then
`torchdiffeq.odeint_adjoint` over t in [0, 1] (by default: dopri5,
rtol = atol = 1e-3, see --method and --gradient below)
of two Conv 3x3 64->64 tanh (padding 1), GroupNorm(64, 64), relu, the mean
over 6x6, Linear 64->10. Softmax cross-entropy on integer labels, Adam 1e-3,
float32, on fixed random images (numpy seed 0, as `benchmarks/train_step.py`).

To match ours, the weights start Glorot-uniform with zero biases (the head
GroupNorm's beta at -1, as in examples/mnist_common.py), the
GroupNorms use epsilon 1e-3 and Adam epsilon 1e-7. torchdiffeq's defaults are
kept otherwise (its initial step heuristic; its adjoint error norm, the
maximum over state, adjoint and parameter-adjoint norms).

--method: torchdiffeq's `dopri5`, `bosh3` or `rk4` (fixed steps,
`options=dict(step_size=1/N)` with N = `--num-steps`; torchdiffeq's rk4 is
the 3/8-rule variant, 4 evaluations a step; the run fails unless the forward
pass took exactly 4 N). `tsit5`: torchdiffeq 0.2.5 has no Tsit5
(rtqichen/torchdiffeq#194; PR #261, which adds one, is open), so
`Tsit5Solver` below adds Tsitouras' 5(4) pair to its adaptive
Runge-Kutta solver, the same machinery as its dopri5 (FSAL, 6 evaluations a
step, its step control and quartic dense output, here through Tsitouras'
own dense output at the step's midpoint).
--gradient: `adjoint` is `torchdiffeq.odeint_adjoint` (the default, the
continuous adjoint, its backward solve with the same method and options);
`backprop` is `torchdiffeq.odeint`, autograd through the solver's
operations (nfe_backward is then null: the backward pass evaluates no
dynamics, it replays the recorded graph).

Prints one JSON line: library, method, gradient, num_steps (rk4's, else
null), median_step_s, min_step_s, nfe_forward and nfe_backward (dynamics
evaluations of the last step, counted in the dynamics' `forward`: during the
model's forward pass, and during `loss.backward()` where each evaluation of
the adjoint system calls the dynamics once),
peak_rss_mib, peak_device_mib (`torch.cuda.max_memory_allocated`, null on
the CPU), versions, and the losses of all steps (a check that training
moves). `--device cuda` runs it on the GPU.
"""

import argparse
import json
import platform
import resource
import time

import numpy as np
import torch
import torchdiffeq
from torch import nn
from torch.nn import functional as F
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import (RKAdaptiveStepsizeODESolver,
                                        _ButcherTableau)

RTOL = ATOL = 1e-3
GROUPNORM_EPSILON = 1e-3  # keras.layers.GroupNormalization's default
ADAM_EPSILON = 1e-7  # keras.optimizers.Adam's default


class Dynamics(nn.Module):
    """dh/dt = tanh(conv(tanh(conv(h)))), counting its evaluations."""

    def __init__(self, channels=64):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.evals = 0

    def forward(self, t, h):
        self.evals += 1
        return torch.tanh(self.conv2(torch.tanh(self.conv1(h))))


# Tsitouras (2011), Table 1; `mid` is his dense output at theta = 1/2 (the
# numbers of keras_node/_solver.py and of diffrax's Tsit5).
_TSIT5_B = [0.09646076681806523, 0.01, 0.4798896504144996,
            1.379008574103742, -3.290069515436081, 2.324710524099774]
_TSIT5_B_HAT = [0.09468075576583945, 0.009183565540343254,
                0.4877705284247616, 1.234297566930479, -2.7077123499835256,
                1.866628418170587, 1 / 66]


class Tsit5Solver(RKAdaptiveStepsizeODESolver):
    """Tsit5 on torchdiffeq's adaptive Runge-Kutta machinery."""

    order = 5
    tableau = _ButcherTableau(
        alpha=torch.tensor([0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0],
                           dtype=torch.float64),
        beta=[torch.tensor(row, dtype=torch.float64) for row in [
            [0.161],
            [-0.008480655492356989, 0.335480655492357],
            [2.8971530571054935, -6.359448489975075, 4.3622954328695815],
            [5.325864828439257, -11.748883564062828, 7.4955393428898365,
             -0.09249506636175525],
            [5.86145544294642, -12.92096931784711, 8.159367898576159,
             -0.071584973281401, -0.028269050394068383],
            _TSIT5_B]],
        c_sol=torch.tensor(_TSIT5_B + [0.0], dtype=torch.float64),
        c_error=torch.tensor([b - b_hat for b, b_hat in
                              zip(_TSIT5_B + [0.0], _TSIT5_B_HAT)],
                             dtype=torch.float64),
    )
    mid = torch.tensor([0.10741235230096871, 0.01135625, 0.39560903056045305,
                        -0.34475214352593553, 1.3161853649581645,
                        -1.0170608542936508, 0.03125], dtype=torch.float64)


SOLVERS.setdefault("tsit5", Tsit5Solver)  # odeint's and odeint_adjoint's


class ODEBlock(nn.Module):
    """h(1) from h(0) = input, by `method`, adjoint or backprop gradients."""

    def __init__(self, dynamics, method="dopri5", gradient="adjoint",
                 num_steps=4):
        super().__init__()
        self.dynamics = dynamics
        self.method = method
        self.odeint = (torchdiffeq.odeint_adjoint if gradient == "adjoint"
                       else torchdiffeq.odeint)
        self.options = (dict(step_size=1 / num_steps) if method == "rk4"
                        else None)
        self.register_buffer("t", torch.tensor([0.0, 1.0]))

    def forward(self, h0):
        return self.odeint(
            self.dynamics, h0, self.t, method=self.method, rtol=RTOL,
            atol=ATOL, options=self.options,
        )[-1]


def build_model(method="dopri5", gradient="adjoint", num_steps=4):
    norm = lambda: nn.GroupNorm(64, 64, eps=GROUPNORM_EPSILON)
    model = nn.Sequential(
        nn.Conv2d(1, 64, 3), nn.ReLU(),                           # 26x26
        norm(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),     # 13x13
        norm(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1),                # 6x6
        ODEBlock(Dynamics(), method, gradient, num_steps),
        norm(), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )
    for module in model.modules():  # Keras' initialisation
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.constant_(model[-5].bias, -1.0)  # the head's GroupNorm, as ours
    return model


METHODS = ["dopri5", "tsit5", "bosh3", "rk4"]


def measure(steps, warmup, batch_size, threads, device="cpu",
            method="dopri5", gradient="adjoint", num_steps=4):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(method, gradient, num_steps).to(device)
    dynamics = next(m for m in model.modules() if isinstance(m, Dynamics))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=ADAM_EPSILON)
    rng = np.random.default_rng(0)
    # The same numbers as benchmarks/train_step.py, channels first.
    x = rng.random((batch_size, 28, 28, 1), dtype="float32")
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(rng.integers(0, 10, batch_size)).to(device)
    cuda = device.startswith("cuda")
    times, losses = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        dynamics.evals = 0
        loss = F.cross_entropy(model(x), y)
        nfe_forward = dynamics.evals
        dynamics.evals = 0
        loss.backward()
        nfe_backward = dynamics.evals
        if method == "rk4" and nfe_forward != 4 * num_steps:
            raise RuntimeError(f"rk4 took {nfe_forward / 4} steps, not "
                               f"{num_steps}")
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "library": "torchdiffeq",
        "method": method,
        "gradient": gradient,
        "num_steps": num_steps if method == "rk4" else None,
        "median_step_s": float(np.median(times)),
        "min_step_s": float(np.min(times)),
        "nfe_forward": float(nfe_forward),
        # backprop: null, the backward pass calls no dynamics (see above).
        "nfe_backward": (float(nfe_backward) if gradient == "adjoint"
                         else None),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,
        "peak_device_mib": (torch.cuda.max_memory_allocated() / 2**20
                            if cuda else None),
        "device": device,
        "threads": torch.get_num_threads(),
        "losses": losses,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchdiffeq": torchdiffeq.__version__,
            "numpy": np.__version__,
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=METHODS, default="dopri5")
    parser.add_argument("--gradient", choices=["adjoint", "backprop"],
                        default="adjoint",
                        help="odeint_adjoint or odeint (default: %(default)s)")
    parser.add_argument("--num-steps", type=int, default=4,
                        help="steps of rk4 over [0, 1] (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="torch device, e.g. cuda (default: %(default)s)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.steps, args.warmup, args.batch_size,
                             args.threads, args.device, args.method,
                             args.gradient, args.num_steps)))


if __name__ == "__main__":
    main()
