"""Export for TF Serving and the REST server, over real HTTP."""

import concurrent.futures
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import small_conv_dynamics
from keras_node import NeuralODE
from keras_node.serving import export_classifier

NAME = "mnist"


def small_classifier(seed):
    keras.utils.set_random_seed(seed)
    images = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(4, 4, strides=4)(images)
    x = NeuralODE(small_conv_dynamics(4))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, keras.layers.Dense(10)(x))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    model = small_classifier(0)
    path = export_classifier(model, base)
    assert path == base / "1"
    return base, model


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exported):
    base, _ = exported
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "keras_node.cli", "serve", "--model-base-path",
         str(base), "--model-name", NAME, "--port", str(port),
         "--max-instances", "64", "--poll-seconds", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
    yield url, process
    process.terminate()
    process.wait(timeout=30)


def request(url, path, body=None, raw=None):
    data = raw if raw is not None else (
        None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data,
                                 method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, 28, 28, 1), "float32")


def test_signatures_and_no_gradient_warning(exported):
    base, model = exported
    script = (f"import tensorflow as tf; m = tf.saved_model.load("
              f"{str(base / '1')!r}); print(sorted(m.signatures))")
    result = subprocess.run([sys.executable, "-c", script],
                            capture_output=True, text=True, check=True)
    assert "['predict_pixels', 'serving_default']" in result.stdout
    assert "custom gradients" not in result.stderr
    loaded = tf.saved_model.load(str(base / "1"))
    x = images(3)
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(out["logits"], model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["classes"],
                                  np.argmax(out["logits"], -1))
    pixels = (x[..., 0] * 255).round().astype("uint8")
    by_pixels = loaded.signatures["predict_pixels"](
        pixels=tf.constant(pixels))
    np.testing.assert_allclose(
        by_pixels["logits"], model.predict(pixels[..., None] / 255.0,
                                           verbose=0), rtol=1e-5, atol=1e-6)


def test_export_refuses_existing_version(exported):
    base, model = exported
    with pytest.raises(FileExistsError, match="Version 1 already exists"):
        export_classifier(model, base, version=1)
    with pytest.raises(ValueError, match=r"argument `version`, expected a "
                       r"positive integer. Received: version=0"):
        export_classifier(model, base, version=0)


def test_status_metadata_and_health(server):
    url, _ = server
    status, body = request(url, f"/v1/models/{NAME}")
    assert status == 200
    assert body["model_version_status"][0]["state"] == "AVAILABLE"
    status, body = request(url, f"/v1/models/{NAME}/metadata")
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) == {"serving_default", "predict_pixels"}
    assert signatures["serving_default"]["inputs"]["images"]["dtype"] == \
        "DT_FLOAT"
    assert signatures["predict_pixels"]["inputs"]["pixels"]["dtype"] == \
        "DT_UINT8"
    assert request(url, "/healthz")[1]["status"] == "ok"


def test_row_and_columnar_predictions_match_keras(server, exported):
    url, _ = server
    _, model = exported
    x = images(4, seed=1)
    expected = model.predict(x, verbose=0)
    status, body = request(url, f"/v1/models/{NAME}:predict",
                           {"instances": x.tolist()})
    assert status == 200
    np.testing.assert_allclose([p["logits"] for p in body["predictions"]],
                               expected, rtol=1e-5, atol=1e-5)
    assert [p["classes"] for p in body["predictions"]] == list(
        np.argmax(expected, -1))
    status, body = request(url, f"/v1/models/{NAME}/versions/1:predict",
                           {"inputs": {"images": x.tolist()}})
    assert status == 200
    np.testing.assert_allclose(body["outputs"]["logits"], expected,
                               rtol=1e-5, atol=1e-5)
    pixels = (x[..., 0] * 255).round().astype(int)
    status, body = request(url, f"/v1/models/{NAME}:predict",
                           {"signature_name": "predict_pixels",
                            "instances": pixels.tolist()})
    assert status == 200
    np.testing.assert_allclose(
        [p["logits"] for p in body["predictions"]],
        model.predict(pixels[..., None] / 255.0, verbose=0),
        rtol=1e-4, atol=1e-4)


BAD_REQUESTS = [
    (f"/v1/models/{NAME}:predict", None, b"{not json", 400, "JSON Parse"),
    (f"/v1/models/{NAME}:predict", {"instances": [[1.0, 2.0]]}, None, 400,
     "instance shape [2], expected [28, 28, 1]"),
    (f"/v1/models/{NAME}:predict",
     {"instances": [[["a"] * 1] * 28] * 1}, None, 400,
     "must be a (nested) list of numbers"),
    (f"/v1/models/{NAME}:predict",
     {"signature_name": "predict_pixels", "instances": [[[300] * 28] * 28]},
     None, 400, "must hold integers in [0, 255] (uint8)"),
    (f"/v1/models/{NAME}:predict",
     {"signature_name": "nope", "instances": [[[0] * 28] * 28]}, None, 400,
     'signature name: "nope" not found'),
    (f"/v1/models/{NAME}:predict",
     {"instances": np.zeros((65, 28, 28, 1)).tolist()}, None, 400,
     "holds 65 instances; this server takes 1 to 64"),
    (f"/v1/models/{NAME}:predict", {"nothing": 1}, None, 400,
     "Missing 'instances' or 'inputs'"),
    ("/v1/models/other:predict", {"instances": [[0]]}, None, 404,
     "Servable not found"),
    (f"/v1/models/{NAME}/versions/9:predict", {"instances": [[0]]}, None,
     404, "Specific(9)"),
    (f"/v1/models/{NAME}/versions/..%2F..%2Fetc:predict",
     {"instances": [[0]]}, None, 404, "Malformed version"),
]


@pytest.mark.parametrize("path, body, raw, status, message", BAD_REQUESTS)
def test_bad_requests_get_tf_serving_errors(server, path, body, raw, status,
                                            message):
    url, process = server
    got_status, got = request(url, path, body, raw)
    assert got_status == status
    assert message in got["error"]
    assert process.poll() is None


def test_concurrent_clients_mixed_good_and_bad(server, exported):
    url, process = server
    _, model = exported
    x = images(2, seed=2)
    expected = np.argmax(model.predict(x, verbose=0), -1).tolist()

    def one(i):
        if i % 3 == 2:
            path, body, raw, status, message = BAD_REQUESTS[
                i % len(BAD_REQUESTS)]
            got_status, got = request(url, path, body, raw)
            return got_status == status and message in got["error"]
        got_status, got = request(url, f"/v1/models/{NAME}:predict",
                                  {"instances": x.tolist()})
        return got_status == 200 and [
            p["classes"] for p in got["predictions"]] == expected

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(500)))
    assert all(results)
    assert process.poll() is None


def test_new_version_is_hot_loaded(server, exported, tmp_path):
    url, _ = server
    base, _ = exported
    newer = small_classifier(1)
    # Publish atomically, as for TF Serving: write elsewhere, then move.
    staging = export_classifier(newer, base.parent / "staging", version=2)
    os.rename(staging, base / "2")
    x = images(2, seed=3)
    deadline = time.time() + 60
    while True:
        status, body = request(url, f"/v1/models/{NAME}")
        if [v["version"] for v in body["model_version_status"]] == ["1", "2"]:
            break
        assert time.time() < deadline, body
        time.sleep(0.3)
    _, latest = request(url, f"/v1/models/{NAME}:predict",
                        {"instances": x.tolist()})
    np.testing.assert_allclose([p["logits"] for p in latest["predictions"]],
                               newer.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-5)
    _, first = request(url, f"/v1/models/{NAME}/versions/1:predict",
                       {"instances": x.tolist()})
    assert first["predictions"] != latest["predictions"]


def test_saved_model_cli_lists_both_signatures(exported):
    base, _ = exported
    result = subprocess.run(
        ["saved_model_cli", "show", "--dir", str(base / "1"), "--all"],
        capture_output=True, text=True, check=True)
    assert "signature_def['serving_default']" in result.stdout
    assert "signature_def['predict_pixels']" in result.stdout


def test_server_refuses_a_folder_without_versions(tmp_path):
    from keras_node.server import create_app

    with pytest.raises(FileNotFoundError, match=r"No SavedModel version "
                       r"folder \(a positive integer, such as .*/1\) in "
                       r"--model-base-path"):
        create_app(tmp_path, NAME)


def test_export_needs_a_model(tmp_path):
    with pytest.raises(TypeError, match=r"argument `model`, expected a Keras "
                       r"model or the path of a .keras file. Received: 3"):
        export_classifier(3, tmp_path)
