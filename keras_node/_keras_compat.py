"""Every use of Keras' private API (`keras.src`), in one place.

Checked against Keras 3.15.1. On another version each piece that is gone
fails with a `RuntimeError` naming it, the version checked and the version
found (`_private`); the patch reads the source of what it patches.

- `flatten_layers(model)`: `Layer._flatten_layers`, every layer nested in a
  model, also inside subclassed layers (`model.layers` lists the direct
  children only). Used by `LogEvaluationCounts` to find `NeuralODE` layers.
- `calling_model(layer)`: the outermost layer of the call in progress (the
  `CallContext`'s `entry_layer` in Keras' global state), so that a layer
  learns which model it runs in, also in a subclassed model.
- `stored_dtypes()`: no autocast scope (Keras' global state
  `autocast_scope`), so that a variable's `value` and `dtype` are as
  stored. Inside a layer under a mixed policy they are of half precision,
  but the JAX backend differentiates the dynamics with respect to the
  stored weights, and maps them in a `StatelessScope` (which casts each
  value to its variable's `dtype`).
- `seed_generators(layer)`: `Layer._seed_generators` of every layer nested
  in `layer` (`_flatten_layers`), the `keras.random.SeedGenerator`s that its
  random layers (`Dropout`, `GaussianNoise`, ...) draw from, so that a
  `NeuralODE` can hold their draws fixed through a solve.
- `DrawCounter`: a `keras.StatelessScope` that counts the updates of each
  variable (`StatelessScope.add_update`, which `Variable.assign` calls
  inside one): a seed generator's state is updated once per draw, so that a
  `NeuralODE` learns how many draws one evaluation of its dynamics makes,
  and which other state (moving statistics, losses) the dynamics change.
  A variable it does not map it reads from the scope around it (Keras'
  own scopes do not), and records it: on JAX, the weights of other layers
  that the dynamics read, as a traced train step maps them.
- `in_dynamics()`: whether the current `keras.StatelessScope` (Keras' global
  state) is a `DrawCounter`: a `NeuralODE` inside another's dynamics does
  not count its solves.
- `in_symbolic_build()`: whether Keras is tracing a call only for its
  output's shape and dtype (`SymbolicScope`, Keras' global state
  `symbolic_scope`): on JAX such a trace stores into a scope of its own,
  which is no loop's body.
- `has_functional_sibling(layer)`: walks the functional graph through
  `_inbound_nodes`, `_outbound_nodes` and their nodes' `operation` and
  `parent_nodes`, to find whether a layer's model holds another of its
  class (the evaluation counts' naming rule).
- `serialize_shared(obj)`: `keras.saving.serialize_keras_object(obj)`,
  marked with its `shared_object_id` when saving (Keras' global state
  `shared_objects/id_to_config_map`, set by `ObjectSharingScope`). Keras
  marks an object met twice, but in the config of the layer that holds it,
  which Keras copies before the second meeting, so the first copy loses the
  mark: a dynamics model shared by two `NeuralODE` layers would load as two
  models (and the second without weights). Marked every time, each config
  of it loads as the one object.
- `leaving_no_node(layer)`: a symbolic call of `layer` inside leaves no
  node in its `_inbound_nodes`. A `NeuralODE` calls its dynamics
  symbolically in `build`; a model that also applies the dynamics as a
  layer of its own graph names that layer's nodes by their index in
  `_inbound_nodes` when it saves, and on loading such an extra node took
  the first index ("Graph disconnected").
- `patch_keras_multi_worker_fit()`: makes Keras 3's `model.fit` work under
  `MultiWorkerMirroredStrategy` (public as
  `keras_node.training.patch_keras_multi_worker_fit`). Keras 3.15.1's
  TensorFlow trainer has both defects below; on any other version it patches
  only what it finds unchanged (it reads the functions' source), and does
  nothing where Keras has changed them.

Keras 3 (up to at least 3.15) cannot `fit` under a multi-worker strategy
(keras-team/keras#20585). Its TensorFlow trainer fails twice:

1. `_maybe_symbolic_build` averages the first (distributed) batch across
   workers with `strategy.reduce("MEAN", batch, axis=None)`, eagerly, which a
   multi-worker strategy refuses ("unsupported type PerReplica"). The batch
   is only wanted for its shapes and dtypes.
2. `reduce_per_replica` averages each step's logs with
   `strategy.reduce("MEAN", value, axis=0)`, which fails on the scalar logs
   (loss, metrics) that every step returns.

`patch_keras_multi_worker_fit()` fixes exactly these two, and only where the
installed Keras still has them: the first takes the shapes from one replica's
batch, the second averages scalars with `axis=None`. Nothing else changes,
and nothing changes at all for other strategies.
"""

import contextlib
import inspect

import keras

_PATCHED = "_keras_node_multi_worker_patch"
CHECKED = "3.15.1"


@contextlib.contextmanager
def _private(what):
    """Turns a missing private piece of Keras into a clear error."""
    try:
        yield
    except (ImportError, AttributeError) as error:
        raise RuntimeError(
            f"keras-node uses Keras' private {what}, checked against Keras "
            f"{CHECKED}; Keras {keras.__version__} does not have it "
            f"({type(error).__name__}: {error}). Install keras=={CHECKED}, "
            "or a keras-node release that supports this Keras.") from error


def flatten_layers(model):
    """Every layer nested in `model`, itself excluded."""
    with _private("Layer._flatten_layers"):
        return list(model._flatten_layers(include_self=False))


def calling_model(layer):
    """The outermost layer of the call in progress, None if it is `layer`.

    On TensorFlow, and in eager calls, a model's call enters first; Keras'
    JAX trainer calls the model statelessly, so there the entry is the first
    layer it calls.
    """
    with _private("call context (keras.src.backend.common.global_state)"):
        from keras.src.backend.common import global_state

        context = global_state.get_global_attribute("current_call_ctx")
    entry = getattr(context, "entry_layer", None)
    return None if entry is layer else entry


@contextlib.contextmanager
def stored_dtypes():
    """A scope where variables read as stored, not cast to the compute
    dtype of the layer being called (as they are under a mixed policy)."""
    with _private("autocast scope (keras.src.backend.common.global_state)"):
        from keras.src.backend.common import global_state

        scope = global_state.get_global_attribute("autocast_scope")
    # No scope, not `AutocastScope(None)`: under that, Keras 3.15 gives a
    # float64 variable the `dtype` float32 (`standardize_dtype(None)`).
    global_state.set_global_attribute("autocast_scope", None)
    try:
        yield
    finally:
        global_state.set_global_attribute("autocast_scope", scope)


def seed_generators(layer):
    """The `keras.random.SeedGenerator`s of `layer` and of the layers in it."""
    with _private("Layer._seed_generators"):
        return [generator
                for sub in layer._flatten_layers(include_self=True)
                for generator in sub._seed_generators]


class DrawCounter(keras.StatelessScope):
    """A `StatelessScope` that also records, in `counts` (keyed by the
    variable's `id`), the most updates of each variable that one scope
    saw, and in `updated` the variables it updated. It collects losses
    (`losses`); neither they nor the updates reach the layers. Variables
    it does not map read as the scope around it maps them (as stored
    without one), listed in `foreign`."""

    def __init__(self, state_mapping, counts):
        super().__init__(state_mapping=state_mapping, collect_losses=True,
                         initialize_variables=False)
        self._counts = counts
        self._updates = {}
        self.updated = []
        self.foreign = []

    def get_current_value(self, variable):
        value = super().get_current_value(variable)
        if value is None:
            self.foreign.append(variable)
            with _private("StatelessScope.original_scope"):
                outer = self.original_scope
            if outer is not None:
                value = outer.get_current_value(variable)
        return value

    def add_update(self, update):
        with _private("StatelessScope.add_update"):
            super().add_update(update)
        key = id(update[0])
        if key not in self._updates:
            self.updated.append(update[0])
        self._updates[key] = self._updates.get(key, 0) + 1

    def __exit__(self, *args):
        super().__exit__(*args)
        for key, updates in self._updates.items():
            self._counts[key] = max(self._counts.get(key, 0), updates)


def in_dynamics():
    """Whether the call in progress is of a `NeuralODE`'s dynamics (in a
    `DrawCounter`, Keras' global state `stateless_scope`)."""
    with _private("stateless scope (keras.src.backend.common.global_state)"):
        from keras.src.backend.common import global_state

        scope = global_state.get_global_attribute("stateless_scope")
    return isinstance(scope, DrawCounter)


def in_symbolic_build():
    """Whether the call in progress is Keras' symbolic one (the output's
    shape and dtype, in a `SymbolicScope`)."""
    with _private("symbolic scope (keras.src.backend.common.symbolic_scope)"):
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope

        return in_symbolic_scope()


def serialize_shared(obj):
    """`obj`'s config, which loads as one object wherever it occurs in a
    saved model."""
    config = keras.saving.serialize_keras_object(obj)
    with _private("object sharing scope (keras.src.backend.common."
                  "global_state)"):
        from keras.src.backend.common import global_state

        saving = global_state.get_global_attribute(
            "shared_objects/id_to_config_map") is not None
    if saving:
        config["shared_object_id"] = id(obj)
    return config


@contextlib.contextmanager
def leaving_no_node(layer):
    """Symbolic calls of `layer` inside add no node to its functional
    graph (their inputs must be fresh `keras.KerasTensor`s)."""
    with _private("functional graph (Layer._inbound_nodes)"):
        count = len(layer._inbound_nodes)
    try:
        yield
    finally:
        del layer._inbound_nodes[count:]


def has_functional_sibling(layer):
    """Whether `layer`'s functional graph holds another layer of its class."""
    with _private("functional graph (Layer._inbound_nodes, Node.operation)"):
        seen = set()
        stack = list(layer._inbound_nodes) + list(layer._outbound_nodes)
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


def tensorflow_trainer():
    """Keras' TensorFlow trainer module (what the patch below changes)."""
    with _private("TensorFlow trainer (keras.src.backend.tensorflow)"):
        from keras.src.backend.tensorflow import trainer

        return trainer


def patch_keras_multi_worker_fit():
    """Patches Keras' TensorFlow trainer where it needs it; returns what it did.

    Idempotent. Returns the list of patched functions' names (empty when the
    installed Keras needs no patch, or when this already ran). Only the
    TensorFlow backend's trainer is patched.
    """
    import tensorflow as tf

    trainer = tensorflow_trainer()
    patched = []
    reduce_per_replica = trainer.reduce_per_replica
    if (not getattr(reduce_per_replica, _PATCHED, False)
            and 'reduce("MEAN", v, axis=0)' in inspect.getsource(
                reduce_per_replica)):

        def reduce_scalars_too(values, strategy, reduction):
            if (reduction not in ("auto", "mean")
                    or not trainer._collective_all_reduce_multi_worker(
                        strategy)):
                return reduce_per_replica(values, strategy, reduction)

            def reduce(value):
                local = strategy.experimental_local_results(value)[0]
                if local.shape.rank == 0:
                    return strategy.reduce("MEAN", value, axis=None)
                return reduce_per_replica(value, strategy, reduction)

            return tf.nest.map_structure(reduce, values)

        setattr(reduce_scalars_too, _PATCHED, True)
        trainer.reduce_per_replica = reduce_scalars_too
        patched.append("reduce_per_replica")

    cls = trainer.TensorFlowTrainer
    build = cls._maybe_symbolic_build
    if (not getattr(build, _PATCHED, False)
            and "self.distribute_strategy.reduce(" in inspect.getsource(build)):

        def build_from_one_replica(self, iterator=None, data_batch=None):
            strategy = self._distribute_strategy
            if (iterator is not None and strategy is not None
                    and trainer._collective_all_reduce_multi_worker(strategy)):
                for _, _, it in iterator:
                    data_batch = tf.nest.map_structure(
                        lambda v: strategy.experimental_local_results(v)[0],
                        next(it))
                    break
                iterator = None
            return build(self, iterator=iterator, data_batch=data_batch)

        setattr(build_from_one_replica, _PATCHED, True)
        cls._maybe_symbolic_build = build_from_one_replica
        patched.append("TensorFlowTrainer._maybe_symbolic_build")
    return patched

