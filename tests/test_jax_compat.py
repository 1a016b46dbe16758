"""The JAX backend's canonical convolutions (keras_node/_jax_compat.py).

The ground truth is JAX's own evaluation and vector-Jacobian product of the
same function; the rewrite must match them and leave no convolution that
XLA's CPU compiler runs in its generic kernel.
"""

import warnings

import keras
import numpy as np
import pytest

from conftest import BACKEND, jax_only

pytestmark = jax_only("the rewrite is of JAX programs")

if BACKEND == "jax":
    import jax
    import jax.numpy as jnp

    from keras_node import NeuralODE, _jax_compat

# The rewrite itself on the JAX versions it was checked against; on others
# the layer leaves it off (the last two tests) and the rest of the suite
# runs without it.
checked_jax = pytest.mark.skipif(
    BACKEND == "jax" and not _jax_compat._supported(jax.__version__),
    reason="not a JAX version that keras_node/_jax_compat.py was checked "
    "against")

# (input shape, kernel shape, dimension numbers, options): 1, 2 and 3
# spatial dimensions, channels last and first, strides, padding, dilations,
# grouped and depthwise.
CONVOLUTIONS = [
    ((4, 9, 3), (3, 3, 5), ("NWC", "WIO", "NWC"), {}),
    ((4, 7, 6, 3), (3, 3, 3, 5), ("NHWC", "HWIO", "NHWC"),
     {"window_strides": (2, 1), "padding": "SAME"}),
    ((4, 3, 7, 6), (5, 3, 2, 3), ("NCHW", "OIHW", "NCHW"),
     {"padding": ((1, 0), (2, 1)), "rhs_dilation": (2, 1)}),
    ((2, 5, 4, 4, 2), (2, 2, 2, 2, 4), ("NDHWC", "DHWIO", "NDHWC"),
     {"lhs_dilation": (1, 2, 1), "padding": ((0, 0), (1, 1), (0, 1))}),
    ((4, 7, 6, 6), (3, 3, 2, 6), ("NHWC", "HWIO", "NHWC"),
     {"feature_group_count": 3, "padding": "SAME"}),
    ((4, 7, 6, 6), (3, 3, 1, 6), ("NHWC", "HWIO", "NHWC"),
     {"feature_group_count": 6, "padding": "VALID"}),
]


def _conv_function(dimension_numbers, options):
    def f(x, w):
        options_ = {"window_strides": (1,) * (x.ndim - 2),
                    "padding": "VALID", **options}
        y = jax.lax.conv_general_dilated(
            x, w, dimension_numbers=dimension_numbers, **options_)
        return jnp.tanh(y)
    return f


def _convolutions(jaxpr):
    """The dimension numbers of every convolution in `jaxpr`, also in the
    jaxprs nested in it (loops, nested jits, custom derivatives)."""
    from jax.extend.core import jaxprs_in_params

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is jax.lax.conv_general_dilated_p:
            found.append(eqn.params["dimension_numbers"])
        for inner in jaxprs_in_params(eqn.params):
            found += _convolutions(inner)
    return found


def _canonical(dimension_numbers):
    lhs, rhs, out = dimension_numbers
    n = len(lhs) - 2
    spatial = tuple(range(1, n + 1))
    return (tuple(lhs) == (0, n + 1, *spatial) == tuple(out)
            and tuple(rhs) == (n + 1, n, *range(n)))


@checked_jax
@pytest.mark.parametrize("shapes", CONVOLUTIONS, ids=lambda c: c[2][0])
def test_value_and_gradient_are_jax_own(shapes):
    x_shape, w_shape, dimension_numbers, options = shapes
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape))
    w = jnp.asarray(rng.normal(size=w_shape) / 4)
    f = _conv_function(dimension_numbers, options)
    g = _jax_compat.canonical_convolutions(f)
    y, pullback = jax.vjp(f, x, w)
    y_, pullback_ = jax.vjp(g, x, w)
    np.testing.assert_allclose(y_, y, rtol=1e-12, atol=1e-12)
    cotangent = jnp.asarray(rng.normal(size=y.shape))
    for expected, got in zip(pullback(cotangent), pullback_(cotangent)):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # Higher order: the gradient of a gradient, through the rewrite.
    second = lambda h: lambda x, w: jnp.sum(
        jax.grad(lambda x: jnp.sum(h(x, w) ** 2))(x) ** 2)
    for expected, got in zip(jax.grad(second(f), (0, 1))(x, w),
                             jax.grad(second(g), (0, 1))(x, w)):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


@checked_jax
@pytest.mark.parametrize("shapes", CONVOLUTIONS, ids=lambda c: c[2][0])
def test_every_convolution_of_the_gradient_is_canonical(shapes):
    x_shape, w_shape, dimension_numbers, options = shapes
    x, w = jnp.ones(x_shape), jnp.ones(w_shape)
    f = _conv_function(dimension_numbers, options)

    def gradient_jaxpr(fn):
        loss = lambda x, w: jnp.sum(fn(x, w) ** 2)
        return jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w).jaxpr

    # Without the rewrite, JAX's weight gradient is not canonical.
    assert not all(map(_canonical, _convolutions(gradient_jaxpr(f))))
    convolutions = _convolutions(gradient_jaxpr(
        _jax_compat.canonical_convolutions(f)))
    assert len(convolutions) >= 3  # the value, two gradients
    assert all(map(_canonical, convolutions)), convolutions


@checked_jax
def test_the_layer_solves_with_canonical_convolutions_on_a_cpu():
    assert _jax_compat.enabled()  # the suite runs JAX on its CPU
    dynamics = keras.Sequential([
        keras.layers.Conv2D(4, 3, padding="same", activation="tanh"),
        keras.layers.Conv2D(3, 3, padding="same")])
    ode = NeuralODE(dynamics, solver="rk4")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)))
    ode(x)
    trainable = [v.value for v in ode.trainable_variables]
    others = [v.value for v in ode.non_trainable_variables]

    def loss(trainable, x):
        return jnp.sum(ode.stateless_call(trainable, others, x)[0] ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(trainable, x).jaxpr
    convolutions = _convolutions(jaxpr)
    # Forward (two per evaluation) and backward (four) in the loops.
    assert len(convolutions) >= 6
    assert all(map(_canonical, convolutions)), convolutions


def test_off_with_a_warning_on_an_unchecked_jax(monkeypatch):
    _jax_compat.enabled.cache_clear()
    monkeypatch.setattr(jax, "__version__", "0.9.2")
    try:
        with pytest.warns(UserWarning, match=(
                r"^keras-node lays out convolutions for XLA's fast CPU "
                r"kernels with JAX internals checked against JAX 0\.10\.2, "
                r"0\.11\.2 and 0\.12\.0\.1; JAX 0\.9\.2 is not a checked "
                r"version, so this is off: solves with convolutional dynamics "
                r"run many times slower on the CPU\. Install JAX 0\.10, "
                r"0\.11 or 0\.12 for the fast path\.$")):
            assert not _jax_compat.enabled()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _jax_compat.enabled()  # warns once
    finally:
        _jax_compat.enabled.cache_clear()


def test_off_on_other_platforms(monkeypatch):
    _jax_compat.enabled.cache_clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _jax_compat.enabled()
    finally:
        _jax_compat.enabled.cache_clear()
