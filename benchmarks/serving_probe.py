"""Probes `keras-node serve` as hostile and careless clients would; JSON out.

    python -m benchmarks.serving_probe [--requests 2400] [--clients 8]

Starts the server (the README's MNIST model, untrained, exported to a
temporary folder, as `benchmarks/serving.py` does) and measures:

- a mixed load: `--clients` threads, each on its own keep-alive connection,
  send `--requests` predict requests in all, each thread a good one and a
  malformed one in turn (so a good request follows every malformed one but
  a thread's last on its connection), about half of them malformed (a
  rotation of the cases that used to give 500s or be accepted: deep
  nesting, a list as `signature_name`, a 400-digit integer, numbers as
  strings, booleans, values beyond float32, a Unicode version number, a
  wrong shape, bad JSON). Reported: answers by status, 500s and connection
  errors (the goal for both is 0), the share of malformed requests sent,
  and the p50/p99 latency of the good requests;
- a 100 MB body (sent for real, with its Content-Length): the server's peak
  resident memory meanwhile against its idle memory (goal: within 100 MB),
  the time to its answer, and `/healthz` latency while it is sent (goal:
  under 100 ms).
"""

import argparse
import collections
import concurrent.futures
import http.client
import json
import pathlib
import socket
import tempfile
import threading
import time

import numpy as np

from benchmarks.machine import describe, provenance, rss_mib
from benchmarks.serving import export_untrained, start_server

NAME = "mnist"
PREDICT = f"/v1/models/{NAME}:predict"


def bad_requests():
    """`(path, body bytes)` of malformed requests."""
    image = [[[0.5]] * 28] * 28
    return [
        (PREDICT, b"[" * 50_000),
        (PREDICT, json.dumps({"signature_name": ["x"],
                              "instances": [image]}).encode()),
        (PREDICT, b'{"instances": [[[' + b"9" * 400 + b"]]]}"),
        (PREDICT, json.dumps({"instances": [[[["0.5"]] * 28] * 28]}).encode()),
        (PREDICT, json.dumps({"instances": [[[[True]] * 28] * 28]}).encode()),
        (PREDICT, json.dumps({"instances": [[[[1e39]] * 28] * 28]}).encode()),
        (f"/v1/models/{NAME}/versions/%C2%B2:predict",
         json.dumps({"instances": [image]}).encode()),
        (PREDICT, json.dumps({"instances": [[1.0, 2.0]]}).encode()),
        (PREDICT, b"{not json"),
    ]


def client_requests(index, requests, clients, good, bad):
    """Client `index`'s share of `requests` (every `clients`-th), as `(path,
    body)`: good and malformed in turn, so that a good request follows each
    malformed one on the connection; the malformed ones go round `bad`."""
    return [(PREDICT, good) if turn % 2 == 0
            else bad[(index + turn // 2) % len(bad)]
            for turn in range(len(range(index, requests, clients)))]


def mixed_load(port, requests, clients):
    good = json.dumps({"instances": np.random.default_rng(0).random(
        (1, 28, 28, 1)).round(3).tolist()}).encode()
    bad = bad_requests()
    plans = [client_requests(index, requests, clients, good, bad)
             for index in range(clients)]
    statuses = collections.Counter()
    connection_errors = 0
    latencies = []
    lock = threading.Lock()

    def client(index):
        nonlocal connection_errors
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for path, body in plans[index]:
            start = time.perf_counter()
            try:
                connection.request("POST", path, body)
                response = connection.getresponse()
                json.loads(response.read())
                status = response.status
            except (OSError, http.client.HTTPException, ValueError):
                with lock:
                    connection_errors += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port,
                                                        timeout=60)
                continue
            with lock:
                statuses[status] += 1
                if path == PREDICT and body is good:
                    latencies.append(time.perf_counter() - start)
        connection.close()

    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(3):  # the first run traces the model
        warm.request("POST", PREDICT, good)
        warm.getresponse().read()
    warm.close()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    latencies = np.array(latencies) * 1000
    sent_bad = sum(body is not good for plan in plans for _, body in plan)
    return {
        "requests": requests, "clients": clients,
        "bad_fraction": sent_bad / requests if requests else None,
        "seconds": time.perf_counter() - started,
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "served": sum(statuses.values()),
        "errors_500": sum(v for k, v in statuses.items() if k >= 500
                          and k != 503),
        "connection_errors": connection_errors,
        "good_latency_ms": {f"p{q}": float(np.percentile(latencies, q))
                            for q in (50, 99)} if len(latencies) else None,
    }


def big_body(port, pid, megabytes):
    idle = rss_mib(pid)
    peak = [idle]
    health = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            start = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", port,
                                                    timeout=30)
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            health.append(time.perf_counter() - start)
            connection.close()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    size = megabytes * 2**20
    start = time.perf_counter()
    status = None
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        chunk = b"0," * 2**19
        sent = 0
        try:
            while sent < size:
                sock.sendall(chunk[:size - sent])
                sent += min(len(chunk), size - sent)
        except OSError:
            pass  # the server answered and closed: the rest is not wanted
        try:
            status = int(sock.makefile("rb").readline().split()[1])
        except (OSError, IndexError, ValueError):
            status = None
    answered = time.perf_counter() - start
    time.sleep(0.5)
    done.set()
    watcher.join()
    health = np.array(health) * 1000
    return {
        "body_mib": megabytes, "status": status, "bytes_sent": sent,
        "seconds_to_answer": answered, "idle_rss_mib": idle,
        "peak_rss_mib": peak[0], "rss_growth_mib": peak[0] - idle,
        "healthz_ms": {"max": float(health.max()),
                       "p50": float(np.percentile(health, 50)),
                       "count": len(health)},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--body-mib", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        base = pathlib.Path(scratch) / NAME
        export_untrained(base)
        server, port = start_server(base, NAME)
        try:
            load = mixed_load(port, args.requests, args.clients)
            body = big_body(port, server.pid, args.body_mib)
            alive = server.poll() is None
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps({
        "benchmark": "serving_probe", "mixed_load": load, "big_body": body,
        "server_alive_at_end": alive,
        "machine": describe(), **provenance(),
    }, indent=2))


if __name__ == "__main__":
    main()
