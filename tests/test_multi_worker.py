"""`python -m examples.mnist --strategy multiworker`: two worker processes on one CPU.

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

from conftest import ROOT, tensorflow_only

pytestmark = [pytest.mark.slow,
              tensorflow_only("tf.distribute's multi-worker strategy")]

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


def start(out, ports, command):
    """Starts `command` once per port, as the workers of one cluster."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = []
    # This checkout's keras_node, whatever is installed: a script run by
    # its path does not have the working directory on sys.path.
    path = os.pathsep.join(filter(None, [str(ROOT),
                                         os.environ.get("PYTHONPATH")]))
    for index in range(len(ports)):
        env = dict(os.environ, PYTHONPATH=path, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        log = open(out.parent / f"{out.name}-worker{index}.log", "a")
        workers.append(subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT,
            text=True, cwd=ROOT))
    return workers


def start_workers(data_args, out, ports, *options):
    """Starts one example process per port; returns the processes."""
    return start(out, ports, [
        sys.executable, "-m", "examples.mnist", *data_args, "--strategy",
        "multiworker", "--out", str(out), *QUICK, *options])


def finish(workers, out, timeout=600):
    """The workers' exit codes; fails with their logs' tails if they hang."""
    deadline = time.time() + timeout
    codes = []
    for worker in workers:
        try:
            codes.append(worker.wait(max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            pytest.fail(f"a worker still ran after {timeout} s:\n"
                        + "\n".join(log[-2000:] for log in logs(out)))
    return codes


def logs(out):
    return [(out.parent / f"{out.name}-worker{i}.log").read_text()
            for i in range(2)]


def test_two_workers_train_one_model(data_args, tmp_path):
    out = tmp_path / "run"
    codes = finish(start_workers(data_args, out, free_ports(2),
                                 "--max-steps", "8"), out)
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


def start_script(out, ports, *options):
    """Starts `scripts/small_multi_worker.py` once per port."""
    script = ROOT / "tests" / "scripts" / "small_multi_worker.py"
    return start(out, ports, [sys.executable, str(script), "--out", str(out),
                              *options])


def test_a_user_script_resumes_after_a_lost_worker(tmp_path):
    # keras_node.training on a small model, not the example: a killed worker
    # stops the other with a clear message, and the job started again
    # resumes at the last checkpoint on both workers.
    out = tmp_path / "run"
    options = ["--steps", "100", "--save-every", "5"]
    workers = start_script(out, free_ports(2), *options)
    backup = out / ".worker-1" / "backup"
    deadline = time.time() + 300
    while not list(backup.glob("ckpt-*.json")):
        assert time.time() < deadline and workers[1].poll() is None, (
            "no checkpoint within 300 s: " + logs(out)[1][-3000:])
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGKILL)
    code = finish(workers[:1], out, timeout=180)[0]
    workers[1].wait()
    chief_log = logs(out)[0]
    assert code != 0, chief_log[-3000:]
    assert "a worker of the cluster is gone" in chief_log, chief_log[-3000:]
    assert not (out / "result.json").exists()

    codes = finish(start_script(out, free_ports(2), *options), out)
    assert codes == [0, 0], logs(out)[0][-3000:] + logs(out)[1][-3000:]
    results = [json.loads((folder / "result.json").read_text())
               for folder in (out, out / ".worker-1")]
    start_at = results[0]["resumed_at"]
    assert start_at >= 5 and start_at % 5 == 0
    assert results[1]["resumed_at"] == start_at  # they agreed
    for result in results:
        assert result["iterations"] == list(range(start_at + 1, 101))
    for a, b in zip(results[0]["weights"], results[1]["weights"]):
        np.testing.assert_array_equal(a, b)


def test_patch_applies_once_and_only_to_multi_worker_strategies():
    from keras_node._keras_compat import _PATCHED, tensorflow_trainer
    from keras_node.training import patch_keras_multi_worker_fit

    trainer = tensorflow_trainer()
    originals = (trainer.reduce_per_replica,
                 trainer.TensorFlowTrainer._maybe_symbolic_build)
    patched = patch_keras_multi_worker_fit()
    after = (trainer.reduce_per_replica,
             trainer.TensorFlowTrainer._maybe_symbolic_build)
    # Keras 3.15 has both defects: both functions are replaced (unless an
    # earlier test in this process patched them already).
    for original, now in zip(originals, after):
        assert getattr(now, _PATCHED, False)
        assert (original is now) == (not patched)
    if not getattr(originals[0], _PATCHED, False):
        assert patched == ["reduce_per_replica",
                           "TensorFlowTrainer._maybe_symbolic_build"]
    assert patch_keras_multi_worker_fit() == []  # already done
    assert after == (trainer.reduce_per_replica,
                     trainer.TensorFlowTrainer._maybe_symbolic_build)
    # Other strategies keep Keras' own reduction.
    import tensorflow as tf
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    values = strategy.run(lambda: tf.constant(
        float(tf.distribute.get_replica_context().replica_id_in_sync_group)))
    assert float(trainer.reduce_per_replica(values, strategy, "auto")) == 0.5
