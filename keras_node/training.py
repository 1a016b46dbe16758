"""Training runs that a kill, or a lost worker, does not set back.

For any Keras model, on one device or many machines:

- `ResumableCheckpoint`, a Keras callback that saves the model (its weights
  and the optimizer's state) every few optimizer steps and restores the
  newest sound checkpoint, falling back to an older one when the newest is
  damaged;
- `write_atomic` and `save_model_atomic`, which write a run's artifacts so
  that a kill leaves either the old file or the new one, never a half one;
- `StopAtIteration`, a callback ending `fit` at an optimizer step count, so
  that a resumed run stops where the uninterrupted one would;
- for `tf.distribute` (Keras' TensorFlow backend): `distribution_strategy`
  (by name, with the fix of `patch_keras_multi_worker_fit` that Keras 3
  needs to `fit` under `MultiWorkerMirroredStrategy`), `worker_folder`
  (the chief writes where the user looks, the other workers in scratch
  folders), `agree_on_checkpoint` (every worker resumes the same
  iteration) and `peers_watched` (a lost peer ends training with a clear
  message instead of a hang or a collective's traceback).

A multi-worker training script resumes like this (each worker runs it):

    strategy = distribution_strategy("multiworker")  # before any TF op
    out = worker_folder(strategy, "run")
    with strategy.scope():
        model = make_model()  # and compile it
        checkpoint = ResumableCheckpoint(out / "backup", save_every=50)
        checkpoint.set_model(model)
        checkpoint.restore()
        done = agree_on_checkpoint(strategy, checkpoint)
    if done < total:  # `fit` takes a step before any callback can stop it
        with peers_watched(strategy):
            model.fit(data.skip(checkpoint.batches), ..., callbacks=[
                checkpoint, StopAtIteration(total)])
    checkpoint.delete()  # once the results are saved
"""

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil

import keras
import numpy as np

from keras_node._keras_compat import patch_keras_multi_worker_fit
from keras_node._options import positive_int

__all__ = ["CheckpointError", "ResumableCheckpoint", "StopAtIteration",
           "agree_on_checkpoint", "distribution_strategy",
           "patch_keras_multi_worker_fit", "peers_watched",
           "save_model_atomic", "worker_folder", "write_atomic"]

logger = logging.getLogger("keras_node.training")


class CheckpointError(RuntimeError):
    """No checkpoint in the folder can be restored."""


def write_atomic(path, text):
    """Writes `text` to `path` under a temporary name, then renames it."""
    path = pathlib.Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def save_model_atomic(model, path):
    """`model.save(path)` (a `.keras` file), atomically."""
    path = pathlib.Path(path)
    partial = path.with_name(f".partial-{path.name}")  # Keras wants .keras
    try:
        model.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _digest(path):
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            sha.update(block)
    return sha.hexdigest()


def _seed_states(model):
    """The state variables of `model`'s seed generators (its random
    layers'), which `save_weights` leaves out."""
    weights = {id(v) for v in model.non_trainable_weights}
    return [v for v in model.non_trainable_variables if id(v) not in weights]


def _seed_state_values(states, variables):
    """The saved `states` as arrays for the seed-generator `variables`;
    raises `ValueError` saying what does not fit (the JSON is not covered by
    the weights' checksum)."""
    if not isinstance(states, list) or len(states) != len(variables):
        count = len(states) if isinstance(states, list) else "no list of"
        raise ValueError(f"holds {count} seed-generator states, the model "
                         f"has {len(variables)} seed generators")
    values = []
    for k, (variable, state) in enumerate(zip(variables, states)):
        dtype, shape = np.dtype(variable.dtype), tuple(variable.shape)
        try:
            value = np.asarray(state)
        except ValueError:  # ragged
            value = np.asarray(None)
        if value.dtype.kind not in "iu" or value.shape != shape or (
                value.size and not np.iinfo(dtype).min <= value.min()
                <= value.max() <= np.iinfo(dtype).max):
            raise ValueError(
                f"holds seed-generator state {k}, which is not an array of "
                f"{dtype.name} of shape {shape}")
        values.append(value.astype(dtype))
    return values


class ResumableCheckpoint(keras.callbacks.Callback):
    """Checkpoints every `save_every` optimizer steps; restores the newest
    sound one.

    In `directory`, checkpoint N is `ckpt-N.weights.h5`
    (`model.save_weights`: the weights and the optimizer's state) and
    `ckpt-N.json` (N, the number of batches taken, the weights file's size
    and SHA-256, and the states of the model's seed generators, which
    `save_weights` leaves out: the draws of `Dropout` and other random
    layers go on after a resume as they would have without one). Both are
    written under temporary names and renamed, the JSON last, so a
    checkpoint exists once its JSON does; the last `keep` are kept.
    `restore` checks each, newest first (the JSON parses, the weights file
    is there with the recorded checksum, the seed states fit the model's
    seed generators, the weights load, and the optimizer then holds step N)
    and stops at the first sound one, logging what was wrong with the
    others. A kill while writing, a truncated or altered file, or a missing
    one thus steps back to the previous checkpoint; when none is sound,
    `restore` raises `CheckpointError` naming the damaged files and how to
    start over.

    Unlike `keras.callbacks.BackupAndRestore` it does not delete its folder
    when training ends: it saves a last checkpoint there instead, so that a
    run killed after `fit` but before its results are written resumes at
    its end. Call `delete()` once they are. A checkpoint it saves replaces
    any other at its iteration or later (a damaged one, or one of a run it
    stepped back from), so that a resume never takes another run's.

    Not saved: Keras' global seed generator (`keras.random` calls without
    a `seed`), and the data pipeline's state: resume the data where the
    run left off, `checkpoint.batches` batches in (`data.skip` in this
    module's example). That is the optimizer's step count N unless steps
    were skipped: a `LossScaleOptimizer` (mixed precision) does not count
    a step whose gradients overflowed. With `steps_per_execution` in
    `compile`, callbacks see every that many steps: make `save_every` a
    multiple of it.

    Attributes:
        batches: the training batches taken in all, counted across resumes
            (`fit`'s batch index, which starts again at 0 each epoch): 0
            until `restore` finds a checkpoint, then its count (N for one
            written before checkpoints held it).

    Args:
        directory: the checkpoint folder (one per worker in multi-worker
            training).
        save_every: save every this many optimizer steps, a positive
            integer. Defaults to `100`.
        keep: how many checkpoints to keep, a positive integer. Defaults to
            `2`.
    """

    _JSON = re.compile(r"ckpt-([0-9]+)\.json")

    def __init__(self, directory, save_every=100, keep=2):
        super().__init__()
        self.save_every = positive_int("save_every", save_every)
        self.keep = positive_int("keep", keep)
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                "Received an invalid value for argument `directory`, "
                "expected a folder's path (a str or an os.PathLike). "
                f"Received: directory={directory!r}")
        self.directory = pathlib.Path(directory)
        self._sound = set()  # checkpoints restored or written by this run
        self.batches = 0
        self._last_batch = -1  # the index `fit` gave last, this epoch

    def _paths(self, iteration):
        return (self.directory / f"ckpt-{iteration}.weights.h5",
                self.directory / f"ckpt-{iteration}.json")

    def iterations(self):
        """The iterations of the checkpoints present, newest first."""
        if not self.directory.is_dir():
            return []
        found = (self._JSON.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def _check(self, iteration):
        """`(problem, batches, seed_states)`: what is wrong with checkpoint
        `iteration`'s files, or None; and, for a sound one, its count of
        batches and its seed states as arrays for the model's seed
        generators (None when it was written before checkpoints held
        them)."""
        weights, meta = self._paths(iteration)
        try:
            record = json.loads(meta.read_text())
            expected = (int(record["iteration"]), int(record["size"]),
                        str(record["sha256"]))
            batches = record.get("batches", iteration)
        except (OSError, ValueError, KeyError, TypeError) as error:
            problem = f"{meta} is damaged ({type(error).__name__}: {error})"
            return problem, None, None
        if expected[0] != iteration:
            return f"{meta} names iteration {expected[0]}", None, None
        if type(batches) is not int or batches < iteration:
            return (f"{meta} holds {batches!r} batches taken, not an integer "
                    f"of at least its iteration, {iteration}"), None, None
        if not weights.exists():
            return f"{weights} is missing", None, None
        if weights.stat().st_size != expected[1] or \
                _digest(weights) != expected[2]:
            return (f"{weights} is damaged (its size or SHA-256 differs from "
                    f"the one recorded in {meta.name})"), None, None
        states = record.get("seed_states")
        if states is None:  # written before checkpoints held them
            return None, batches, None
        try:
            states = _seed_state_values(states, _seed_states(self.model))
        except ValueError as error:
            return f"{meta} {error}", None, None
        return None, batches, states

    def restore(self, iteration=None):
        """Restores the newest sound checkpoint, or `iteration`'s.

        Returns:
            The restored iteration, 0 when the folder holds no checkpoint.

        Raises:
            CheckpointError: checkpoints are there but none is sound.
        """
        candidates = self.iterations() if iteration is None else [iteration]
        model = self.model
        if candidates and (model is None or not model.built
                           or getattr(model, "optimizer", None) is None):
            raise ValueError(
                "ResumableCheckpoint.restore needs a built and compiled "
                "model: call `set_model(model)` first, with a model that has "
                "its weights (an `Input`, or a call on a batch) and an "
                "optimizer (`compile`).")
        damaged = []
        for candidate in candidates:
            problem, batches, seed_states = self._check(candidate)
            if problem is None:
                problem = self._load(candidate, seed_states)
            if problem is None:
                self.batches, self._last_batch = batches, -1
                for earlier in damaged:
                    logger.warning("Skipped a damaged checkpoint: %s", earlier)
                # Those this run restored or wrote before are not its state
                # any more (a later one, after stepping back, is another
                # run's and must be written over).
                self._sound = {candidate}
                return candidate
            damaged.append(problem)
        if damaged:
            raise CheckpointError(
                f"No checkpoint in {self.directory} can be restored: "
                + "; ".join(damaged) + f". Remove {self.directory} to start "
                "the run over from iteration 0.")
        return 0

    def _load(self, iteration, seed_states):
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        weights, _ = self._paths(iteration)
        try:
            model.load_weights(weights)
        except Exception as error:  # a file that passed its checksum
            return f"{weights} does not load ({type(error).__name__}: {error})"
        restored = int(model.optimizer.iterations.numpy())
        if restored != iteration:
            return (f"{weights} holds optimizer step {restored}, not "
                    f"{iteration}")
        for variable, value in zip(_seed_states(model), seed_states or ()):
            variable.assign(value)
        return None

    def save(self):
        """Saves a checkpoint of the current optimizer step."""
        iteration = int(self.model.optimizer.iterations.numpy())
        if iteration in self._sound:
            return  # restored or written by this run: the same state
        self.directory.mkdir(parents=True, exist_ok=True)
        weights, meta = self._paths(iteration)
        partial = self.directory / f"partial-{weights.name}"
        self.model.save_weights(partial, overwrite=True)
        record = {"iteration": iteration, "batches": self.batches,
                  "size": partial.stat().st_size,
                  "sha256": _digest(partial),
                  "seed_states": [v.numpy().tolist()
                                  for v in _seed_states(self.model)]}
        os.replace(partial, weights)
        write_atomic(meta, json.dumps(record))
        self._sound.add(iteration)
        # Later iterations than this one are another run's (one this run
        # stepped back from, or foreign files): a resume must not take them.
        present = self.iterations()
        stale = [i for i in present if i > iteration]
        for old in stale + [i for i in present if i <= iteration][self.keep:]:
            for path in reversed(self._paths(old)):  # the JSON first
                path.unlink(missing_ok=True)

    def delete(self):
        """Removes the checkpoint folder (once the run's results are safe)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the epoch's index of the last batch taken (with
        # `steps_per_execution`, of the last of several).
        self.batches += batch - self._last_batch
        self._last_batch = batch
        if int(self.model.optimizer.iterations.numpy()) % self.save_every == 0:
            self.save()

    def on_train_end(self, logs=None):
        self.save()


class StopAtIteration(keras.callbacks.Callback):
    """Ends `fit` once the optimizer has taken `total` steps in all.

    Counts the optimizer's steps, not this `fit`'s batches, so a run resumed
    from a checkpoint stops at the same step as an uninterrupted one. `fit`
    takes a step before a callback can stop it: do not call it when the
    restored step is already `total`. With `steps_per_execution`, make
    `total` a multiple of it.
    """

    def __init__(self, total):
        super().__init__()
        self.total = positive_int("total", total)

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.total:
            self.model.stop_training = True


STRATEGIES = ("auto", "default", "mirrored", "multiworker")


def distribution_strategy(name="auto"):
    """A `tf.distribute` strategy by name; None on Keras' other backends.

    Args:
        name: `"auto"`: `MirroredStrategy` over all GPUs if there are any,
            else the default strategy; `"default"`: one device;
            `"mirrored"`: all GPUs (all logical CPUs without GPUs);
            `"multiworker"`: `MultiWorkerMirroredStrategy` from the
            `TF_CONFIG` environment variable, with Keras' `fit` patched to
            run under it (`patch_keras_multi_worker_fit`). Call this first:
            a multi-worker strategy must exist before TensorFlow runs ops.
    """
    if name not in STRATEGIES:
        raise ValueError(
            "Received an invalid value for argument `name`, expected one of "
            f"{STRATEGIES}. Received: name={name!r}")
    if keras.backend.backend() != "tensorflow":
        if name not in ("auto", "default"):
            raise ValueError(
                "Received an invalid value for argument `name`, expected "
                f"'auto' or 'default' on Keras' {keras.backend.backend()} "
                "backend (the other strategies are tf.distribute's). "
                f"Received: name={name!r}")
        return None
    import tensorflow as tf

    if name == "multiworker":
        # A worker that dies makes the others fail (TF's peer health check)
        # instead of waiting forever in a collective.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        patch_keras_multi_worker_fit()  # keras-team/keras#20585
        return strategy
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if gpus else "default"
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def _multi_worker(strategy):
    if strategy is None:
        return False
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_folder(strategy, out):
    """`out` for the chief (or a single worker), a scratch folder for others.

    As the TensorFlow guide prescribes for multi-worker training, only the
    chief writes checkpoints and results where the user looks; every other
    worker writes its own (which it needs to resume) to
    `out/.<task type>-<task id>`. Returns a `pathlib.Path`.
    """
    out = pathlib.Path(out)
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return out
    task_type, task_id = resolver.task_type, resolver.task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if task_type == "chief" or (task_type == "worker" and task_id == 0
                                and not has_chief):
        return out
    return out / f".{task_type}-{task_id}"


def agree_on_checkpoint(strategy, checkpoint):
    """The iteration to resume from, the same on every worker.

    Call it after `checkpoint.restore()` on every worker, inside the
    strategy's scope; then resume the data `checkpoint.batches` in. Training
    is synchronous, so the workers hold the same step, unless one died while
    writing a checkpoint: then those ahead step back to their previous one
    (`ResumableCheckpoint(keep=2)`, the default). Raises `SystemExit` with
    what to do when they cannot agree.
    """
    done = int(checkpoint.model.optimizer.iterations.numpy())
    if not _multi_worker(strategy):
        return done
    import tensorflow as tf

    @tf.function
    def everyone():
        return strategy.run(lambda: tf.distribute.get_replica_context()
                            .all_gather(tf.constant([done]), axis=0))

    agreed = int(tf.reduce_min(
        strategy.experimental_local_results(everyone())[0]))
    if done > agreed and agreed in checkpoint.iterations():
        done = checkpoint.restore(agreed)
    if done != agreed:
        raise SystemExit(
            f"This worker's checkpoint is at iteration {done}, another's at "
            f"{agreed}: the workers cannot resume together. Remove every "
            f"worker's checkpoint folder ({checkpoint.directory} on this "
            "one) to start over.")
    return done


@contextlib.contextmanager
def peers_watched(strategy):
    """Turns a lost peer's collective error into a clear exit (multi-worker).

    Wrap `model.fit` in it. Other strategies' errors pass unchanged.
    """
    if not _multi_worker(strategy):
        yield
        return
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError, tf.errors.AbortedError) as error:
        reason = (error.message.strip().splitlines() or
                  [type(error).__name__])[-1]
        raise SystemExit(
            f"Training stopped: a worker of the cluster is gone "
            f"({type(error).__name__}: {reason}). Start every worker again "
            "with the same command to resume from the last checkpoint."
        ) from error
