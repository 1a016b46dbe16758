"""Small dynamics with known solutions, shared by the tests."""

import keras
import numpy as np
import scipy.linalg


@keras.saving.register_keras_serializable(package="keras_node_tests")
class Linear(keras.layers.Layer):
    """`dh/dt = h A^T`, so `h(t) = h0 expm(A t)^T`."""

    def __init__(self, matrix, **kwargs):
        super().__init__(**kwargs)
        self.matrix = np.asarray(matrix).tolist()

    def build(self, input_shape):
        self.a_transposed = self.add_weight(
            shape=(len(self.matrix), len(self.matrix)),
            initializer=keras.initializers.Constant(np.transpose(self.matrix)),
            name="a_transposed",
        )

    def call(self, h):
        return keras.ops.matmul(h, self.a_transposed)

    def get_config(self):
        return {**super().get_config(), "matrix": self.matrix}


@keras.saving.register_keras_serializable(package="keras_node_tests")
class Driven(keras.layers.Layer):
    """`dh/dt = h A^T + c B^T` for inputs `[h, c]`, `c` a context constant
    over the solve: with `M = [[A, B], [0, 0]]`, `[h(t), c] = [h0, c]
    expm(M t)^T`."""

    def __init__(self, a, b, **kwargs):
        super().__init__(**kwargs)
        self.a, self.b = np.asarray(a).tolist(), np.asarray(b).tolist()

    def build(self, input_shapes):
        for name, matrix in (("a_transposed", self.a),
                             ("b_transposed", self.b)):
            setattr(self, name, self.add_weight(
                shape=np.shape(matrix)[::-1], name=name,
                initializer=keras.initializers.Constant(np.transpose(matrix))))

    def call(self, inputs):
        h, c = inputs
        return (keras.ops.matmul(h, self.a_transposed)
                + keras.ops.matmul(c, self.b_transposed))

    def get_config(self):
        return {**super().get_config(), "a": self.a, "b": self.b}


@keras.saving.register_keras_serializable(package="keras_node_tests")
class CosineRate(keras.layers.Layer):
    """`dh/dt = w cos(t) h`, so `h(t1) = h0 exp(w (sin t1 - sin t0))`."""

    def build(self, input_shape):
        self.w = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(0.7), name="w"
        )

    def call(self, h, t):
        return self.w * keras.ops.cos(keras.ops.cast(t, h.dtype)) * h


@keras.saving.register_keras_serializable(package="keras_node_tests")
def tanh(x):
    """`tanh` in `x`'s own dtype. Keras 3.15's `keras.ops.tanh` (and `sin`)
    compute float64 in float32 on JAX, which would make the float64 tests
    there test float32."""
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        return jnp.tanh(x)
    return keras.ops.tanh(x)


class Square(keras.layers.Layer):
    """`dh/dt = h^2`: from h0 > 0 it blows up at t = 1 / h0."""

    def call(self, h):
        return h * h


def small_conv_dynamics(channels=4, dtype=None):
    return keras.Sequential(
        [
            keras.layers.Conv2D(channels, 3, padding="same",
                                activation=tanh, dtype=dtype),
            keras.layers.Conv2D(channels, 3, padding="same",
                                activation=tanh, dtype=dtype),
        ]
    )


def mlp_dynamics(width, dim, dtype=None):
    return keras.Sequential(
        [
            keras.layers.Dense(width, activation=tanh, dtype=dtype),
            keras.layers.Dense(dim, dtype=dtype),
        ]
    )


class OdeRnnCell(keras.layers.Layer):
    """An ODE-RNN's cell: the state flows by the ODE, then takes the input."""

    def __init__(self, ode, **kwargs):
        super().__init__(**kwargs)
        self.ode, self.state_size = ode, 2  # for 2 channels

    def build(self, input_shape):
        self.ode.build(input_shape)

    def call(self, x, states):
        h = self.ode(states[0]) + x
        return h, [h]


def kinetic_energy_after_fit(weight, seed=8):
    """The dynamics' kinetic energy after fitting `h(1) = 2 h(0)`.

    Trains a `NeuralODE` regularised with `kinetic_energy=weight` on random
    3-vectors; returns the mean kinetic energy of their paths afterwards.
    The straight path, `h(t) = (1 + t) h(0)`, has the least energy that
    reaches the target, `|h(0)|^2`; without the regulariser nothing favours
    it.
    """
    from keras_node import NeuralODE

    x = np.random.default_rng(seed).normal(size=(64, 3)).astype("float32")
    keras.utils.set_random_seed(seed)
    ode = NeuralODE(mlp_dynamics(16, 3), t1=1.0, kinetic_energy=weight)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, ode(inputs))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(x, 2 * x, batch_size=16, epochs=20, verbose=0)
    probe = NeuralODE(ode.dynamics, t1=1.0, kinetic_energy=1.0)
    probe(x)
    return float(probe.losses[0])


def linear_gradients(a, h0, w, t1):
    """Gradients of `sum(w * h(t1))` for `Linear(a)` from `h0` at time 0.

    `h(t1) = h0 E^T`, `E = expm(a t1)`: dL/dh0 = w E, and dL/da_ij is
    `sum(w * h0 L(a t1, t1 e_ij)^T)`, L the Frechet derivative of expm.
    Returns `(dL/dh0, dL/da^T)` (the layer's weight is `a^T`).
    """
    da = np.zeros_like(a, dtype=float)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            unit = np.zeros_like(a, dtype=float)
            unit[i, j] = t1
            frechet = scipy.linalg.expm_frechet(a * t1, unit,
                                                compute_expm=False)
            da[i, j] = np.sum(w * (h0 @ frechet.T))
    return w @ scipy.linalg.expm(a * t1), da.T


def _loss(ode, loss_fn, with_losses, training=None):
    """`(h0, trainable, others) -> (loss, others after)` of `ode`, the
    layer's own losses added `with_losses`: on JAX by `stateless_call`, on
    TensorFlow (which ignores `trainable` and `others`) by a call."""
    def loss(h0, trainable=None, others=None):
        if keras.backend.backend() == "jax":
            out, others, losses = ode.stateless_call(
                trainable, others, h0, return_losses=True, training=training)
        else:
            out, losses = ode(h0, training=training), ode.losses
        return loss_fn(out) + with_losses * sum(losses), others

    return loss


def _jax_gradient(ode, h0, loss_fn, with_losses, training=None):
    """JAX's `(grad, args)`: `grad(*args)` gives `((dL/dh0, dL/d(weights)),
    non-trainable values after the call)`."""
    import jax

    if not ode.built:
        ode(h0)  # creates the variables
    grad = jax.grad(_loss(ode, loss_fn, with_losses, training),
                    argnums=(0, 1), has_aux=True)
    return grad, (keras.tree.map_structure(keras.ops.convert_to_tensor, h0),
                  [v.value for v in ode.trainable_variables],
                  [v.value for v in ode.non_trainable_variables])


def gradients(ode, h0, loss_fn, with_losses=False, training=None,
              graph=False):
    """`[dL/dh0] + dL/d(weights)` by the backend's own autodiff (`h0` may
    be a list, the state and the context; then so is `dL/dh0`).

    `loss_fn` maps the layer's output to a scalar with `keras.ops`; with
    `with_losses`, the layer's own losses (the regulariser) are added;
    `training` is the layer's call argument. On JAX the gradient is
    compiled (`jax.jit`), as Keras' JAX trainer does; on TensorFlow with
    `graph`, in a `tf.function`, as its trainer does.
    """
    if keras.backend.backend() == "jax":
        import jax

        grad, args = _jax_gradient(ode, h0, loss_fn, with_losses, training)
        (dh0, dweights), others_after = jax.jit(grad)(*args)
        # The forward counts, as a stateful call would leave them.
        for variable, value in zip(ode.non_trainable_variables,
                                   others_after):
            variable.assign(value)
        jax.effects_barrier()  # the backward count arrives by host callback
        return [dh0, *dweights]
    import tensorflow as tf

    def grad(h0):
        with tf.GradientTape() as tape:
            tape.watch(h0)
            value, _ = _loss(ode, loss_fn, with_losses, training)(h0)
        return tape.gradient(value, [h0] + ode.trainable_variables)

    return (tf.function(grad) if graph else grad)(
        tf.nest.map_structure(tf.convert_to_tensor, h0))


def _gradient_program(ode, h0, loss_fn):
    """The operations of the compiled gradient of `loss_fn(ode(h0))`, one
    string each: the op types of the graph's nodes with those of its
    functions (loop bodies) on TensorFlow, the lines of the jaxpr on JAX."""
    if keras.backend.backend() == "jax":
        import jax

        grad, args = _jax_gradient(ode, h0, loss_fn, False)
        return str(jax.make_jaxpr(grad)(*args)).splitlines()
    import tensorflow as tf

    graph_def = tf.function(lambda h0: gradients(ode, h0, loss_fn)) \
        .get_concrete_function(tf.constant(h0)).graph.as_graph_def()
    return [node.op for node in graph_def.node] + [
        node.op for f in graph_def.library.function for node in f.node_def]


def gradient_program_size(ode, h0, loss_fn):
    """How many operations the compiled gradient of `loss_fn(ode(h0))`
    holds."""
    return len(_gradient_program(ode, h0, loss_fn))


def gradient_temp_bytes(ode, h0, loss_fn):
    """JAX: the compiled gradient of `loss_fn(ode(h0))`'s working memory,
    in bytes (XLA's `temp_size_in_bytes`)."""
    import jax

    grad, args = _jax_gradient(ode, h0, loss_fn, False)
    compiled = jax.jit(grad).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def gradient_program_loops(ode, h0, loss_fn):
    """How many loops the compiled gradient of `loss_fn(ode(h0))` holds."""
    return sum(op in ("While", "StatelessWhile") or
               any(f" {loop}[" in op for loop in ("while", "scan"))
               for op in _gradient_program(ode, h0, loss_fn))


def compiled_loss(ode, loss_fn, with_losses=False):
    """`h0 -> float(loss_fn(ode(h0)))`, compiled, with the current weights
    (and the layer's own losses added, `with_losses`)."""
    loss = _loss(ode, loss_fn, with_losses)
    if keras.backend.backend() == "jax":
        import jax

        jitted = jax.jit(lambda *args: loss(*args)[0])
        return lambda h: float(jitted(
            h, [v.value for v in ode.trainable_variables],
            [v.value for v in ode.non_trainable_variables]))
    import tensorflow as tf

    traced = tf.function(lambda h: loss(h)[0])
    return lambda h: float(traced(tf.constant(h)))


def finite_difference_check(ode, h0, loss_fn, eps=1e-6, samples=6, seed=0,
                            rtol=1e-4, atol=1e-6, with_losses=False):
    """Compares each gradient with central differences on a few entries."""
    analytic = gradients(ode, h0, loss_fn, with_losses)
    rng = np.random.default_rng(seed)
    loss_at = compiled_loss(ode, loss_fn, with_losses)
    for variable, grad in zip(ode.trainable_variables, analytic[1:]):
        flat = keras.ops.convert_to_numpy(variable).reshape(-1)
        for index in rng.choice(flat.size, min(samples, flat.size),
                                replace=False):
            shifted = flat.copy()
            shifted[index] += eps
            variable.assign(shifted.reshape(variable.shape))
            up = loss_at(h0)
            shifted[index] -= 2 * eps
            variable.assign(shifted.reshape(variable.shape))
            down = loss_at(h0)
            variable.assign(flat.reshape(variable.shape))
            np.testing.assert_allclose(
                np.reshape(grad, -1)[index], (up - down) / (2 * eps),
                rtol=rtol, atol=atol, err_msg=variable.path)
    flat = h0.reshape(-1)
    for index in rng.choice(flat.size, samples, replace=False):
        shifted = flat.copy()
        shifted[index] += eps
        up = loss_at(shifted.reshape(h0.shape))
        shifted[index] -= 2 * eps
        down = loss_at(shifted.reshape(h0.shape))
        np.testing.assert_allclose(
            np.reshape(analytic[0], -1)[index], (up - down) / (2 * eps),
            rtol=rtol, atol=atol, err_msg="initial state")


def sin(x):
    """`sin` in `x`'s own dtype, on either backend (Keras 3.15's
    `keras.ops.sin` computes float64 in float32 on JAX)."""
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        return jnp.sin(x)
    import tensorflow as tf

    return tf.sin(x)


def run_layer_test(make_layer, input_shape, seed=0, tmp_path=None,
                   callbacks=()):
    """The Keras layer contract, in the spirit of keras-hub's
    `run_layer_test`, with public Keras only. `make_layer()` returns a fresh
    layer; `input_shape` has no batch axis. Checks:

    - a symbolic call (a `keras.Input`) gives the `compute_output_shape`
      and the dtype of an eager call, whose batch axis it keeps;
    - `from_config(get_config())` gives the same config, and so does
      `keras.saving.serialize_keras_object` and back;
    - in a model, one `fit` step gives a finite loss and moves every weight
      of the layer; the model saved as `.keras` and loaded gives the same
      outputs and the same layer config (but for nested models' input
      layers).

    Returns the trained model's `fit` history.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, *input_shape)).astype("float32")

    layer = make_layer()
    symbolic = layer(keras.Input(input_shape))
    assert tuple(symbolic.shape) == tuple(
        layer.compute_output_shape((None, *input_shape)))
    eager = layer(x)
    assert tuple(eager.shape) == (4, *tuple(symbolic.shape)[1:])
    assert keras.backend.standardize_dtype(eager.dtype) == symbolic.dtype

    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer) and revived.get_config() == config

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    layer = make_layer()
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    before = [keras.ops.convert_to_numpy(w) for w in layer.trainable_weights]
    history = model.fit(x, 2 * x, batch_size=4, epochs=1, verbose=0,
                        callbacks=list(callbacks)).history
    assert np.isfinite(history["loss"][0])
    for b, w in zip(before, layer.trainable_weights):
        assert not np.array_equal(b, keras.ops.convert_to_numpy(w)), w.path
    if tmp_path is not None:
        path = tmp_path / "contract.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(loaded.predict(x, verbose=0),
                                   model.predict(x, verbose=0), rtol=1e-5,
                                   atol=1e-6)
        # (A nested model's config gains its input layer once built.)
        without = lambda c: {k: v for k, v in c.items() if k != "dynamics"}
        assert without(loaded.layers[-1].get_config()) == without(
            layer.get_config())
    return history
