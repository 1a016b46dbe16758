"""Times a training step of the MNIST neural-ODE model in JAX + diffrax.

    .venv-jax/bin/python -m benchmarks.peers.diffrax_step \
        [--solver dopri5|tsit5|bosh3] [--adjoint backsolve|recursive] \
        [--conv slices|stock] \
        [--steps 10] [--warmup 3] [--batch-size 128]

The model of `examples/mnist.py: build_model` in plain JAX functions (NHWC,
as Keras): Conv 3x3 1->64 relu, GroupNorm(64), ZeroPad 1 + Conv 4x4 stride 2
relu, GroupNorm(64), ZeroPad 1 + Conv 4x4 stride 2 (6x6x64), then
`diffrax.diffeqsolve` over t in [0, 1] with `Dopri5()` (or `Tsit5()`,
`Bosh3()`: `--solver`), `dt0=None` and
`PIDController(rtol=1e-3, atol=1e-3)`, saving the final state only, of two
Conv 3x3 64->64 tanh ('same'), GroupNorm(64), relu, the mean over 6x6, Dense
64->10. Softmax cross-entropy on integer labels, `optax.adam(1e-3)`, float32,
on fixed random images (numpy seed 0, as `benchmarks/train_step.py`). The
whole train step (forward, gradient, Adam update) is one `jax.jit`.

To match ours, the weights start Glorot-uniform with zero biases (the head
GroupNorm's beta at -1, as in examples/mnist_common.py), the
GroupNorms use epsilon 1e-3 and Adam epsilon 1e-7.

--adjoint: `backsolve` is `diffrax.BacksolveAdjoint()` (the continuous
adjoint, as ours and torchdiffeq's `odeint_adjoint`; its backward solve uses
diffrax's defaults: the same solver and step-size controller, error norm over
the whole adjoint state); `recursive` is diffrax's default
`RecursiveCheckpointAdjoint()` (backpropagation through the solver's steps,
with checkpointing).

--conv: how the two 3x3 convolutions of the dynamics (the ones inside the
solver's while loop) are computed. `stock` is `jax.lax.conv_general_dilated`;
`slices` pads the input, concatenates its 9 shifted 6x6 windows on the
channel axis and does one matmul: the same convolution, a workaround for
XLA:CPU's slow convolutions inside while loops (jax-ml/jax#12868). The
convolutions outside the ODE use `conv_general_dilated` in both modes.

Threads: XLA:CPU has no supported flag that caps its intra-op thread pool;
it uses its defaults (all cores the process may run on). One host device is
forced (`--xla_force_host_platform_device_count=1`).

Prints one JSON line: library ("diffrax-<adjoint>-<conv>", with
"-<solver>" at the end for a solver other than dopri5), solver, median_step_s,
min_step_s, nfe_forward, nfe_backward, peak_rss_mib, peak_device_mib (JAX's
`peak_bytes_in_use`, null on the CPU), versions, plus
solver_steps_forward (diffrax's `num_steps`, accepted and rejected), compile_s
(the first call, compile included) and the losses of all steps.

NFE. diffrax reports steps, not evaluations. Dopri5 is FSAL: a step (accepted
or rejected) evaluates the vector field 6 times, reusing the last stage of
the previous accepted step, and the very first step evaluates a 7th, its
first stage. Tsit5 is the same; Bosh3 (4 stages, FSAL) evaluates 3 times a
step. With `dt0=None` diffrax 0.7.2 spends no evaluation on the
initial step size: its Hairer heuristic runs only for a bare `ODETerm`, and
`diffeqsolve` hands the controller a wrapped term, so it starts at
dt = 0.01 (we checked both by counting calls with a callback, for all three
solvers). So nfe_forward = 6 * num_steps + 1 (Bosh3: 3 * num_steps + 1; one
more per rejection of the very first
step, which diffrax does not report separately). nfe_backward is null:
`BacksolveAdjoint` does not expose the stats of its backward solve, and
`RecursiveCheckpointAdjoint` has no backward ODE solve (it differentiates
the recomputed forward steps).
"""

import argparse
import json
import os
import platform
import resource
import time

GROUPNORM_EPSILON = 1e-3  # keras.layers.GroupNormalization's default
ADAM_EPSILON = 1e-7  # keras.optimizers.Adam's default
RTOL = ATOL = 1e-3


def conv(x, w, b, stride=1, padding="VALID"):
    """NHWC convolution with HWIO weights, plus bias."""
    import jax

    y = jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + b


def conv3x3_slices(x, w, b):
    """The 3x3 'same' convolution as 9 shifted slices and one matmul."""
    import jax.numpy as jnp

    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Channel blocks in (row, column) order, the order of w's flattening.
    patches = jnp.concatenate(
        [padded[:, i:i + height, j:j + width, :]
         for i in range(3) for j in range(3)], axis=-1)
    return patches @ w.reshape(-1, w.shape[-1]) + b


def group_norm(x, gamma, beta, groups=64):
    import jax.numpy as jnp

    n, h, w, c = x.shape
    grouped = x.reshape(n, h, w, groups, c // groups)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = grouped.var(axis=(1, 2, 4), keepdims=True)
    grouped = (grouped - mean) / jnp.sqrt(var + GROUPNORM_EPSILON)
    return grouped.reshape(n, h, w, c) * gamma + beta


def init_params(key):
    """Glorot-uniform kernels, zero biases, unit GroupNorm scales (as Keras)."""
    import jax
    import jax.numpy as jnp

    # As Keras: fan_in and fan_out both include the kernel's receptive field.
    glorot = jax.nn.initializers.glorot_uniform()
    keys = iter(jax.random.split(key, 6))
    conv_param = lambda k, cin, cout: {
        "w": glorot(next(keys), (k, k, cin, cout), jnp.float32),
        "b": jnp.zeros(cout, jnp.float32)}
    norm_param = lambda beta=0.0: {"gamma": jnp.ones(64, jnp.float32),
                                   "beta": jnp.full(64, beta, jnp.float32)}
    return {
        "conv1": conv_param(3, 1, 64), "norm1": norm_param(),
        "conv2": conv_param(4, 64, 64), "norm2": norm_param(),
        "conv3": conv_param(4, 64, 64),
        "ode": {"conv1": conv_param(3, 64, 64),
                "conv2": conv_param(3, 64, 64)},
        "norm3": norm_param(-1.0),  # the head's, as ours
        "logits": {"w": glorot(next(keys), (64, 10), jnp.float32),
                   "b": jnp.zeros(10, jnp.float32)},
    }


# diffrax's class and the evaluations per step after the first (FSAL).
SOLVERS = {"dopri5": ("Dopri5", 6), "tsit5": ("Tsit5", 6),
           "bosh3": ("Bosh3", 3)}


def make_train_step(adjoint, conv_mode, solver="dopri5", learning_rate=1e-3):
    """`(train_step, optimizer)`; train_step(params, opt_state, x, y)."""
    import diffrax
    import jax
    import jax.numpy as jnp
    import optax

    conv3x3 = (conv3x3_slices if conv_mode == "slices"
               else lambda x, w, b: conv(x, w, b, padding="SAME"))

    def vector_field(t, h, p):
        # The dynamics' weights come in as `args`: BacksolveAdjoint only
        # differentiates with respect to y0, args and the terms.
        h = jnp.tanh(conv3x3(h, p["conv1"]["w"], p["conv1"]["b"]))
        return jnp.tanh(conv3x3(h, p["conv2"]["w"], p["conv2"]["b"]))

    adjoint = (diffrax.BacksolveAdjoint() if adjoint == "backsolve"
               else diffrax.RecursiveCheckpointAdjoint())

    def forward(params, x):
        pad = ((1, 1), (1, 1))
        x = jax.nn.relu(conv(x, **params["conv1"]))                   # 26x26
        x = group_norm(x, **params["norm1"])
        x = jax.nn.relu(conv(x, **params["conv2"], stride=2, padding=pad))
        x = group_norm(x, **params["norm2"])                          # 13x13
        x = conv(x, **params["conv3"], stride=2, padding=pad)         # 6x6
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            getattr(diffrax, SOLVERS[solver][0])(),
            t0=0.0, t1=1.0, dt0=None, y0=x, args=params["ode"],
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            saveat=diffrax.SaveAt(t1=True), adjoint=adjoint,
        )
        x = sol.ys[-1]
        x = jax.nn.relu(group_norm(x, **params["norm3"]))
        logits = x.mean(axis=(1, 2)) @ params["logits"]["w"]
        return logits + params["logits"]["b"], sol.stats["num_steps"]

    def loss_fn(params, x, y):
        logits, num_steps = forward(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return loss.mean(), num_steps

    optimizer = optax.adam(learning_rate, eps=ADAM_EPSILON)

    @jax.jit
    def train_step(params, opt_state, x, y):
        (loss, num_steps), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, num_steps

    return train_step, optimizer


def measure(adjoint, conv_mode, steps, warmup, batch_size, solver="dopri5"):
    import diffrax
    import equinox
    import jax
    import jaxlib
    import numpy as np
    import optax

    train_step, optimizer = make_train_step(adjoint, conv_mode, solver)
    params = init_params(jax.random.PRNGKey(0))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.random((batch_size, 28, 28, 1),
                                     dtype="float32"))
    y = jax.numpy.asarray(rng.integers(0, 10, batch_size), dtype="int32")
    times, losses, compile_s = [], [], None
    for step in range(warmup + steps):
        start = time.perf_counter()
        params, opt_state, loss, num_steps = jax.block_until_ready(
            train_step(params, opt_state, x, y))
        elapsed = time.perf_counter() - start
        if step == 0:
            compile_s = elapsed
        if step >= warmup:
            times.append(elapsed)
        losses.append(float(loss))
    num_steps = int(num_steps)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return {
        "library": f"diffrax-{adjoint}-{conv_mode}"
                   + ("" if solver == "dopri5" else f"-{solver}"),
        "solver": solver,
        "median_step_s": float(np.median(times)),
        "min_step_s": float(np.min(times)),
        # FSAL: see the module docstring.
        "nfe_forward": float(SOLVERS[solver][1] * num_steps + 1),
        "nfe_backward": None,
        "solver_steps_forward": num_steps,
        # ru_maxrss is in KiB on Linux; it includes XLA's compilation.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,
        "peak_device_mib": (stats["peak_bytes_in_use"] / 2**20
                            if stats else None),
        "device": device.device_kind,
        "compile_s": compile_s,
        "losses": losses,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "diffrax": diffrax.__version__,
            "equinox": equinox.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solver", choices=list(SOLVERS), default="dopri5")
    parser.add_argument("--adjoint", choices=["backsolve", "recursive"],
                        default="backsolve")
    parser.add_argument("--conv", choices=["slices", "stock"],
                        default="slices")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step compiles)")
    # Before JAX starts: CPU unless JAX_PLATFORMS says otherwise (cuda on a
    # GPU machine), one host device.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"),
        "--xla_force_host_platform_device_count=1"]))
    print(json.dumps(measure(args.adjoint, args.conv, args.steps,
                             args.warmup, args.batch_size, args.solver)))


if __name__ == "__main__":
    main()
