"""Export for TF Serving and the REST server, over real HTTP."""

import concurrent.futures
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import tensorflow as tf

from benchmarks.machine import rss_mib
from conftest import tensorflow_only
from helpers import small_conv_dynamics
from keras_node import NeuralODE
from keras_node.serving import export_saved_model

pytestmark = tensorflow_only("SavedModels and their server are TensorFlow's")

NAME = "mnist"


def small_classifier(seed):
    keras.utils.set_random_seed(seed)
    images = keras.Input((28, 28, 1), name="images")
    x = keras.layers.Conv2D(4, 4, strides=4)(images)
    x = NeuralODE(small_conv_dynamics(4))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, keras.layers.Dense(10)(x))


# A second signature for another form of the input, as the MNIST example
# adds: uint8 pixels without the channel axis.
PIXELS = {"predict_pixels": (
    tf.TensorSpec((None, 28, 28), tf.uint8, name="pixels"),
    lambda pixels: tf.cast(pixels, tf.float32)[..., None] / 255.0)}


def export_classifier(model, base, version=None):
    return export_saved_model(model, base, version, classifier=True,
                              signatures=PIXELS)


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
    yield from start_server(exported[0])


@pytest.fixture(scope="module")
def impatient_server(exported):
    # A short timeout for the tests of timeouts only. With 2 s for every
    # test, a CI run on an overloaded machine saw a client's connection
    # closed as silent before its headers arrived (a broken pipe while
    # sending the body), which is what the server should do with it.
    yield from start_server(exported[0], "--request-timeout", "2")


def start_server(base, *options):
    port = free_port()
    # The server logs every request: to a file, not to a pipe that nobody
    # reads (a full pipe blocks the server once it has logged ~64 KiB).
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "keras_node.cli", "serve", "--model-base-path",
         str(base), "--model-name", NAME, "--port", str(port),
         "--max-instances", "64", "--poll-seconds", "0.5",
         "--max-body-bytes", str(4 * 2**20),
         *options],
        stdout=log, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited:\n{log.read()[-3000:]}")
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
    try:
        yield url, process
    finally:  # also when the generator is closed early
        process.terminate()
        process.wait(timeout=30)
        log.close()


def request(url, path, body=None, raw=None, method=None):
    data = raw if raw is not None else (
        None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        url + urllib.parse.quote(path, safe="/:%"), data=data,
        method=method or ("GET" if data is None else "POST"))
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
     {"signature_name": "predict_pixels", "instances": [[[1.0] * 28] * 28]},
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
    # What a hostile or careless client sent (each was a 500 or accepted).
    (f"/v1/models/{NAME}:predict", None, b"[" * 50_000, 400,
     "JSON Parse error: the document nests too deep"),
    (f"/v1/models/{NAME}:predict",
     {"signature_name": ["a"], "instances": [[0]]}, None, 400,
     "'signature_name' must be a string"),
    (f"/v1/models/{NAME}:predict",
     {"signature_name": {"a": 1}, "instances": [[0]]}, None, 400,
     "'signature_name' must be a string"),
    (f"/v1/models/{NAME}:predict", None,
     b'{"instances": [[[' + b"9" * 400 + b"]]]}", 400,
     "holds a number too large for float32"),
    (f"/v1/models/{NAME}:predict", {"instances": [[["0.5"]] * 28] * 1}, None,
     400, "holds str '0.5'"),
    (f"/v1/models/{NAME}:predict", {"instances": [[[True]] * 28] * 1}, None,
     400, "holds bool 'True'"),
    (f"/v1/models/{NAME}:predict", {"instances": [[[[1e39]] * 28] * 28]},
     None, 400, "beyond the range of float32"),
    (f"/v1/models/{NAME}:predict", {"instances": [[[[1e300]] * 28] * 28]},
     None, 400, "beyond the range of float32"),
    (f"/v1/models/{NAME}:predict", {"instances": [[[[1e38]] * 28] * 28]},
     None, 400, "The model failed on this input: its output 'logits' "
     "holds NaN or inf"),
    (f"/v1/models/{NAME}/versions/\u00b2:predict".encode().decode(
        "unicode_escape"), {"instances": [[0]]}, None, 404,
     "Malformed version"),
    (f"/v1/models/{NAME}/versions/\u0661".encode().decode("unicode_escape"),
     None, None, 404, "Malformed version"),
    (f"/v1/models/{NAME}/versions/\uff11".encode().decode("unicode_escape"),
     None, None, 404, "Malformed version"),
    (f"/v1/models/{NAME}/versions/{'9' * 5000}", None, None, 404,
     "Malformed version"),
    ("/nowhere", None, None, 404, "Not Found"),
    # Not redirected to /healthz (an empty 307, found by the fuzzing below).
    ("/healthz/", None, None, 404, "Not Found"),
    (f"/v1/models/{NAME}:predict", [1], None, 400,
     "JSON Value: the request body must be an object"),
    (f"/v1/models/{NAME}:predict", {"instances": [[[[[[[[[[[[[0]]]]]]]]]]]]]},
     None, 400, "Input 'images' nests deeper than 12 levels"),
    (f"/v1/models/{NAME}:predict", {"inputs": {"x": [0]}}, None, 400,
     "Unknown input(s) ['x']; the signature takes ['images']"),
    (f"/v1/models/{NAME}:predict", {"inputs": {}}, None, 400,
     "Missing input 'images'"),
    (f"/v1/models/{NAME}:predict", {"instances": []}, None, 400,
     "'instances' must be a non-empty list"),
    (f"/v1/models/{NAME}:predict", {"instances": 3}, None, 400,
     "'instances' must be a non-empty list"),
    (f"/v1/models/{NAME}:predict",  # json.dumps writes NaN, as json reads it
     {"instances": [[[[float("nan")]] * 28] * 28]}, None, 400,
     "Input 'images' holds a non-finite number"),
    (f"/v1/models/{NAME}:classify", {"instances": [[0]]}, None, 404,
     f"Unknown resource '{NAME}:classify'"),
    (f"/v1/models/{NAME}/labels/stable", None, None, 404,
     f"Unknown resource '{NAME}/labels/stable'"),
]


@pytest.mark.parametrize("path, body, raw, status, message", BAD_REQUESTS)
def test_bad_requests_get_tf_serving_errors(server, path, body, raw, status,
                                            message):
    url, process = server
    got_status, got = request(url, path, body, raw)
    assert got_status == status
    assert message in got["error"]
    assert process.poll() is None


@pytest.mark.slow
def test_concurrent_clients_mixed_good_and_bad(server, exported):
    url, process = server
    _, model = exported
    x = images(2, seed=2)
    expected = np.argmax(model.predict(x, verbose=0), -1).tolist()

    def one(i):  # every third request a bad one, each bad one once
        if i % 3 == 2:
            path, body, raw, status, message = BAD_REQUESTS[i // 3]
            got_status, got = request(url, path, body, raw)
            return got_status == status and message in got["error"]
        got_status, got = request(url, f"/v1/models/{NAME}:predict",
                                  {"instances": x.tolist()})
        return got_status == 200 and [
            p["classes"] for p in got["predictions"]] == expected

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(3 * len(BAD_REQUESTS))))
    assert all(results)
    assert process.poll() is None


@pytest.mark.slow
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


def test_server_refuses_a_folder_whose_versions_all_fail(tmp_path, caplog):
    from keras_node.server import create_app

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(FileNotFoundError, match=(
            r"^No SavedModel version folder .* in --model-base-path .* "
            r"could be loaded \(version 1: .+\)\.$")):
        create_app(tmp_path, NAME)
    assert [record.getMessage().split(":")[0] for record in caplog.records
            if record.levelname == "WARNING"] == ["Could not load version 1"]


def test_export_needs_a_model(tmp_path):
    with pytest.raises(TypeError, match=r"argument `model`, expected a Keras "
                       r"model or the path of a .keras file. Received: 3"):
        export_saved_model(3, tmp_path)


def two_input_regressor():
    """Not a classifier: a neural-ODE regressor with two named inputs and
    one output."""
    keras.utils.set_random_seed(0)
    state = keras.Input((3,), name="state")
    scale = keras.Input((1,), name="scale")
    x = NeuralODE(keras.Sequential([keras.layers.Dense(3, activation="tanh")
                                    ]))(state)
    return keras.Model([state, scale], x * scale)


def test_export_serves_any_model_by_its_input_names(tmp_path):
    model = two_input_regressor()
    path = export_saved_model(model, tmp_path)
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["serving_default"]
    assert set(signature.structured_input_signature[1]) == {"state", "scale"}
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(4, 3)).astype("float32"),
          rng.normal(size=(4, 1)).astype("float32")]
    out = signature(state=tf.constant(xs[0]), scale=tf.constant(xs[1]))
    assert set(out) == {"outputs"}
    np.testing.assert_allclose(out["outputs"], model.predict(xs, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_export_takes_dict_inputs_and_inputs_of_any_rank(tmp_path):
    from keras_node.server import _signature_metadata

    keras.utils.set_random_seed(0)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = NeuralODE(keras.layers.Dense(5, activation="tanh"))(
        keras.layers.Concatenate()([a, b]))
    model = keras.Model({"b": b, "a": a}, h)  # keys out of order
    flat = (tf.TensorSpec(None, tf.float32, name="v"),
            lambda v: {"a": tf.reshape(v, (-1, 5))[:, :3],
                       "b": tf.reshape(v, (-1, 5))[:, 3:]})
    path = export_saved_model(model, tmp_path, signatures={"flat": flat})
    loaded = tf.saved_model.load(str(path))
    x = {"a": np.ones((2, 3), "float32"), "b": np.zeros((2, 2), "float32")}
    out = loaded.signatures["serving_default"](**x)["outputs"]
    np.testing.assert_allclose(out, model.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-6)
    metadata = _signature_metadata(loaded.signatures["flat"])
    assert metadata["inputs"]["v"]["tensor_shape"] == {"unknown_rank": True}


def test_export_serves_dynamics_with_random_layers(tmp_path):
    # The seed generators' states, read by every solve, are not tracked by
    # the model: export saves them too.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    dynamics = keras.Sequential([keras.layers.GaussianNoise(0.1),
                                 keras.layers.Dense(3, activation="tanh")])
    h = NeuralODE(dynamics, jacobian_norm=0.1)(inputs)
    model = keras.Model(inputs, h)
    path = export_saved_model(model, tmp_path)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    out = tf.saved_model.load(str(path)).signatures["serving_default"](
        tf.constant(x))["outputs"]
    np.testing.assert_allclose(out, model.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-6)


def test_integers_reach_the_model_exactly():
    from keras_node.server import _RequestError, _to_array

    spec = tf.TensorSpec((None, 1), tf.int64, name="ids")
    ids = [[2**53 + 1], [2**63 - 1], [-2**63]]
    assert _to_array("ids", ids, spec, 8).tolist() == ids
    for bad in ([[2**63]], [[1.0]], [[0.5]]):
        with pytest.raises(_RequestError, match=r"Input 'ids' must hold "
                           r"integers in \[-9223372036854775808, "
                           r"9223372036854775807\] \(int64\)"):
            _to_array("ids", bad, spec, 8)


def test_server_answers_a_lone_output_as_tf_serving_does(tmp_path):
    # Two named inputs, one output: TF Serving answers with the output's
    # values alone, `{"predictions": [row, ...]}` and `{"outputs": rows}`.
    model = two_input_regressor()
    export_saved_model(model, tmp_path)
    server = start_server(tmp_path)
    url, _ = next(server)
    try:
        rng = np.random.default_rng(1)
        state = rng.normal(size=(4, 3)).astype("float32")
        scale = rng.normal(size=(4, 1)).astype("float32")
        expected = model.predict([state, scale], verbose=0)
        path = f"/v1/models/{NAME}:predict"
        status, body = request(url, path, {"instances": [
            {"state": s.tolist(), "scale": c.tolist()}
            for s, c in zip(state, scale)]})
        assert status == 200, body
        np.testing.assert_allclose(body["predictions"], expected, rtol=1e-5,
                                   atol=1e-6)
        status, body = request(url, path, {"inputs": {
            "state": state.tolist(), "scale": scale.tolist()}})
        assert status == 200, body
        np.testing.assert_allclose(body["outputs"], expected, rtol=1e-5,
                                   atol=1e-6)
        for bad, message in [
                ({"instances": state.tolist()},
                 "instances must be objects keyed by input name"),
                ({"inputs": state.tolist()},
                 "'inputs' must be an object keyed by input name"),
                ({"inputs": {"state": state.tolist()}},
                 "Missing input 'scale'"),
                ({"instances": [{"state": state[0].tolist(),
                                 "scale": scale[0].tolist(), "typo": [0]}]},
                 "Unknown input(s) ['typo']; the signature takes ['scale', "
                 "'state']"),
                ({"instances": [{"state": state[0].tolist(),
                                 "scale": scale[0].tolist()},
                                {"state": state[1].tolist()}]},
                 "Missing input 'scale' in instance 1")]:
            status, body = request(url, path, bad)
            assert status == 400 and message in body["error"], body
    finally:
        server.close()


def test_export_argument_errors(tmp_path):
    keras.utils.set_random_seed(0)
    x = keras.Input((3,), name="x")
    two = keras.Model(x, [keras.layers.Dense(2)(x), keras.layers.Dense(2)(x)])
    with pytest.raises(ValueError, match=r"argument `classifier`: a "
                       r"classifier model has one output \(the logits\), "
                       r"but this model has 2"):
        export_saved_model(two, tmp_path, classifier=True)
    binary = keras.Model(x, keras.layers.Dense(1)(x))
    with pytest.raises(ValueError, match=r"argument `classifier`: a "
                       r"classifier's logits are \(batch, classes\) with two "
                       r"or more classes .* output has shape \(None, 1\)"):
        export_saved_model(binary, tmp_path, classifier=True)
    one = small_classifier(0)
    with pytest.raises(ValueError, match=r"argument `signatures`: "
                       r"'serving_default' is the model's own signature"):
        export_saved_model(one, tmp_path,
                           signatures={"serving_default": PIXELS[
                               "predict_pixels"]})
    class Subclassed(keras.Model):
        def call(self, x):
            return 2 * x

    with pytest.raises(ValueError, match=r"argument `model`, expected a "
                       r"model with declared inputs .* Received: Subclassed "
                       r"'subclassed' without `inputs`"):
        export_saved_model(Subclassed(name="subclassed"), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def connect(url):
    host, port = url.rsplit("/", 1)[1].split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def test_errors_keep_the_connection_usable(server):
    url, _ = server
    connection = connect(url)
    good = json.dumps({"instances": images(1).tolist()})
    for body in (b"[" * 50_000, b'{"instances": [[true]]}', good.encode()):
        connection.request("POST", f"/v1/models/{NAME}:predict", body)
        response = connection.getresponse()
        payload = json.loads(response.read())
        assert response.getheader("Connection") != "close"
    assert response.status == 200 and "predictions" in payload


def test_method_not_allowed_is_json(server):
    url, _ = server
    status, body = request(url, f"/v1/models/{NAME}", method="DELETE")
    assert status == 405 and body["error"] == "Method Not Allowed"


def test_large_body_is_refused_before_it_is_read(server):
    # The client sends on past what the server reads: the server drops
    # what follows for a second before it closes. (Closed with bytes
    # unread, the connection was reset, and the client could lose the 413:
    # the 1 MiB beyond the limit made that happen on every try.)
    url, process = server
    connection = connect(url)
    # Announce 100 MB, send 1 MiB of it: 413 without reading it.
    connection.putrequest("POST", f"/v1/models/{NAME}:predict")
    connection.putheader("Content-Length", str(100 * 2**20))
    connection.endheaders(b'{"instances": ' + b"0," * 2**19)
    response = connection.getresponse()
    assert response.status == 413
    assert "takes at most 4194304" in json.loads(response.read())["error"]
    # Streamed without a length: cut at the limit.
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/models/{NAME}:predict HTTP/1.1\r\n"
                     f"Host: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
                     .encode())
        chunk = b"0," * 2**16
        for _ in range(5 * 2**20 // len(chunk)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"over 4194304 bytes" in reply
    status, _ = request(url, "/healthz")
    assert status == 200 and process.poll() is None


def test_a_client_that_expects_100_continue_gets_413_at_once(server):
    # curl asks `Expect: 100-continue` before a body over 1 MiB: refused by
    # its length, the body must not be asked for (by reading it).
    url, _ = server
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/models/{NAME}:predict HTTP/1.1\r\n"
                     f"Host: {host}\r\nContent-Length: {100 * 2**20}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        reply = sock.makefile("rb").readline()
    assert reply.startswith(b"HTTP/1.1 413 ")


def test_slow_client_is_timed_out(impatient_server):
    url, _ = impatient_server
    connection = connect(url)
    connection.putrequest("POST", f"/v1/models/{NAME}:predict")
    connection.putheader("Content-Length", "1000")
    connection.endheaders(b"{")
    started = time.monotonic()
    response = connection.getresponse()  # the server's --request-timeout 2
    assert response.status == 408
    assert "took longer than 2.0 s" in json.loads(response.read())["error"]
    assert time.monotonic() - started < 20


def test_silent_client_is_disconnected(impatient_server):
    url, _ = impatient_server
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
    assert time.monotonic() - started < 20  # --request-timeout 2


@pytest.mark.slow
def test_busy_server_answers_503_with_retry_after(exported):
    base, _ = exported
    server = start_server(base, "--max-concurrent-runs", "1",
                          "--queue-timeout", "0.001")
    url, _ = next(server)
    try:
        body = {"instances": images(64).tolist()}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(
                lambda _: _raw_request(url, f"/v1/models/{NAME}:predict",
                                       body), range(16)))
        statuses = [status for status, _, _ in answers]
        assert set(statuses) <= {200, 503} and 200 in statuses
        busy = [(headers, payload) for status, headers, payload in answers
                if status == 503]
        assert busy, statuses
        assert busy[0][0]["Retry-After"] == "1"
        assert "model runs are busy" in busy[0][1]["error"]
    finally:
        server.close()


def _raw_request(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.headers, json.loads(
                response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


@pytest.mark.slow
def test_version_published_in_pieces_loads_and_failures_are_reported(
        server, exported, tmp_path):
    url, _ = server
    base, _ = exported
    staging = export_classifier(small_classifier(2), tmp_path / "staging",
                                version=3)
    (base / "\u00b2".encode().decode("unicode_escape")).mkdir()  # ignored
    target = base / "3"
    target.mkdir()
    shutil.copy(staging / "saved_model.pb", target)  # variables/ come later
    deadline = time.time() + 60
    while True:
        _, body = request(url, f"/v1/models/{NAME}/versions/3")
        if "model_version_status" in body:
            break
        assert time.time() < deadline, body
        time.sleep(0.3)
    [entry] = body["model_version_status"]
    assert entry["state"] == "END" and entry["status"]["error_message"]
    shutil.copytree(staging / "variables", target / "variables")
    while True:
        _, body = request(url, f"/v1/models/{NAME}/versions/3")
        if body["model_version_status"][0]["state"] == "AVAILABLE":
            break
        assert time.time() < deadline, body
        time.sleep(0.3)
    status, body = request(url, f"/v1/models/{NAME}/versions/3:predict",
                           {"instances": images(1).tolist()})
    assert status == 200


@pytest.mark.parametrize("option, value", [
    ("max_instances", 0), ("max_body_bytes", -1), ("max_concurrent_runs", 0),
    ("queue_timeout", float("nan")), ("request_timeout", 0),
    ("poll_seconds", "1")])
def test_impossible_server_options_are_refused(exported, option, value):
    from keras_node.server import create_app

    with pytest.raises(ValueError, match=rf"argument `{option}`, expected a "
                       rf"positive .* Received: {option}="):
        create_app(exported[0], NAME, **{option: value})


def test_impossible_model_names_are_refused(exported):
    from keras_node.server import create_app

    for name in ("", "a/b", "a:b"):
        with pytest.raises(ValueError, match=r"argument `model_name`, "
                           r"expected a name without '/' or ':' \(it is "
                           rf"part of the URLs\). Received: "
                           rf"model_name='{name}'"):
            create_app(exported[0], name)


def _serve(*options):
    return ["serve", "--model-base-path", ".", "--model-name", NAME,
            *options]


@pytest.mark.parametrize("argv, message", [
    (["export", "missing.keras", "out"],
     "argument model: expected a .keras file, received 'missing.keras'"),
    (_serve("--port", "70000"), "argument --port: expected a port number "
     "from 0 to 65535, received '70000'"),
    (_serve("--port", "abc"), "argument --port: expected a port number "
     "from 0 to 65535, received 'abc'"),
    (["serve", "--model-base-path", ".", "--model-name", "a/b"],
     "argument --model-name: expected a name without '/' or ':' (it is "
     "part of the URLs), received 'a/b'"),
    (_serve("--max-instances", "0"),
     "argument --max-instances: expected a positive integer, received '0'"),
    (_serve("--max-body-bytes", "1.5"), "argument --max-body-bytes: "
     "expected a positive integer, received '1.5'"),
    (_serve("--queue-timeout", "nan"), "argument --queue-timeout: expected "
     "a positive number of seconds, received 'nan'"),
    (_serve("--poll-seconds", "-1"), "argument --poll-seconds: expected a "
     "positive number of seconds, received '-1'"),
])
def test_cli_argument_errors(argv, message, capsys):
    from keras_node import cli

    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_cli_export_loads_custom_layers_from_import(
        tmp_path, monkeypatch, capsys):
    # A model with a custom layer loads once its module is imported, found
    # from the working folder; without it, the error says what to do.
    from keras_node import cli

    (tmp_path / "cli_dynamics.py").write_text(
        "import keras\n\n"
        "@keras.saving.register_keras_serializable(package='cli_test')\n"
        "class Halve(keras.layers.Layer):\n"
        "    def call(self, h):\n"
        "        return -0.5 * h\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(tmp_path)
    import cli_dynamics

    inputs = keras.Input((3,))
    keras.Model(inputs, NeuralODE(cli_dynamics.Halve())(inputs)).save(
        tmp_path / "model.keras")
    monkeypatch.delitem(sys.modules, "cli_dynamics")
    keras.saving.get_custom_objects().pop("cli_test>Halve")
    with pytest.raises(SystemExit):
        cli.main(["export", "model.keras", "base"])
    assert "If it holds custom layers, name the module that defines and " \
        "registers them with --import MODULE." in capsys.readouterr().err
    cli.main(["export", "model.keras", "base", "--import", "cli_dynamics"])
    served = tf.saved_model.load(str(tmp_path / "base" / "1"))
    out = served.signatures["serving_default"](tf.ones((2, 3)))["outputs"]
    np.testing.assert_allclose(out, np.full((2, 3), np.exp(-0.5)),
                               rtol=1e-3)
    with pytest.raises(SystemExit):
        cli.main(["export", "model.keras", "base", "--import", "missing_x"])
    assert "argument --import: cannot import 'missing_x' " \
        "(ModuleNotFoundError" in capsys.readouterr().err


def test_cli_export_errors_name_the_argument(exported, tmp_path, capsys):
    from keras_node import cli

    model = tmp_path / "model.keras"
    small_classifier(0).save(model)
    with pytest.raises(SystemExit):
        cli.main(["export", str(model), str(exported[0]), "--version", "1"])
    error = capsys.readouterr().err
    assert error.startswith("usage: keras-node export ")  # the command's
    assert f"Version 1 already exists in {exported[0]}" in error
    with pytest.raises(SystemExit):
        cli.main(["export", str(model), str(model)])
    assert "argument `base_path`, expected a folder (or where to make one), " \
        f"not a file. Received: base_path='{model}'" in \
        capsys.readouterr().err
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(model.read_bytes()[:200])
    with pytest.raises(SystemExit):
        cli.main(["export", str(damaged), str(tmp_path / "base")])
    assert f"argument model: '{damaged}' does not load (" in \
        capsys.readouterr().err


def test_export_is_atomic(tmp_path, monkeypatch):
    # A kill during the export leaves no version folder, only a hidden one
    # that the next export replaces.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tf.saved_model, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        export_classifier(small_classifier(0), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []
    monkeypatch.undo()
    (tmp_path / ".1.partial").mkdir()  # as a kill mid-write leaves it
    assert export_classifier(small_classifier(0), tmp_path) == tmp_path / "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=4)
    | st.integers(min_value=-10**40, max_value=10**40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["instances", "inputs", "signature_name", "images",
                         "pixels", "x"]) | st.text(max_size=4),
        inner, max_size=3),
    max_leaves=40)
_BODIES = st.one_of(
    _JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=64),
    # Well-formed requests with bad values in them.
    st.builds(lambda name, value: json.dumps(
        {"signature_name": name, "instances": [value]}).encode(),
        st.sampled_from(["serving_default", "predict_pixels", ""]), _JSON))
_PATHS = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from([f"/v1/models/{NAME}", f"/v1/models/{NAME}/versions/",
                     f"/v1/models/{NAME}:", "/v1/models/", "/", "/healthz"]),
    st.text(max_size=12))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=_PATHS, body=_BODIES)
def test_fuzzed_requests_never_break_the_server(server, method, path, body):
    url, process = server
    rss_before = rss_mib(process.pid)
    connection = connect(url)
    connection.request(method, urllib.parse.quote(path, safe="/:"),
                       body if method != "GET" else None)
    response = connection.getresponse()
    payload = json.loads(response.read())  # always JSON
    assert response.status < 500, (response.status, payload)
    if response.status >= 400:
        assert isinstance(payload.get("error"), str)
    # The same connection, and the server, still answer a good request.
    connection.request("POST", f"/v1/models/{NAME}:predict",
                       json.dumps({"instances": images(1).tolist()}))
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())
    assert rss_mib(process.pid) < rss_before + 200
