"""Requests per second and latency of `keras-node serve` on this machine.

    python -m benchmarks.serving [--model-base-path runs/mnist/saved_model]
                                 [--requests 200] [--clients 4]

Starts the server as a real process on 127.0.0.1 (a free port), with the
given SavedModels or, by default, the README's MNIST model (untrained: the
cost of a prediction does not depend on the weights much) exported to a
temporary folder. Then, for batch sizes 1 and 32, `--clients` threads send
`--requests` row-format predict requests in all, and it prints JSON:
requests and images per second, and latency percentiles in milliseconds.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from benchmarks.machine import describe, provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def export_untrained(base):
    from examples.mnist_common import build_model

    from keras_node.serving import export_saved_model

    export_saved_model(build_model(), base, version=1, classifier=True)


def start_server(base, name="mnist"):
    """`(process, port)`: `keras-node serve` on a free port, once it
    answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "keras_node.cli", "serve",
         "--model-base-path", str(base), "--model-name", name,
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        wait_for(f"http://127.0.0.1:{port}", server)
    except RuntimeError:
        server.terminate()
        raise
    return server, port


def wait_for(url, process, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def load(url, batch, requests, clients):
    body = json.dumps({"instances": np.random.default_rng(0).random(
        (batch, 28, 28, 1)).round(3).tolist()}).encode()

    def one(_):
        start = time.perf_counter()
        req = urllib.request.Request(url + "/v1/models/mnist:predict",
                                     data=body, method="POST")
        with urllib.request.urlopen(req, timeout=120) as response:
            assert response.status == 200
            response.read()
        return time.perf_counter() - start

    for _ in range(3):  # warm up
        one(None)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = np.array(list(pool.map(one, range(requests)))) * 1000
    elapsed = time.perf_counter() - start
    return {
        "batch": batch, "clients": clients, "requests": requests,
        "requests_per_s": requests / elapsed,
        "images_per_s": requests * batch / elapsed,
        "latency_ms": {f"p{q}": float(np.percentile(latencies, q))
                       for q in (50, 90, 99)},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-base-path", type=pathlib.Path)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        base = args.model_base_path
        if base is None:
            base = pathlib.Path(scratch) / "mnist"
            export_untrained(base)
        server, port = start_server(base)
        url = f"http://127.0.0.1:{port}"
        try:
            runs = [load(url, batch, args.requests, args.clients)
                    for batch in (1, 32)]
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps({"benchmark": "serving",
                      # None: the untrained README model.
                      "model_base_path": (None if args.model_base_path is None
                                          else str(args.model_base_path)),
                      "runs": runs,
                      "machine": describe(), **provenance()}, indent=2))


if __name__ == "__main__":
    main()
