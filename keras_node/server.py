"""A local server that speaks TF Serving's REST API, for SavedModels.

    keras-node serve --model-base-path runs/mnist/saved_model --model-name mnist

Serves the version folders (`<base>/<N>/`, N a positive integer) under one
model name with the routes and JSON of TensorFlow Serving's REST API, so that
clients written for TF Serving work unchanged:

- `GET  /v1/models/<name>[/versions/<N>]`: version status;
- `GET  /v1/models/<name>[/versions/<N>]/metadata`: the signatures;
- `POST /v1/models/<name>[/versions/<N>]:predict`: `{"instances": [...]}`
  (row format) or `{"inputs": ...}` (columnar), optional `signature_name`;
- `GET  /healthz`: liveness, with the loaded versions.

Without a version, requests go to the newest. New version folders are picked
up while it runs (checked every `poll_seconds`). Bad requests get HTTP 400
with `{"error": "..."}` as TF Serving answers, unknown models and versions
404; no request string ever becomes part of a file path.
"""

import json
import logging
import threading
import time

import fastapi
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from keras_node import serving

logger = logging.getLogger("keras_node.server")


class _BadRequest(Exception):
    status = 400


class _NotFound(Exception):
    status = 404


class ModelVersions:
    """The loaded versions of one model, refreshed from its base folder."""

    def __init__(self, base_path, poll_seconds=2.0):
        self.base_path = base_path
        self.poll_seconds = poll_seconds
        self._loaded = {}
        self._failed = {}  # version: modification time of the failed try
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._checked = 0.0
        self.refresh()
        if not self._loaded:
            raise FileNotFoundError(
                f"No SavedModel version folder (a positive integer, such as "
                f"{base_path}/1) in --model-base-path {base_path}.")

    def refresh(self):
        """Loads version folders that appeared since the last check.

        Publish a version by moving a complete folder into place (as for TF
        Serving); a folder that fails to load is tried again once it changes.
        Loading happens outside the lock, so requests go on meanwhile.
        """
        if not self._refreshing.acquire(blocking=False):
            return  # another thread is at it
        try:
            self._checked = time.monotonic()
            for version, path in sorted(
                    serving.version_folders(self.base_path).items()):
                graph = path / "saved_model.pb"
                if version in self._loaded or not graph.exists():
                    continue
                stamp = graph.stat().st_mtime
                if self._failed.get(version) == stamp:
                    continue
                try:
                    loaded = tf.saved_model.load(str(path))
                except Exception:  # a broken folder must not stop serving
                    self._failed[version] = stamp
                    logger.exception("Could not load version %d", version)
                    continue
                with self._lock:
                    self._loaded[version] = loaded
                self._failed.pop(version, None)
                logger.info("Loaded version %d from %s", version, path)
        finally:
            self._refreshing.release()

    def _poll(self):
        if time.monotonic() - self._checked > self.poll_seconds:
            self.refresh()

    def get(self, version=None):
        """`(version, loaded SavedModel)`, the newest when `version` is None."""
        self._poll()
        with self._lock:
            if version is None:
                version = max(self._loaded)
            if version not in self._loaded:
                raise _NotFound(
                    f"Servable not found for request: Specific({version})")
            return version, self._loaded[version]

    def versions(self):
        self._poll()
        with self._lock:
            return sorted(self._loaded)


def _signature_metadata(signature):
    def tensor_info(spec):
        dims = [{"size": str(-1 if d is None else d)} for d in spec.shape]
        return {"dtype": types_pb2.DataType.Name(spec.dtype.as_datatype_enum),
                "tensor_shape": {"dim": dims}, "name": spec.name}

    _, inputs = signature.structured_input_signature
    return {
        "inputs": {k: tensor_info(v) for k, v in inputs.items()},
        "outputs": {k: tensor_info(v)
                    for k, v in signature.structured_outputs.items()},
        "method_name": serving.PREDICT_METHOD,
    }


def _parse_inputs(body, signature, max_instances):
    """Named input arrays and whether the request used the row format."""
    _, specs = signature.structured_input_signature
    if not isinstance(body, dict):
        raise _BadRequest("JSON Value: the request body must be an object")
    if ("instances" in body) == ("inputs" in body):
        raise _BadRequest('Missing \'instances\' or \'inputs\' key (exactly '
                          'one of them is needed)')
    row = "instances" in body
    if row:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise _BadRequest("'instances' must be a non-empty list")
        if all(isinstance(i, dict) for i in instances):
            columns = {name: [i.get(name) for i in instances]
                       for name in specs}
        elif len(specs) == 1:
            columns = {next(iter(specs)): instances}
        else:
            raise _BadRequest("instances must be objects keyed by input name")
    else:
        inputs = body["inputs"]
        if isinstance(inputs, dict):
            columns = inputs
        elif len(specs) == 1:
            columns = {next(iter(specs)): inputs}
        else:
            raise _BadRequest("'inputs' must be an object keyed by input name")
    unknown = set(columns) - set(specs)
    if unknown:
        raise _BadRequest(f"Unknown input(s) {sorted(unknown)}; the "
                          f"signature takes {sorted(specs)}")
    arrays = {}
    for name, spec in specs.items():
        if name not in columns:
            raise _BadRequest(f"Missing input '{name}'")
        arrays[name] = _to_array(name, columns[name], spec, max_instances)
    return arrays, row


def _to_array(name, value, spec, max_instances):
    dtype = spec.dtype.as_numpy_dtype
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _BadRequest(f"Input '{name}' must be a (nested) list of "
                          "numbers of one shape")
    if array.ndim == 0 or array.shape[0] > max_instances:
        raise _BadRequest(
            f"Input '{name}' holds {array.shape[0] if array.ndim else 0} "
            f"instances; this server takes 1 to {max_instances} per request")
    expected = spec.shape[1:]
    if not expected.is_compatible_with(array.shape[1:]):
        raise _BadRequest(
            f"Input '{name}' has instance shape {list(array.shape[1:])}, "
            f"expected {expected.as_list()}")
    if not np.all(np.isfinite(array)):
        raise _BadRequest(f"Input '{name}' holds a non-finite number")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if np.any(array != np.round(array)) or array.min() < info.min \
                or array.max() > info.max:
            raise _BadRequest(
                f"Input '{name}' must hold integers in [{info.min}, "
                f"{info.max}] ({spec.dtype.name})")
    return array.astype(dtype)


def create_app(base_path, model_name, poll_seconds=2.0, max_instances=256):
    """The FastAPI application serving `base_path` as `model_name`."""
    versions = ModelVersions(base_path, poll_seconds)
    app = fastapi.FastAPI(title="keras-node model server")
    app.state.versions = versions

    def answer(status, payload):
        return fastapi.responses.JSONResponse(payload, status_code=status)

    def resolve(path):
        """`(version or None, action)` from the part after /v1/models/."""
        name, _, rest = path.partition("/")
        action = ""
        if ":" in (rest or name):
            if rest:
                rest, _, action = rest.partition(":")
            else:
                name, _, action = name.partition(":")
        if name != model_name:
            raise _NotFound(f"Servable not found for request: Latest({name})")
        parts = [p for p in rest.split("/") if p]
        version = None
        if parts[:1] == ["versions"]:
            if len(parts) < 2 or not parts[1].isdigit():
                raise _NotFound(f"Malformed version in {path!r}")
            version = int(parts[1])
            parts = parts[2:]
        if parts not in ([], ["metadata"]):
            raise _NotFound(f"Unknown resource {path!r}")
        return version, action, bool(parts)

    @app.get("/healthz")
    def health():
        return {"status": "ok", "model": model_name,
                "versions": versions.versions()}

    @app.get("/v1/models/{path:path}")
    def status_or_metadata(path: str):
        try:
            version, action, metadata = resolve(path)
            if action:
                raise _NotFound(f"Unknown resource {path!r}")
            if metadata:
                version, loaded = versions.get(version)
                return {
                    "model_spec": {"name": model_name, "signature_name": "",
                                   "version": str(version)},
                    "metadata": {"signature_def": {"signature_def": {
                        key: _signature_metadata(sig)
                        for key, sig in loaded.signatures.items()}}},
                }
            shown = versions.versions() if version is None else [
                versions.get(version)[0]]
            return {"model_version_status": [
                {"version": str(v), "state": "AVAILABLE",
                 "status": {"error_code": "OK", "error_message": ""}}
                for v in shown]}
        except (_BadRequest, _NotFound) as error:
            return answer(error.status, {"error": str(error)})

    @app.post("/v1/models/{path:path}")
    async def predict(path: str, request: fastapi.Request):
        try:
            version, action, metadata = resolve(path)
            if action != "predict" or metadata:
                raise _NotFound(f"Unknown resource {path!r}")
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as error:
                raise _BadRequest(f"JSON Parse error: {error}")
            version, loaded = versions.get(version)
            name = (body.get("signature_name") or "serving_default"
                    if isinstance(body, dict) else "serving_default")
            if name not in loaded.signatures:
                raise _BadRequest(
                    f"Serving signature name: \"{name}\" not found in "
                    f"signature def; available: {sorted(loaded.signatures)}")
            signature = loaded.signatures[name]
            arrays, row = _parse_inputs(body, signature, max_instances)
            outputs = await _run(signature, arrays)
        except (_BadRequest, _NotFound) as error:
            return answer(error.status, {"error": str(error)})
        outputs = {k: v.numpy().tolist() for k, v in outputs.items()}
        if not row:
            return {"outputs": outputs}
        count = len(next(iter(outputs.values())))
        return {"predictions": [{k: v[i] for k, v in outputs.items()}
                                for i in range(count)]}

    return app


async def _run(signature, arrays):
    """Runs the signature off the event loop (TF releases the GIL)."""
    import starlette.concurrency

    return await starlette.concurrency.run_in_threadpool(
        lambda: signature(**{k: tf.constant(v) for k, v in arrays.items()}))
