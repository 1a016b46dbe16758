"""Times a training step of the MNIST neural-ODE model in PyTorch + torchdiffeq.

    .venv-torch/bin/python benchmarks/peers/torchdiffeq_step.py \
        [--steps 10] [--warmup 3] [--batch-size 128] [--device cuda]

The model of `examples/mnist.py: build_model`, layer for layer: Conv 3x3
1->64 relu, GroupNorm(64, 64), ZeroPad 1 + Conv 4x4 stride 2 relu,
GroupNorm(64, 64), ZeroPad 1 + Conv 4x4 stride 2 (64x6x6), then
`torchdiffeq.odeint_adjoint` over t in [0, 1] (dopri5, rtol = atol = 1e-3)
of two Conv 3x3 64->64 tanh (padding 1), GroupNorm(64, 64), relu, the mean
over 6x6, Linear 64->10. Softmax cross-entropy on integer labels, Adam 1e-3,
float32, on fixed random images (numpy seed 0, as `benchmarks/train_step.py`).

To match ours, the weights start Glorot-uniform with zero biases (the head
GroupNorm's beta at -1, as in examples/mnist_common.py), the
GroupNorms use epsilon 1e-3 and Adam epsilon 1e-7. torchdiffeq's defaults are
kept otherwise (its initial step heuristic; its adjoint error norm, the
maximum over state, adjoint and parameter-adjoint norms).

Prints one JSON line: library, median_step_s, min_step_s, nfe_forward and
nfe_backward (dynamics evaluations of the last step, counted in the dynamics'
`forward`: during the model's forward pass, and during `loss.backward()`
where each evaluation of the adjoint system calls the dynamics once),
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


class ODEBlock(nn.Module):
    """h(1) from h(0) = input, by dopri5 with adjoint gradients."""

    def __init__(self, dynamics):
        super().__init__()
        self.dynamics = dynamics
        self.register_buffer("t", torch.tensor([0.0, 1.0]))

    def forward(self, h0):
        return torchdiffeq.odeint_adjoint(
            self.dynamics, h0, self.t, method="dopri5", rtol=RTOL, atol=ATOL
        )[-1]


def build_model():
    norm = lambda: nn.GroupNorm(64, 64, eps=GROUPNORM_EPSILON)
    model = nn.Sequential(
        nn.Conv2d(1, 64, 3), nn.ReLU(),                           # 26x26
        norm(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),     # 13x13
        norm(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1),                # 6x6
        ODEBlock(Dynamics()),
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


def measure(steps, warmup, batch_size, threads, device="cpu"):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model().to(device)
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
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "library": "torchdiffeq",
        "median_step_s": float(np.median(times)),
        "min_step_s": float(np.min(times)),
        "nfe_forward": float(nfe_forward),
        "nfe_backward": float(nfe_backward),
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
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="torch device, e.g. cuda (default: %(default)s)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.steps, args.warmup, args.batch_size,
                             args.threads, args.device)))


if __name__ == "__main__":
    main()
