"""Keras callbacks for training neural ODEs."""

import keras
import numpy as np


class AccuracyMonitor(keras.callbacks.Callback):
    """Prints train and test accuracy every few iterations, as DiffEqFlux does.

    At iterations 1, 1 + every, 1 + 2 * every, ... (counted by the optimizer,
    so a resumed run goes on counting) it prints

        Iter:  11 || Train Accuracy: 14.773 || Test Accuracy: 14.967

    the accuracies in percent: train over at most `train_batches` batches of
    `train_data`, test over all of `test_data`. Every printed point is kept in
    `history` (a list of dicts with `iteration`, `train_accuracy`,
    `test_accuracy`), together with each iteration's numeric logs (loss,
    `nfe_forward`, `nfe_backward`, ...) in `iteration_logs`.

    Args:
        train_data: a `tf.data.Dataset` of `(images, labels)` batches, labels
            sparse. Iterated afresh at each print.
        test_data: a dataset of the same form, evaluated whole.
        every: print every this many iterations, a positive integer.
            Defaults to `10`.
        train_batches: the most training batches to measure, a positive
            integer. Defaults to `100`.
        print_fn: where lines go. Defaults to `print`.
    """

    def __init__(self, train_data, test_data, every=10, train_batches=100,
                 print_fn=print):
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
        self.print_fn = print_fn
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
        self.print_fn(
            f"Iter: {iteration:3d} || "
            f"Train Accuracy: {point['train_accuracy']:.3f} || "
            f"Test Accuracy: {point['test_accuracy']:.3f}"
        )


class LogEvaluationCounts(keras.callbacks.Callback):
    """Puts every `NeuralODE` layer's evaluation counts in `fit`'s logs.

    On the TensorFlow backend the layers' own metric already does (this
    callback then does nothing). Keras' JAX trainer builds its logs from
    metric variables alone, so on JAX this callback adds `nfe_forward` and
    `nfe_backward` (prefixed with the layer's name when a model holds
    several) to each batch's logs, for the progress bar and for the callbacks
    after it in the list.
    """

    def on_train_batch_end(self, batch, logs=None):
        if logs is None or keras.backend.backend() == "tensorflow":
            return
        from keras_node import NeuralODE
        from keras_node._nfe_metric import named_counts

        for layer in self.model._flatten_layers(include_self=False):
            if isinstance(layer, NeuralODE):
                logs.update({name: float(value) for name, value
                             in named_counts(layer).items()})


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
