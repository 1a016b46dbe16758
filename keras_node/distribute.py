"""Makes Keras 3's `model.fit` work under `MultiWorkerMirroredStrategy`.

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

import inspect

_PATCHED = "_keras_node_multi_worker_patch"


def patch_keras_multi_worker_fit():
    """Patches Keras' TensorFlow trainer where it needs it; returns what it did.

    Idempotent. Returns the list of patched functions' names (empty when the
    installed Keras needs no patch, or when this already ran).
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

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

