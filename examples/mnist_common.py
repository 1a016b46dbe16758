"""The tutorial's model, schedule and data split, with no TensorFlow import.

Shared by `mnist.py` (TensorFlow backend, tfds data) and
`benchmarks/gpu_jax.py` (JAX backend, where TensorFlow is absent).
"""

import keras
import numpy as np
from keras import layers

from keras_node import NeuralODE, gradients, solvers


def build_model(rtol=1e-3, atol=1e-3, solver="dopri5", gradient="adjoint",
                kinetic_energy=0.0):
    """The tutorial's model: 28x28x1 images to 10 logits.

    `solver` and `gradient` are `NeuralODE`'s; `rtol` and `atol` apply to
    adaptive solvers only.
    """
    solver = solvers.get(solver)
    tolerances = dict(rtol=rtol, atol=atol) if solver.adaptive else {}
    images = keras.Input((28, 28, 1), name="images")
    x = layers.Conv2D(64, 3, activation="relu")(images)            # 26x26
    x = layers.GroupNormalization(64)(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.Conv2D(64, 4, strides=2, activation="relu")(x)      # 13x13
    x = layers.GroupNormalization(64)(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.Conv2D(64, 4, strides=2)(x)                         # 6x6
    dynamics = keras.Sequential([
        layers.Conv2D(64, 3, padding="same", activation="tanh"),
        layers.Conv2D(64, 3, padding="same", activation="tanh"),
    ], name="dynamics")
    x = NeuralODE(dynamics, t0=0.0, t1=1.0, solver=solver,
                  gradient=gradients.get(gradient),
                  kinetic_energy=kinetic_energy, **tolerances)(x)
    # With 64 groups for 64 channels, GroupNorm standardises each channel
    # over its 6x6 positions, so with the usual beta = 0 the mean of
    # relu(.) below barely differs between images, and training idles for
    # about 100 iterations until Adam has moved beta. Starting at beta = -1
    # makes the head measure at once how much of each channel stands out
    # (loss 1.35 instead of 1.79 over iterations 31-60, seed 0).
    x = layers.GroupNormalization(
        64, beta_initializer=keras.initializers.Constant(-1.0))(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)                         # 6x6 mean
    logits = layers.Dense(10, name="logits")(x)
    return keras.Model(images, logits, name="ode_mnist")


def learning_rate_schedule(peak, total_steps):
    """Linear warm-up over 5% of the steps, then cosine decay to zero."""
    warmup = max(1, total_steps // 20)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=peak, warmup_steps=warmup,
        decay_steps=max(1, total_steps - warmup), alpha=0.0,
    )


def make_optimizer(learning_rate, total_steps, weight_decay=0.0, ema=0.0):
    """Adam on `learning_rate_schedule`, with optional weight decay and EMA.

    Weight decay (decoupled, as AdamW) applies to the kernels only, not to
    the biases or GroupNorm's scales; `ema` is the momentum of an
    exponential moving average of the weights (0: none).
    """
    optimizer = keras.optimizers.Adam(
        learning_rate_schedule(learning_rate, total_steps),
        weight_decay=weight_decay or None,
        use_ema=ema > 0, ema_momentum=ema or 0.99)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def stratified_split(labels, fraction, seed):
    """Indices `(kept, held_out)`, held out `fraction` of each class.

    The held-out total is `round(fraction * len(labels))`, shared among the
    classes by largest remainder, so every class keeps its proportion to
    within one example.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * fraction
    quota = np.floor(exact).astype(int)
    remainder = int(round(fraction * len(labels))) - quota.sum()
    quota[np.argsort(quota - exact)[:remainder]] += 1
    kept, held_out = [], []
    for label, n_held in zip(classes, quota):
        members = rng.permutation(np.flatnonzero(labels == label))
        held_out.append(members[:n_held])
        kept.append(members[n_held:])
    return (rng.permutation(np.concatenate(kept)),
            np.sort(np.concatenate(held_out)))


def solver_and_gradient(solver, num_steps=None, gradient="adjoint",
                        adjoint_norm=None):
    """`NeuralODE`'s `solver` and `gradient` from the command line's names.

    `num_steps` (default 4) is for fixed-step solvers, `adjoint_norm`
    (default seminorm) for the adjoint of adaptive ones.
    """
    solver = solvers.get(solver)
    if not solver.adaptive:
        solver = type(solver)(num_steps=num_steps or 4)
    if gradient == "adjoint" and solver.adaptive:
        return solver, gradients.Adjoint(norm=adjoint_norm or "seminorm")
    return solver, gradients.get(gradient)
