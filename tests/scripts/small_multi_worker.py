"""A user's own multi-worker training script, built on keras_node.training.

Not the MNIST example: a small neural ODE fitting `h(1) = 2 h(0)`. Each
worker runs it with its `TF_CONFIG`; a killed job resumes when every worker
is started again with the same command. Writes `<out>/result.json` (the
chief) or `<out>/.worker-N/result.json`.
"""

import argparse
import json

import keras
import numpy as np
import tensorflow as tf

from keras_node import NeuralODE
from keras_node.training import (ResumableCheckpoint, StopAtIteration,
                                 agree_on_checkpoint, distribution_strategy,
                                 peers_watched, worker_folder, write_atomic)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=5)
    args = parser.parse_args()

    strategy = distribution_strategy("multiworker")  # before any TF op
    out = worker_folder(strategy, args.out)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        inputs = keras.Input((3,))
        dynamics = keras.Sequential([keras.layers.Dense(8, activation="tanh"),
                                     keras.layers.Dense(3)])
        model = keras.Model(inputs, NeuralODE(dynamics, solver="rk4")(inputs))
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        checkpoint = ResumableCheckpoint(out / "backup",
                                         save_every=args.save_every)
        checkpoint.set_model(model)
        checkpoint.restore()
        done = agree_on_checkpoint(strategy, checkpoint)
    print(f"resuming at iteration {done}", flush=True)

    x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    data = (tf.data.Dataset.from_tensor_slices((x, 2 * x)).repeat()
            .batch(8).skip(checkpoint.batches))
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(
            int(model.optimizer.iterations.numpy())))
    with peers_watched(strategy):
        model.fit(data, epochs=args.steps, steps_per_epoch=1, verbose=0,
                  initial_epoch=done,
                  callbacks=[checkpoint, StopAtIteration(args.steps), record])
    write_atomic(out / "result.json", json.dumps({
        "resumed_at": done, "iterations": seen,
        "weights": [w.tolist() for w in model.get_weights()]}))
    checkpoint.delete()


if __name__ == "__main__":
    main()
