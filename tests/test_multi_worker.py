"""`examples/mnist.py --strategy multiworker`: two worker processes on one CPU.

Each worker is a process of its own, configured by `TF_CONFIG` on free
127.0.0.1 ports, as a cluster of machines would be.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

QUICK = ["--limit", "1024", "--epochs", "20", "--eval-every", "1000",
         "--train-eval-batches", "1", "--verbose", "2"]


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(data_args, out, ports, *options):
    """Starts one example process per port; returns the processes."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(len(ports)):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        log = open(out.parent / f"{out.name}-worker{index}.log", "a")
        workers.append(subprocess.Popen(
            [sys.executable, str(ROOT / "examples/mnist.py"), *data_args,
             "--strategy", "multiworker", "--out", str(out), *QUICK,
             *options],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    return workers


def finish(workers, timeout=600):
    deadline = time.time() + timeout
    codes = []
    for worker in workers:
        try:
            codes.append(worker.wait(max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            pytest.fail(f"a worker still ran after {timeout} s")
    return codes


def logs(out):
    return [(out.parent / f"{out.name}-worker{i}.log").read_text()
            for i in range(2)]


def test_two_workers_train_one_model(data_args, tmp_path):
    out = tmp_path / "run"
    codes = finish(start_workers(data_args, out, free_ports(2),
                                 "--max-steps", "8"))
    assert codes == [0, 0], logs(out)[0][-3000:] + logs(out)[1][-3000:]

    # Only the chief writes to --out; the other worker to a scratch folder.
    chief, other = out, out / ".worker-1"
    for folder in (chief, other):
        assert json.loads((folder / "metrics.json").read_text())[
            "iterations"] == 8
    models = [keras.models.load_model(folder / "model.keras")
              for folder in (chief, other)]
    for a, b in zip(*(m.get_weights() for m in models)):
        np.testing.assert_array_equal(a, b)  # synchronous all-reduce

    # The global batch stays 128, one half per worker: 1,024 images make
    # 8 global batches an epoch, and the logged loss (the mean over both
    # workers, so the same on both) falls.
    histories = [json.loads((f / "history.json").read_text())["iterations"]
                 for f in (chief, other)]
    assert histories[0] == histories[1]
    losses = [p["loss"] for p in histories[0]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert "nfe_forward_max" in histories[0][0]


def test_dead_worker_stops_the_others_and_the_job_resumes(data_args,
                                                         tmp_path):
    out = tmp_path / "run"
    options = ["--max-steps", "30", "--checkpoint-every", "2"]
    workers = start_workers(data_args, out, free_ports(2), *options)
    backup = out / ".worker-1" / "backup"
    deadline = time.time() + 300
    while not list(backup.glob("ckpt-*.json")):
        assert time.time() < deadline and workers[1].poll() is None, (
            "no checkpoint within 300 s")
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGKILL)

    # The chief does not wait forever for its peer: it exits, and says why.
    code = finish(workers[:1], timeout=180)[0]
    workers[1].wait()
    assert code != 0
    assert "a worker of the cluster is gone" in logs(out)[0]
    assert not (out / "metrics.json").exists()

    codes = finish(start_workers(data_args, out, free_ports(2), *options))
    assert codes == [0, 0], logs(out)[0][-3000:] + logs(out)[1][-3000:]
    chief_log = logs(out)[0]
    assert "Resuming from the checkpoint" in chief_log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 30
    history = json.loads((out / "history.json").read_text())
    assert [p["iteration"] for p in history["iterations"]] == list(
        range(1, 31))


def test_patch_is_narrow_and_idempotent():
    from keras.src.backend.tensorflow import trainer

    from keras_node.distribute import patch_keras_multi_worker_fit

    patch_keras_multi_worker_fit()
    before = (trainer.reduce_per_replica,
              trainer.TensorFlowTrainer._maybe_symbolic_build)
    assert patch_keras_multi_worker_fit() == []  # already done
    assert before == (trainer.reduce_per_replica,
                      trainer.TensorFlowTrainer._maybe_symbolic_build)
    # Other strategies keep Keras' own reduction.
    import tensorflow as tf
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    values = strategy.run(lambda: tf.constant(
        float(tf.distribute.get_replica_context().replica_id_in_sync_group)))
    assert float(trainer.reduce_per_replica(values, strategy, "auto")) == 0.5
