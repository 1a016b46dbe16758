"""TensorFlow's private API (keras_node/_tf_compat.py): custom gradients
that die with their graph. The ground truth is `tf.custom_gradient`'s own
gradient of the same function."""

import gc
import weakref

import numpy as np
import pytest

from conftest import BACKEND, tensorflow_only

pytestmark = tensorflow_only("the registry is TensorFlow's")

if BACKEND == "tensorflow":
    import tensorflow as tf
    from tensorflow.python.framework import ops

    from keras_node import _tf_compat


def cube(x):
    """x^3, with its gradient 3 x^2 by hand."""
    return x ** 3, lambda dy: dy * 3.0 * x ** 2


def traced_gradient(decorator):
    """The traced function's gradient at 2, and a weak reference to its
    graph."""
    op = decorator(cube)

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = op(x)
        return tape.gradient(y, x)

    concrete = gradient.get_concrete_function(tf.TensorSpec((), tf.float32))
    return float(concrete(tf.constant(2.0))), weakref.ref(concrete.graph)


def custom_gradients():
    return {name for name in ops.gradient_registry.list()
            if name.startswith("CustomGradient-")}


def test_the_gradient_function_dies_with_its_graph():
    # With `tf.custom_gradient` alone the registry keeps the graph.
    before = custom_gradients()
    plain = traced_gradient(tf.custom_gradient)
    ours = traced_gradient(_tf_compat.custom_gradient)
    gc.collect()
    assert plain[0] == ours[0] == 12.0
    assert plain[1]() is not None and ours[1]() is None
    assert len(custom_gradients() - before) == 1  # the plain one's


def test_could_record_tells_a_tape():
    with tf.GradientTape():
        assert _tf_compat.could_record()
    assert not _tf_compat.could_record()


@pytest.mark.parametrize("eager", [True, False])
def test_values_and_gradients_match_tf_custom_gradient(eager):
    x = tf.constant(np.linspace(-1.0, 1.0, 5), tf.float32)
    results = []
    for decorator in (tf.custom_gradient, _tf_compat.custom_gradient):
        op = decorator(cube)

        def value_and_gradient(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = op(x)
            return y, tape.gradient(y, x)

        run = value_and_gradient if eager else tf.function(
            value_and_gradient)
        results.append([np.asarray(v) for v in run(x)])
    for ours, plain in zip(results[1], results[0]):
        np.testing.assert_array_equal(ours, plain)
