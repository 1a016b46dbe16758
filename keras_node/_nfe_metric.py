"""Reports a `NeuralODE` layer's evaluation counters as a Keras metric."""

import weakref

import keras

from keras_node._keras_compat import has_functional_sibling

FORWARD = "nfe_forward"
BACKWARD = "nfe_backward"
ACCEPTED = "steps_accepted"
REJECTED = "steps_rejected"


class EvaluationCounts(keras.metrics.Metric):
    """Puts the layer's last evaluation and step counts in the logs.

    The counters themselves are the layer's non-trainable variables (so that
    they are saved with it and captured by exported functions); this metric
    only reports them. Its result is a dict, which Keras puts at the top level
    of `fit`'s logs and progress bar: `{"nfe_forward": ..., "nfe_backward":
    ..., "steps_accepted": ..., "steps_rejected": ...}` (the last two of the
    forward solve), each key prefixed with the layer's name when the layer's
    functional graph holds other `NeuralODE` layers. Values are the last
    solve's counts (not a running mean), so a per-batch callback sees each
    step's own cost. `evaluate`'s and validation's logs leave out
    `nfe_backward`: their solves (which no gradient tape records) have no
    backward pass, and the counter still holds the last training step's.

    Under a distribution strategy with several replicas, each replica's
    adaptive solver takes its own steps on its own sub-batch: `nfe_forward`
    is then the mean over replicas and `nfe_forward_max` (likewise
    `nfe_backward_max`) the most any replica took, which is what the step
    waits for.
    """

    def __init__(self, layer, name="evaluation_counts", **kwargs):
        super().__init__(name=name, **kwargs)
        # A weak reference: the layer owns this metric, not the reverse, and
        # saving walks attributes.
        self._layer = weakref.ref(layer)

    def update_state(self, *args, **kwargs):
        pass  # the layer updates its counters itself

    def reset_state(self):
        pass  # counters describe the last solve; there is nothing to reset

    def result(self):
        if keras.backend.backend() != "tensorflow":
            # Keras' JAX trainer computes metrics from metric variables
            # alone; `callbacks.LogEvaluationCounts` logs the counts there.
            return {}
        layer = self._layer()
        counts = named_counts(layer, backward=layer._differentiated)
        # In a replica, the counters read this replica's own solve; Keras
        # averages the logs over replicas. Add the slowest replica's.
        counts.update(_replica_maxima(counts))
        return counts

    def get_config(self):
        raise NotImplementedError(
            "EvaluationCounts belongs to its NeuralODE layer and is not "
            "serialized on its own."
        )


def named_counts(layer, backward=True):
    """`{"nfe_forward": ..., "nfe_backward": ..., "steps_accepted": ...,
    "steps_rejected": ...}`, prefixed with the layer's name when its model
    holds other `NeuralODE` layers (as `NeuralODE.note_model` found, or its
    functional graph shows); without `nfe_backward` unless `backward`."""
    shared = layer.shares_model or has_functional_sibling(layer)
    prefix = layer.name + "_" if shared else ""
    counts = {prefix + FORWARD: layer.num_forward_evals,
              prefix + BACKWARD: layer.num_backward_evals,
              prefix + ACCEPTED: layer.steps_accepted,
              prefix + REJECTED: layer.steps_rejected}
    if not backward:
        del counts[prefix + BACKWARD]
    return counts


def _replica_maxima(counts):
    """`{key + "_max": max over replicas}` inside a multi-replica step."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return {}
    return {key + "_max": tf.reduce_max(
                context.all_gather(value[None], axis=0))
            for key, value in counts.items() if "nfe_" in key}
