"""Keras callbacks for training neural ODEs."""

import keras


class LogEvaluationCounts(keras.callbacks.Callback):
    """Puts every `NeuralODE` layer's evaluation counts in the logs of
    `fit` and `evaluate`.

    On the TensorFlow backend the layers' own metric already does (this
    callback then does nothing). Keras' JAX trainer builds its logs from
    metric variables alone, so on JAX this callback adds `nfe_forward`,
    `nfe_backward`, `steps_accepted` and `steps_rejected` (prefixed with
    the layer's name when a model holds several) to each batch's logs, for
    the progress bar and for the callbacks after it in the list: put it
    first.

    Why a callback on JAX: Keras' JAX trainer computes the logs inside its
    compiled step, from the metrics' own variables only (a stateless scope
    that maps nothing else), so a metric cannot read the layer's counters
    there; and the backward count is known only once the backward solve
    has run, after the step's logs are computed. This callback reads the
    counters after the step, once `jax.effects_barrier()` has waited for the
    backward pass's report, so the logs hold the current step's counts. It
    adds those of `evaluate`'s solves too (all but `nfe_backward`: they solve
    no backward), and `fit`'s epoch logs get the validation's as
    `val_nfe_forward`, ..., as on TensorFlow. Only the dict that `evaluate`
    returns lacks them (Keras hands callbacks a copy of its logs): read the
    layer's counters (`num_forward_evals`, ...).
    """

    def __init__(self):
        super().__init__()
        self._counts = {}  # the last train step's, on JAX
        self._test_counts = {}  # the last test step's of this epoch

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None and keras.backend.backend() == "jax":
            self._counts = self._read()
            logs.update(self._counts)

    def on_epoch_begin(self, epoch, logs=None):
        self._test_counts = {}

    def on_test_batch_end(self, batch, logs=None):
        # `evaluate`'s, also validation's inside `fit`.
        if logs is not None and keras.backend.backend() == "jax":
            self._test_counts = self._read(backward=False)
            logs.update(self._test_counts)

    def on_test_end(self, logs=None):
        self.on_test_batch_end(None, logs)

    def _read(self, backward=True):
        """Every `NeuralODE` layer's counts, once the step's are in; without
        `nfe_backward` for a test step (it solves no backward)."""
        import jax

        from keras_node import NeuralODE
        from keras_node._keras_compat import flatten_layers
        from keras_node._nfe_metric import named_counts

        jax.effects_barrier()  # the backward count of this step is in
        counts = {}
        for layer in flatten_layers(self.model):
            if isinstance(layer, NeuralODE):
                layer.note_model(self.model)
                counts.update({name: float(value) for name, value
                               in named_counts(layer, backward).items()})
        return counts

    def on_epoch_end(self, epoch, logs=None):
        # The epoch's last train step, for `History` (validation has since
        # solved again), and the validation's last solve.
        if logs is not None:
            logs.update(self._counts)
            logs.update({f"val_{name}": value
                         for name, value in self._test_counts.items()})
