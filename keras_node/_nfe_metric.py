"""The function-evaluation counters of a `NeuralODE` layer, as a Keras metric."""

import keras

FORWARD = "nfe_forward"
BACKWARD = "nfe_backward"


class EvaluationCounts(keras.metrics.Metric):
    """The number of dynamics evaluations of the last forward and backward solve.

    Its result is a dict, which Keras puts at the top level of `fit`'s logs
    and progress bar: `{"nfe_forward": ..., "nfe_backward": ...}`, each key
    prefixed with the layer's name when the layer's functional graph holds
    other `NeuralODE` layers. Values are the last solve's counts (not a
    running mean), so a per-batch callback sees each step's own cost. Under a
    distribution strategy each replica counts its own solve and the result is
    the mean over replicas.
    """

    def __init__(self, layer, name="evaluation_counts", **kwargs):
        super().__init__(name=name, **kwargs)
        self._layer = layer
        self.forward = self.add_variable(
            shape=(), initializer="zeros", dtype="float32",
            aggregation="mean", name="forward",
        )
        self.backward = self.add_variable(
            shape=(), initializer="zeros", dtype="float32",
            aggregation="mean", name="backward",
        )

    def update_state(self, forward=None, backward=None):
        if forward is not None:
            self.forward.assign(keras.ops.cast(forward, "float32"))
        if backward is not None:
            self.backward.assign(keras.ops.cast(backward, "float32"))

    def result(self):
        prefix = self._layer.name + "_" if _has_sibling(self._layer) else ""
        return {prefix + FORWARD: self.forward.value,
                prefix + BACKWARD: self.backward.value}

    def reset_state(self):
        self.forward.assign(0.0)
        self.backward.assign(0.0)

    def get_config(self):
        raise NotImplementedError(
            "EvaluationCounts belongs to its NeuralODE layer and is not "
            "serialized on its own."
        )


def _has_sibling(layer):
    """Whether `layer`'s functional graph holds another layer of its class."""
    seen, stack = set(), list(layer._inbound_nodes) + list(layer._outbound_nodes)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        op = node.operation
        if op is not layer and isinstance(op, type(layer)):
            return True
        stack.extend(node.parent_nodes)
        stack.extend(op._outbound_nodes)
        stack.extend(op._inbound_nodes)
    return False
