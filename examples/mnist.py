"""The convolutional neural-ODE MNIST classifier of DiffEqFlux, in Keras.

Rebuilds the DiffEqFlux tutorial "Convolutional Neural ODE MNIST Classifier
on GPU" on `keras_node.NeuralODE`, trains it with `model.fit` under a
`tf.distribute` strategy, and leaves in `--out`:

    model.keras            the trained model
    saved_model/1/         a SavedModel for TF Serving (TensorFlow backend)
    metrics.json           the run's figures (test accuracy, NFE, timing)
    history.json           accuracy points and per-iteration logs
    accuracy.png, nfe.png  their plots
    request.json           a request to try it with (TensorFlow backend)
    options.json           the run's options (a resumed run must match)

and, until the run ends, `backup/`: the checkpoint a killed run resumes
from.

Run from the repository's root; offline (no download), hand tfds the folder
with the four canonical files:

    python -m examples.mnist --manual-dir ../shared/data/mnist

`python -m examples.mnist --help` lists every option (`mnist_options.py`);
the model, the optimizer and the tutorial's callback are in
`mnist_common.py`, the data and the export in `mnist_data.py`.
"""

import contextlib
import json
import math
import pathlib
import time

import keras
import numpy as np

from examples.mnist_common import (AccuracyMonitor, build_model,
                                   make_optimizer, plot_history,
                                   resume_history, solver_and_gradient)
from examples.mnist_data import export_for_serving, load_mnist, make_datasets
from examples.mnist_options import RUN_OPTIONS, TENSORFLOW, parse_args
from examples.options import check_same_run
from keras_node.callbacks import LogEvaluationCounts
from keras_node.training import (CheckpointError, ResumableCheckpoint,
                                 StopAtIteration, agree_on_checkpoint,
                                 distribution_strategy, peers_watched,
                                 save_model_atomic, worker_folder,
                                 write_atomic)


def main(argv=None):
    args = parse_args(argv, description=__doc__)
    # First: a multi-worker strategy must exist before TensorFlow runs ops.
    strategy = distribution_strategy(args.strategy)
    out = worker_folder(strategy, args.out)
    arrays = load_mnist(args.manual_dir, args.data_dir, args.limit,
                        args.seed, hold_out=not args.train_on_held_out)
    # After the data: tfds draws random numbers when it first prepares them.
    keras.utils.set_random_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    check_same_run(out, args, RUN_OPTIONS, started=(
        (out / "model.keras").exists() or any((out / "backup").glob("*"))))
    # What the accuracy printed during training is measured on.
    watched = "test" if args.train_on_held_out else "held_out"
    n_train = len(arrays["train"][0])
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total_steps = min(steps_per_epoch * args.epochs,
                      args.max_steps or math.inf)
    n_held_out = len(arrays.get("held_out", [[]])[0])
    if watched == "held_out" and not n_held_out:
        raise SystemExit(f"--limit {args.limit} holds no image out (10% of "
                         "each digit's): use a larger --limit.")
    print(f"MNIST: {n_train} train, {n_held_out} held out, "
          f"{len(arrays['test'][0])} test images; {steps_per_epoch} "
          f"iterations per epoch, {total_steps} in all.")

    finished = (out / "model.keras").exists()
    with strategy.scope() if strategy else contextlib.nullcontext():
        if finished:
            model = keras.models.load_model(out / "model.keras")
        else:
            solver, gradient = solver_and_gradient(
                args.solver, args.num_steps, args.gradient, args.adjoint_norm,
                args.unroll)
            model = build_model(solver=solver, gradient=gradient,
                                kinetic_energy=args.kinetic_energy,
                                augment_dim=args.augment_dim)
            model.compile(
                optimizer=make_optimizer(args.learning_rate, total_steps,
                                         args.weight_decay, args.ema),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                metrics=["accuracy"])
        # Restore now, before fit, to know where the data stream resumes.
        checkpoint = ResumableCheckpoint(
            out / "backup", save_every=args.checkpoint_every, keep=2)
        checkpoint.set_model(model)
        try:
            checkpoint.restore()
        except CheckpointError as error:
            raise SystemExit(str(error))
        done = agree_on_checkpoint(strategy, checkpoint)
    if finished:
        print(f"{out} holds a finished run ({done} iterations): evaluating "
              "and exporting it again. Use a new --out to train anew.")
        total_steps = done
    elif done:
        print(f"Resuming from the checkpoint in {out / 'backup'} at "
              f"iteration {done}.")

    data = make_datasets(arrays, args.batch_size, args.seed,
                         args.shift, args.rotate,
                         skip_batches=checkpoint.batches)
    monitor = AccuracyMonitor(data["train_eval"], data[watched],
                              every=args.eval_every,
                              train_batches=args.train_eval_batches,
                              verbose=args.verbose)
    monitor.set_model(model)  # also used after training, for held-out figures
    history_path = out / "history.json"
    resume_history(monitor, history_path, done)
    save_history = lambda: write_atomic(history_path, json.dumps(
        {"accuracy": monitor.history, "iterations": monitor.iteration_logs}))
    callbacks = [
        LogEvaluationCounts(),  # NFE in the logs, also on JAX
        monitor,
        keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: (
            model.optimizer.iterations.numpy() % args.checkpoint_every == 0
            and save_history())),
        checkpoint,  # after the history, so a checkpoint never leads it
        StopAtIteration(total_steps),
    ]
    if args.tensorboard is not None:
        callbacks.append(keras.callbacks.TensorBoard(
            args.tensorboard, update_freq="batch"))

    started = time.time()
    if done < total_steps:
        with peers_watched(strategy):
            model.fit(data["train"], initial_epoch=done // steps_per_epoch,
                      epochs=math.ceil(total_steps / steps_per_epoch),
                      steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                      shuffle=False,  # the stream is shuffled, reproducibly
                      verbose=args.verbose)
    train_time = time.time() - started
    if model.optimizer.use_ema:
        # The averages into the weights, as `fit` does at its end, also for
        # a run restored at its last step (which does not call `fit`). As
        # copies: Keras 3.15's JAX trainer donates the weights' arrays to
        # the next compiled step, which deletes the averages with them when
        # they are the same arrays ("Array has been deleted" when saving).
        model.optimizer.finalize_variable_values(model.trainable_variables)
        for variable in model.trainable_variables:
            variable.assign(keras.ops.copy(variable))
    save_history()

    test = model.evaluate(data["test"], verbose=0, return_dict=True)
    # Every artifact is written atomically, and the checkpoint stays until
    # they all are: a kill at any moment leaves a run that resumes.
    save_model_atomic(model, out / "model.keras")
    if TENSORFLOW and not (out / "saved_model" / "1").exists():
        export_for_serving(model, out / "saved_model", version=1)
    recent = monitor.iteration_logs[-20:]
    mean = lambda key: (float(np.mean([p[key] for p in recent]))
                        if recent else None)
    metrics = {
        "test_accuracy": 100.0 * test["accuracy"],
        "test_loss": test["loss"],
        "held_out_accuracy": (monitor.accuracy(data["held_out"])
                              if "held_out" in data else None),
        "iterations": int(model.optimizer.iterations.numpy()),
        "train_time_s_this_run": train_time,
        "nfe_forward_last_20": mean("nfe_forward"),
        "nfe_backward_last_20": mean("nfe_backward"),
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v
                 for k, v in vars(args).items()},
    }
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    plot_history(monitor.history, monitor.iteration_logs, out,
                 watched.replace("_", "-"))
    print(f"Test accuracy (official 10,000-image split, or --limit): "
          f"{metrics['test_accuracy']:.3f}%")
    print(f"Saved {out / 'model.keras'}; figures in {out / 'metrics.json'}.")
    if not TENSORFLOW:
        print("No SavedModel: exporting one needs Keras' TensorFlow backend "
              f"(keras-node export --classifier {out / 'model.keras'} "
              f"{out / 'saved_model'} under KERAS_BACKEND=tensorflow exports "
              "this model).")
        checkpoint.delete()
        return metrics
    print(f"Exported the SavedModel {out / 'saved_model' / '1'}.")
    # A ready request: the first official test image, as stored (uint8).
    pixels = np.round(arrays["test"][0][:1, ..., 0] * 255).astype(int)
    write_atomic(out / "request.json", json.dumps(
        {"signature_name": "predict_pixels", "instances": pixels.tolist()}))
    checkpoint.delete()
    if out != args.out:
        return metrics  # another worker's copy: the chief's is the result
    print("Serve the SavedModel with TF Serving's REST API, and query it "
          f"with the first test image (a {arrays['test'][1][0]}):\n"
          f"  keras-node serve --model-base-path {out / 'saved_model'} "
          "--model-name mnist --port 8501\n"
          "  curl -s -X POST localhost:8501/v1/models/mnist:predict "
          f"-d @{out / 'request.json'}")
    return metrics


if __name__ == "__main__":
    main()
