"""Every use of TensorFlow's private API, in one place.

Checked against TensorFlow 2.21. Where a piece is missing (another
version), each function falls back to what public TensorFlow gives, which
is correct but less: see each one.
"""

import functools
import weakref

import tensorflow as tf

# The graph collection that owns our custom gradients' functions.
GRADIENT_FUNCTIONS = "keras_node_gradient_functions"


def could_record():
    """Whether a gradient tape records the call in progress: in Keras'
    train step, whatever `training` the layer is called with; not in its
    test step (`tensorflow.python.eager.record`; where it is missing,
    True)."""
    try:
        from tensorflow.python.eager import record
    except ImportError:
        return True
    return bool(record.could_possibly_record())


def custom_gradient(f):
    """`tf.custom_gradient(f)`, whose gradient function dies with its graph.

    In a graph (a `tf.function`'s), `tf.custom_gradient` registers each
    call's gradient function in TensorFlow's global gradient registry and
    never removes it (tensorflow/tensorflow#27492, #97697); ours close over
    the dynamics and the graph, so every model that traced a `NeuralODE`
    would stay in memory. Here the graph owns the function (in its
    collection `GRADIENT_FUNCTIONS`), and the registry keeps a stand-in
    that holds it weakly and is removed when it dies. (Where the registry
    is not as in TensorFlow 2.21, it keeps the function, as with
    `tf.custom_gradient` alone.)
    """
    wrapped = tf.custom_gradient(f)

    @functools.wraps(f)
    def call(*args):
        outputs = wrapped(*args)
        if not tf.executing_eagerly():
            _give_to_graph(tf.nest.flatten(outputs)[0].op)
        return outputs

    return call


def _give_to_graph(op):
    """Moves the gradient function registered for `op` into `op.graph`."""
    try:
        from tensorflow.python.framework import ops
        name = op.get_attr("_gradient_op_type").decode()
        entry = ops.gradient_registry._registry[name]
        function = entry["type"]
    except (ImportError, AttributeError, ValueError, KeyError, TypeError):
        return
    op.graph.add_to_collection(GRADIENT_FUNCTIONS, function)
    ref = weakref.ref(function)
    entry["type"] = lambda *args: ref()(*args)
    weakref.finalize(function, ops.gradient_registry._registry.pop, name,
                     None)
