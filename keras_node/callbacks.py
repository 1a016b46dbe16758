"""Keras callbacks for training neural ODEs."""

import keras


class LogEvaluationCounts(keras.callbacks.Callback):
    """Puts every `NeuralODE` layer's evaluation counts in `fit`'s logs.

    On the TensorFlow backend the layers' own metric already does (this
    callback then does nothing). Keras' JAX trainer builds its logs from
    metric variables alone, so on JAX this callback adds `nfe_forward` and
    `nfe_backward` (prefixed with the layer's name when a model holds
    several) to each batch's logs, for the progress bar and for the callbacks
    after it in the list: put it first.

    Why a callback on JAX: Keras' JAX trainer computes the logs inside its
    compiled step, from the metrics' own variables only (a stateless scope
    that maps nothing else), so a metric cannot read the layer's counters
    there; and the backward count is known only once the backward solve
    has run, after the step's logs are computed. This callback reads the
    counters after the step, once `jax.effects_barrier()` has waited for the
    backward pass's report, so the logs hold the current step's counts.
    """

    def __init__(self):
        super().__init__()
        self._counts = {}  # the last train step's, on JAX

    def on_train_batch_end(self, batch, logs=None):
        if logs is None or keras.backend.backend() == "tensorflow":
            return
        import jax

        from keras_node import NeuralODE
        from keras_node._keras_compat import flatten_layers
        from keras_node._nfe_metric import named_counts

        jax.effects_barrier()  # the backward count of this step is in
        self._counts = {}
        for layer in flatten_layers(self.model):
            if isinstance(layer, NeuralODE):
                layer.note_model(self.model)
                self._counts.update({name: float(value) for name, value
                                     in named_counts(layer).items()})
        logs.update(self._counts)

    def on_epoch_end(self, epoch, logs=None):
        # The epoch's last train step, for `History` (validation has since
        # solved again).
        if logs is not None:
            logs.update(self._counts)
