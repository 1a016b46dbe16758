"""Every use of JAX's internals, in one place: convolutions fast on a CPU,
and telling a loop's body from the compiled step around it.

XLA's CPU compiler hands a convolution to its fast library kernel only in
the canonical layout (input batch, spatial..., feature; kernel spatial...,
input feature, output feature; output like the input), and puts other
convolutions into that layout only at the top level of a program, not
inside loops (jax-ml/jax#12868). Keras' channels-last convolutions are
canonical, but their gradients (JAX's transpose rules) are not, and a
solve evaluates the dynamics and their gradients inside a loop: on a CPU
those ran in XLA's generic kernel, many times slower.

`canonical_convolutions(fn)` is `fn` with every convolution of its value
and of its vector-Jacobian product put into the canonical layout by
transposes around it (what XLA does at the top level). It reads `fn`'s
jaxpr and evaluates it equation by equation, which needs JAX's extension
API (`jax.extend.core`, without stability promises) and
`Primitive.get_bind_params`, as `jax.core.eval_jaxpr` binds equations.
Checked against JAX 0.10.2, 0.11.2 and 0.12.0.1. On another minor version
`enabled()` is False and warns once: solves then run at XLA's own speed,
with the same results.

`traced_inside(value, outer)` compares two tracers' traces
(`Tracer._trace`), so that a `NeuralODE` in a loop's body (an RNN cell's,
in `lax.scan`) does not store its counts, which would leak their tracers.
Checked against JAX 0.10.2; on a minor version outside `SUPPORTED` it
says False, and such a loop fails as it did before
(`UnexpectedTracerError`).
"""

import functools
import re
import warnings

import jax
import jax.numpy as jnp

# The JAX minor versions whose internals above were checked.
SUPPORTED = ((0, 10), (0, 11), (0, 12))
_CHECKED = "0.10.2, 0.11.2 and 0.12.0.1"


def _supported(version):
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and tuple(map(int, match.groups())) in SUPPORTED


@functools.lru_cache(maxsize=None)
def enabled():
    """Whether solves rewrite their convolutions: on a CPU, with a JAX
    whose internals were checked (warns once on another)."""
    if jax.default_backend() != "cpu":
        return False  # GPU and TPU compilers lay convolutions out themselves
    if not _supported(jax.__version__):
        minors = [f"{major}.{minor}" for major, minor in SUPPORTED]
        warnings.warn(
            f"keras-node lays out convolutions for XLA's fast CPU kernels "
            f"with JAX internals checked against JAX {_CHECKED}; JAX "
            f"{jax.__version__} is not a checked version, so this is off: "
            "solves with convolutional dynamics run many times slower on "
            f"the CPU. Install JAX {', '.join(minors[:-1])} or {minors[-1]} "
            "for the fast path.",
            stacklevel=2)
        return False
    return True


def canonical_convolutions(fn):
    """`fn(*args)` with canonical convolutions in its value and gradient.

    `fn` takes and returns nests of arrays. The result is a
    `jax.custom_vjp` function: reverse mode (also of higher order) works,
    forward mode does not. Its backward pass evaluates `fn` again (its
    residuals are its arguments).
    """
    @jax.custom_vjp
    def wrapped(*args):
        return _evaluate(fn, *args)

    def forward(*args):
        return _evaluate(fn, *args), args

    def backward(args, cotangent):
        def pullback(args, cotangent):
            return jax.vjp(fn, *args)[1](cotangent)
        return _evaluate(pullback, args, cotangent)

    wrapped.defvjp(forward, backward)
    return wrapped


def _evaluate(fn, *args):
    """`fn(*args)`, computed from its jaxpr with canonical convolutions."""
    leaves, tree = jax.tree.flatten(args)
    closed, shapes = jax.make_jaxpr(
        lambda *xs: fn(*jax.tree.unflatten(tree, xs)),
        return_shape=True)(*leaves)
    outs = _eval_jaxpr(closed.jaxpr, closed.consts, leaves)
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)


def _eval_jaxpr(jaxpr, consts, args):
    """As `jax.core.eval_jaxpr`, with convolutions made canonical, also
    inside nested `jit`s (which it inlines); other nested jaxprs (loops,
    custom derivatives) run as they are."""
    from jax.extend.core import Literal

    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        if eqn.primitive is jax.lax.conv_general_dilated_p:
            outputs = [_canonical_conv(*inputs, **eqn.params)]
        elif eqn.primitive.name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            outputs = _eval_jaxpr(inner.jaxpr, inner.consts, inputs)
        else:
            outputs = eqn.primitive.bind(
                *inputs, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outputs = [outputs]
        env.update(zip(eqn.outvars, outputs))
    return [read(v) for v in jaxpr.outvars]


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
    """`conv_general_dilated` as a canonical convolution between
    transposes (none where it is canonical already)."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    n = len(lhs_spec) - 2  # spatial dimensions
    spatial = tuple(range(1, n + 1))
    canonical = jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, n + 1, *spatial), rhs_spec=(n + 1, n, *range(n)),
        out_spec=(0, n + 1, *spatial))
    if dimension_numbers == canonical:
        return jax.lax.conv_general_dilated_p.bind(
            lhs, rhs, dimension_numbers=canonical, **params)
    # Spatial dimensions keep their order, so strides, padding and
    # dilations stay as they are.
    out = jax.lax.conv_general_dilated_p.bind(
        jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])),
        jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])),
        dimension_numbers=canonical, **params)
    # The canonical output's axes, as axes of the requested output.
    axes = (out_spec[0], *out_spec[2:], out_spec[1])
    return jnp.transpose(out, [axes.index(i) for i in range(n + 2)])


def traced_inside(value, outer):
    """Whether the tracer `value` was traced by a JAX transformation inside
    the one that traced `outer`, or `outer` is concrete: a `lax.scan`'s
    body in a compiled train step, or in an eager one, for two. False on an
    unchecked JAX version."""
    if not (isinstance(value, jax.core.Tracer)
            and _supported(jax.__version__)):
        return False
    return getattr(value, "_trace", None) is not getattr(outer, "_trace", None)
