"""The tutorial's model, schedule, data split, accuracy callback and plots.

No TensorFlow import: shared by `mnist.py` (TensorFlow or JAX backend, with
tfds data) and `benchmarks/gpu_jax.py` (JAX backend, where TensorFlow is
absent).
"""

import json

import keras
import numpy as np
from keras import layers

from keras_node import NeuralODE, gradients, solvers


def build_model(rtol=1e-3, atol=1e-3, solver="dopri5", gradient="adjoint",
                kinetic_energy=0.0, augment_dim=0):
    """The tutorial's model: 28x28x1 images to 10 logits.

    `solver` and `gradient` are `NeuralODE`'s; `rtol` and `atol` apply to
    adaptive solvers only. `augment_dim` zero channels join the 64 of the
    ODE's state (an augmented neural ODE).
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
        layers.Conv2D(64 + augment_dim, 3, padding="same", activation="tanh"),
    ], name="dynamics")
    x = NeuralODE(dynamics, t0=0.0, t1=1.0, solver=solver,
                  gradient=gradients.get(gradient),
                  kinetic_energy=kinetic_energy, augment_dim=augment_dim,
                  **tolerances)(x)
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


def ode_layer(model):
    """The `NeuralODE` layer of a model from `build_model` (or loaded)."""
    return next(layer for layer in model.layers
                if isinstance(layer, NeuralODE))


def without_ode(model):
    """A model from `build_model` with its ODE taken out: its other layers
    (the same weights) in a `keras.Sequential`, images to logits. Its
    benchmarks time what a train step costs besides the solve."""
    ode = ode_layer(model)
    return keras.Sequential([layer for layer in model.layers[1:]
                             if layer is not ode])


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
                        adjoint_norm=None, unroll=False):
    """`NeuralODE`'s `solver` and `gradient` from the command line's names.

    `num_steps` (default 4) and `unroll` are for fixed-step solvers,
    `adjoint_norm` (default seminorm) for the adjoint of adaptive ones.
    """
    solver = solvers.get(solver)
    if not solver.adaptive:
        solver = type(solver)(num_steps=num_steps or 4, unroll=unroll)
    elif unroll:
        raise ValueError(f"Only fixed-step solvers unroll. Received: "
                         f"solver={solver.name!r}, unroll=True")
    if gradient == "adjoint" and solver.adaptive:
        return solver, gradients.Adjoint(norm=adjoint_norm or "seminorm")
    return solver, gradients.get(gradient)


class AccuracyMonitor(keras.callbacks.Callback):
    """Prints train and test accuracy every few iterations, as DiffEqFlux does.

    At iterations 1, 1 + every, 1 + 2 * every, ... (counted by the optimizer,
    so a resumed run goes on counting) it prints

        Iter:  11 || Train Accuracy: 14.773 || Test Accuracy: 14.967

    the accuracies in percent: train over at most `train_batches` batches of
    `train_data`, test over all of `test_data`. Every printed point is kept in
    `history` (a list of dicts with `iteration`, `train_accuracy`,
    `test_accuracy`), together with each iteration's numeric logs in
    `iteration_logs`: its `nfe_forward`, `nfe_backward`, ..., and Keras'
    running means of the loss and the accuracy over the epoch's batches so
    far (so far since `fit` began, in a resumed epoch).

    Args:
        train_data: a `tf.data.Dataset` of `(images, labels)` batches, labels
            sparse. Iterated afresh at each print.
        test_data: a dataset of the same form, evaluated whole.
        every: print every this many iterations, a positive integer.
            Defaults to `10`.
        train_batches: the most training batches to measure, a positive
            integer. Defaults to `100`.
        verbose: the `verbose` of `fit`: with 1, Keras' progress bar is on
            the current line, so each line starts on a new one.
    """

    def __init__(self, train_data, test_data, every=10, train_batches=100,
                 verbose=0):
        super().__init__()
        for name, value in (("every", every),
                            ("train_batches", train_batches)):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or value < 1:
                raise ValueError(
                    f"Received an invalid value for argument `{name}`, "
                    f"expected a positive integer. Received: {name}={value!r}"
                )
        self.train_data = train_data.take(train_batches)
        self.test_data = test_data
        self.every = every
        self.verbose = verbose
        self.history = []
        self.iteration_logs = []
        self._predict = None

    def accuracy(self, dataset):
        """Percent of correctly classified examples in `dataset`."""
        if self._predict is None:
            self._predict = _compiled_argmax(self.model)
        metric = keras.metrics.Accuracy()
        for images, labels in dataset:
            metric.update_state(np.asarray(labels), self._predict(images))
        return 100.0 * float(metric.result())

    def on_train_batch_end(self, batch, logs=None):
        iteration = int(self.model.optimizer.iterations.numpy())
        numeric = {k: float(v) for k, v in (logs or {}).items()
                   if np.ndim(v) == 0}
        self.iteration_logs.append({"iteration": iteration, **numeric})
        if (iteration - 1) % self.every:
            return
        point = {
            "iteration": iteration,
            "train_accuracy": self.accuracy(self.train_data),
            "test_accuracy": self.accuracy(self.test_data),
        }
        self.history.append(point)
        # From the second batch of an epoch on, the bar (drawn after this
        # callback) is on the current line, unterminated.
        start = "\n" if self.verbose == 1 and batch > 0 else ""
        print(
            f"{start}Iter: {iteration:3d} || "
            f"Train Accuracy: {point['train_accuracy']:.3f} || "
            f"Test Accuracy: {point['test_accuracy']:.3f}", flush=True)


def _compiled_argmax(model):
    """A compiled `images -> predicted classes` on this process alone.

    Not `predict_on_batch`: under a distribution strategy that would spread
    each batch over the replicas.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(
            lambda x: tf.argmax(model(x, training=False), axis=-1),
            reduce_retracing=True)
    return lambda x: np.argmax(model.predict_on_batch(np.asarray(x)), -1)


def plot_history(accuracy, iterations, out, watched="held-out"):
    """Writes `accuracy.png` and `nfe.png` into `out`.

    `watched` names the split of the accuracy measured during training.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    figures = [
        ("accuracy.png", accuracy, "accuracy (%)", "Neural-ODE MNIST classifier",
         {"train_accuracy": "train", "test_accuracy": watched}),
        ("nfe.png", iterations, "function evaluations",
         "Solver cost per iteration",
         {"nfe_forward": "forward", "nfe_backward": "backward"}),
    ]
    for filename, points, ylabel, title, series in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series.items():
            ax.plot([p["iteration"] for p in points],
                    [p.get(key, float("nan")) for p in points], label=label)
        ax.set(xlabel="iteration", ylabel=ylabel, title=title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)


def resume_history(monitor, path, done):
    """Restores `monitor`'s points up to iteration `done` from `path`."""
    if not (done and path.exists()):
        return
    try:
        saved = json.loads(path.read_text())
        monitor.history = [p for p in saved["accuracy"]
                           if p["iteration"] <= done]
        monitor.iteration_logs = [p for p in saved["iterations"]
                                  if p["iteration"] <= done]
    except (ValueError, KeyError, TypeError) as error:
        print(f"Warning: {path} is damaged ({error}); the accuracy and "
              "evaluation-count history starts afresh.")
