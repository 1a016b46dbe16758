"""A local server that speaks TF Serving's REST API, for SavedModels.

    keras-node serve --model-base-path runs/mnist/saved_model --model-name mnist

Serves the version folders (`<base>/<N>/`, N a positive integer in ASCII
digits) under one model name with the routes and JSON of TensorFlow
Serving's REST API, so that clients written for TF Serving work unchanged:

- `GET  /v1/models/<name>[/versions/<N>]`: version status (a version that
  failed to load is listed with TF Serving's state `END` and its error);
- `GET  /v1/models/<name>[/versions/<N>]/metadata`: the signatures;
- `POST /v1/models/<name>[/versions/<N>]:predict`: `{"instances": [...]}`
  (row format) or `{"inputs": ...}` (columnar), optional `signature_name`;
  the answer is `{"predictions": [...]}` (one object of named outputs per
  instance) or `{"outputs": {...}}`, and, as TF Serving's, holds a lone
  output's values without its name;
- `GET  /healthz`: liveness, with the loaded versions.

Without a version, requests go to the newest. A background thread looks for
new version folders every `poll_seconds` and loads them while the server
goes on answering; a folder that fails to load is tried again when anything
in it changes. Every malformed request gets a 4xx with TF Serving's
`{"error": "..."}` body, and any unexpected error a 500 with one, on a
connection that stays usable. What one client can cost is bounded: request
bodies (`max_body_bytes`, 413 before reading them; what a client sends on
for another second is dropped, so that it gets the 413), the time to send one
(`request_timeout`, 408), instances per request (`max_instances`), and
concurrent model runs (`max_concurrent_runs`; a request that waits longer
than `queue_timeout` for one gets 503 with `Retry-After`). JSON parsing,
validation and model runs happen off the event loop, so `/healthz` answers
whatever the other requests do. No request string ever becomes part of a
file path.
"""

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import threading

import fastapi
import numpy as np
import starlette.concurrency
import starlette.exceptions
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from keras_node import serving

logger = logging.getLogger("keras_node.server")

# The deepest nesting a request may have: instances of rank 8 and change.
_MAX_DEPTH = 12
_VERSION = re.compile(r"[0-9]{1,18}")


class _RequestError(Exception):
    status = 400
    headers = None


class _NotFound(_RequestError):
    status = 404


class _TooLarge(_RequestError):
    status = 413
    headers = {"Connection": "close"}


class _Timeout(_RequestError):
    status = 408
    headers = {"Connection": "close"}


class _Busy(_RequestError):
    status = 503
    headers = {"Retry-After": "1"}


class ModelVersions:
    """The loaded versions of one model, refreshed from its base folder.

    `refresh` loads what appeared or changed; `start` runs it every
    `poll_seconds` in a background thread, so that requests never wait for
    a load: a new version is switched in when it is ready.
    """

    def __init__(self, base_path, poll_seconds=2.0):
        self.base_path = base_path
        self.poll_seconds = poll_seconds
        self._loaded = {}
        self._failed = {}  # version: (fingerprint of the folder, error)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.refresh()
        if not self._loaded:
            failed = "; ".join(f"version {v}: {error}" for v, (_, error)
                               in sorted(self._failed.items()))
            raise FileNotFoundError(
                f"No SavedModel version folder (a positive integer, such as "
                f"{base_path}/1) in --model-base-path {base_path}"
                + (f" could be loaded ({failed})." if failed else "."))

    def refresh(self):
        """Loads version folders that appeared, or that failed and changed.

        Publish a version by moving a complete folder into place (as for TF
        Serving); a folder written in place is retried until it loads.
        """
        for version, path in sorted(
                serving.version_folders(self.base_path).items()):
            if version in self._loaded:
                continue
            stamp = _fingerprint(path)
            if stamp is None or self._failed.get(version, (None,))[0] == stamp:
                continue
            try:
                loaded = tf.saved_model.load(str(path))
            except Exception as error:  # a broken folder must not stop serving
                self._failed[version] = (stamp, _first_line(error))
                logger.warning("Could not load version %d: %s", version,
                               _first_line(error))
                continue
            with self._lock:
                self._loaded[version] = loaded
                self._failed.pop(version, None)
            logger.info("Loaded version %d from %s", version, path)

    def start(self):
        """Refreshes every `poll_seconds` in a daemon thread until `stop`."""
        def poll():
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.refresh()
                except Exception:  # keep polling whatever the disk does
                    logger.exception("Looking for new versions failed")

        threading.Thread(target=poll, name="version-poller",
                         daemon=True).start()

    def stop(self):
        self._stop.set()

    def get(self, version=None):
        """`(version, loaded SavedModel)`, the newest when `version` is None."""
        with self._lock:
            if version is None:
                version = max(self._loaded)
            if version not in self._loaded:
                raise _NotFound(
                    f"Servable not found for request: Specific({version})")
            return version, self._loaded[version]

    def versions(self):
        with self._lock:
            return sorted(self._loaded)

    def status(self, version=None):
        """TF Serving's `model_version_status` entries."""
        with self._lock:
            states = {v: ("AVAILABLE", "OK", "") for v in self._loaded}
            for v, (_, error) in self._failed.items():
                states.setdefault(v, ("END", "UNKNOWN", error))
        if version is not None:
            if version not in states:
                raise _NotFound(
                    f"Servable not found for request: Specific({version})")
            states = {version: states[version]}
        return [{"version": str(v), "state": state,
                 "status": {"error_code": code, "error_message": message}}
                for v, (state, code, message) in sorted(states.items())]


async def _linger(stream, seconds=1.0):
    """Reads and drops what `stream` (a body refused with 413) brings for up
    to `seconds`, as web servers' lingering close: the connection then
    closes, and bytes left unread would make the kernel reset it, which can
    discard the 413 before the client reads it."""
    async def drain():
        async for _ in stream:
            pass

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drain(), seconds)


def idle_timeout_protocol():
    """uvicorn's HTTP/1.1 protocol, closing connections that send nothing.

    uvicorn (checked with 0.54) closes an idle keep-alive connection only
    after a first response; a client that connects and stays silent would
    hold its connection forever. This subclass starts the same timer
    (`timeout_keep_alive`) when the connection opens; the first bytes cancel
    it, as they do after a response.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class IdleTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

    return IdleTimeoutH11Protocol


def _fingerprint(path):
    """What identifies a version folder's contents: every file's relative
    path, size and modification time; None without a `saved_model.pb`."""
    if not (path / "saved_model.pb").exists():
        return None
    entries = []
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:
                continue  # removed while we looked
            entries.append((os.path.relpath(os.path.join(folder, name), path),
                            stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def _first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]


def _signature_metadata(signature):
    def tensor_info(spec):
        shape = ({"unknown_rank": True} if spec.shape.rank is None else
                 {"dim": [{"size": str(-1 if d is None else d)}
                          for d in spec.shape]})
        return {"dtype": types_pb2.DataType.Name(spec.dtype.as_datatype_enum),
                "tensor_shape": shape, "name": spec.name}

    _, inputs = signature.structured_input_signature
    return {
        "inputs": {k: tensor_info(v) for k, v in inputs.items()},
        "outputs": {k: tensor_info(v)
                    for k, v in signature.structured_outputs.items()},
        "method_name": serving.PREDICT_METHOD,
    }


def _parse_json(data):
    try:
        return json.loads(data)
    except RecursionError:
        raise _RequestError("JSON Parse error: the document nests too deep")
    except (ValueError, UnicodeDecodeError) as error:
        raise _RequestError(f"JSON Parse error: {error}")


def _check_names(names, specs):
    unknown = set(names) - set(specs)
    if unknown:
        raise _RequestError(f"Unknown input(s) {sorted(map(str, unknown))}; "
                            f"the signature takes {sorted(specs)}")


def _parse_inputs(body, signature, max_instances):
    """Named input arrays and whether the request used the row format."""
    _, specs = signature.structured_input_signature
    if ("instances" in body) == ("inputs" in body):
        raise _RequestError('Missing \'instances\' or \'inputs\' key (exactly '
                            'one of them is needed)')
    row = "instances" in body
    if row:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise _RequestError("'instances' must be a non-empty list")
        if all(isinstance(i, dict) for i in instances):
            _check_names(set().union(*instances), specs)
            for index, instance in enumerate(instances):
                for name in specs:
                    if name not in instance:
                        raise _RequestError(
                            f"Missing input '{name}' in instance {index}")
            columns = {name: [i[name] for i in instances] for name in specs}
        elif len(specs) == 1:
            columns = {next(iter(specs)): instances}
        else:
            raise _RequestError(
                "instances must be objects keyed by input name")
    else:
        inputs = body["inputs"]
        if isinstance(inputs, dict):
            columns = inputs
        elif len(specs) == 1:
            columns = {next(iter(specs)): inputs}
        else:
            raise _RequestError(
                "'inputs' must be an object keyed by input name")
    _check_names(columns, specs)
    arrays = {}
    for name, spec in specs.items():
        if name not in columns:
            raise _RequestError(f"Missing input '{name}'")
        arrays[name] = _to_array(name, columns[name], spec, max_instances)
    return arrays, row


def _check_numbers(name, value, spec):
    """Raises unless `value` is a nested list of JSON numbers, integers for
    an integer `spec`.

    Strings (`"0.5"`), booleans and nulls are refused, as TF Serving does;
    so are fractions for an integer input (`1.0` too, as TF Serving), and
    nesting deeper than any signature needs. Iterative, so no request can
    exhaust the stack.
    """
    numbers = int if spec.dtype.is_integer else (int, float)
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= _MAX_DEPTH:
                raise _RequestError(f"Input '{name}' nests deeper than "
                                    f"{_MAX_DEPTH} levels")
            stack.extend((x, depth + 1) for x in item)
        elif isinstance(item, bool) or not isinstance(item, numbers):
            if isinstance(item, float):
                raise _integers_error(name, spec)
            raise _RequestError(
                f"Input '{name}' must be a (nested) list of numbers of one "
                f"shape; it holds {type(item).__name__} {str(item)[:40]!r}")


def _integers_error(name, spec):
    info = np.iinfo(spec.dtype.as_numpy_dtype)
    return _RequestError(f"Input '{name}' must hold integers in [{info.min}, "
                         f"{info.max}] ({spec.dtype.name})")


def _to_array(name, value, spec, max_instances):
    dtype = spec.dtype.as_numpy_dtype
    _check_numbers(name, value, spec)
    try:
        # Integers as int64: through float64, beyond 2**53 they would round.
        array = np.asarray(
            value, dtype=np.int64 if spec.dtype.is_integer else np.float64)
    except OverflowError:
        if spec.dtype.is_integer:
            raise _integers_error(name, spec)
        raise _RequestError(f"Input '{name}' holds a number too large for "
                            f"{spec.dtype.name}")
    except (TypeError, ValueError):
        raise _RequestError(f"Input '{name}' must be a (nested) list of "
                            "numbers of one shape")
    if array.ndim == 0 or array.shape[0] > max_instances:
        raise _RequestError(
            f"Input '{name}' holds {array.shape[0] if array.ndim else 0} "
            f"instances; this server takes 1 to {max_instances} per request")
    expected = spec.shape[1:]
    if not expected.is_compatible_with(array.shape[1:]):
        raise _RequestError(
            f"Input '{name}' has instance shape {list(array.shape[1:])}, "
            f"expected {expected.as_list()}")
    if not np.all(np.isfinite(array)):
        raise _RequestError(f"Input '{name}' holds a non-finite number")
    if spec.dtype.is_integer:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise _integers_error(name, spec)
    elif np.issubdtype(dtype, np.floating):
        if np.max(np.abs(array)) > np.finfo(dtype).max:
            raise _RequestError(
                f"Input '{name}' holds a number beyond the range of "
                f"{spec.dtype.name} (+-{np.finfo(dtype).max:.4g})")
    return array.astype(dtype)


def _run_signature(signature, arrays):
    """The signature's outputs as lists; 400 if it cannot compute them."""
    try:
        outputs = signature(**{k: tf.constant(v) for k, v in arrays.items()})
    except (tf.errors.InvalidArgumentError, ValueError) as error:
        # The model cannot compute this input (a solve that fails on it).
        raise _RequestError(f"The model failed on this input: "
                            f"{_first_line(error)}")
    outputs = {k: v.numpy() for k, v in outputs.items()}
    for name, value in sorted(outputs.items()):  # the same name each time
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise _RequestError(
                f"The model failed on this input: its output '{name}' holds "
                "NaN or inf (inputs far outside the range it was trained on?)")
    return {k: v.tolist() for k, v in outputs.items()}


MODEL_NAME = "a name without '/' or ':' (it is part of the URLs)"


def is_model_name(name):
    """Whether `name` is `MODEL_NAME`: one that URLs can reach."""
    return isinstance(name, str) and bool(name) and "/" not in name \
        and ":" not in name


# The options of `create_app` that count things; the others are seconds.
COUNTS = ("max_instances", "max_body_bytes", "max_concurrent_runs")


def option_problem(name, value):
    """What `create_app`'s option `name` expects if `value` is not that,
    else None."""
    integral = name in COUNTS
    if (not isinstance(value, bool)
            and isinstance(value, int if integral else (int, float))
            and value > 0 and math.isfinite(value)):
        return None
    return "a positive integer" if integral else "a positive number of seconds"


def _check_options(options):
    """Raises ValueError in the house format for impossible server options."""
    for name, value in options.items():
        expected = option_problem(name, value)
        if expected:
            raise ValueError(
                f"Received an invalid value for argument `{name}`, expected "
                f"{expected}. Received: {name}={value!r}")


def create_app(base_path, model_name, poll_seconds=2.0, max_instances=256,
               max_body_bytes=16 * 2**20, max_concurrent_runs=2,
               queue_timeout=10.0, request_timeout=30.0):
    """The FastAPI application serving `base_path` as `model_name`.

    Args:
        base_path: the folder of version folders `<N>/`.
        model_name: the name in the URLs, a non-empty str without `/` or
            `:`.
        poll_seconds: how often to look for new versions.
        max_instances: the most instances in one request.
        max_body_bytes: the largest request body; larger ones get 413 before
            they are read.
        max_concurrent_runs: the most model runs at once.
        queue_timeout: seconds a request may wait for a model run before it
            gets 503 with `Retry-After`.
        request_timeout: seconds a client may take to send its body (408).
    """
    if not is_model_name(model_name):
        raise ValueError(
            "Received an invalid value for argument `model_name`, expected "
            f"{MODEL_NAME}. Received: model_name={model_name!r}")
    _check_options(dict(
        poll_seconds=poll_seconds, max_instances=max_instances,
        max_body_bytes=max_body_bytes,
        max_concurrent_runs=max_concurrent_runs,
        queue_timeout=queue_timeout, request_timeout=request_timeout))
    versions = ModelVersions(base_path, poll_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        versions.start()
        yield
        versions.stop()

    # No redirects (Starlette's default for `/healthz/`): every answer is
    # JSON, an unknown path TF Serving's 404.
    app = fastapi.FastAPI(title="keras-node model server", lifespan=lifespan,
                          redirect_slashes=False)
    app.state.versions = versions
    runs = asyncio.Semaphore(max_concurrent_runs)

    def answer(status, payload, headers=None):
        return fastapi.responses.JSONResponse(payload, status_code=status,
                                              headers=headers)

    @app.exception_handler(starlette.exceptions.HTTPException)
    async def http_error(request, error):
        # Unknown routes and methods, in TF Serving's format.
        return answer(error.status_code, {"error": str(error.detail)},
                      getattr(error, "headers", None))

    @app.middleware("http")
    async def internal_error(request, call_next):
        try:
            return await call_next(request)
        except Exception as error:  # a bug: answer, and keep the connection
            logger.exception("Unexpected error on %s %s", request.method,
                             request.url.path)
            return answer(500, {"error": f"Internal error: "
                                         f"{type(error).__name__}"})

    def resolve(path):
        """`(version or None, action, metadata)` from after /v1/models/."""
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
            if len(parts) < 2 or not _VERSION.fullmatch(parts[1]):
                raise _NotFound(f"Malformed version in {path[:100]!r}")
            version = int(parts[1])
            parts = parts[2:]
        if parts not in ([], ["metadata"]):
            raise _NotFound(f"Unknown resource {path[:100]!r}")
        return version, action, bool(parts)

    async def read_body(request):
        """The body, at most `max_body_bytes`, sent within the timeout."""
        stream = request.stream()
        length = request.headers.get("content-length", "")
        if length.isascii() and length.isdigit() \
                and int(length) > max_body_bytes:
            # A client that waits for "100 Continue" has sent no body yet;
            # reading would ask it for one.
            if request.headers.get("expect", "").lower() != "100-continue":
                await _linger(stream)
            raise _TooLarge(f"Request body of {length} bytes; this server "
                            f"takes at most {max_body_bytes}")

        async def read():  # None past `max_body_bytes`
            chunks, size = [], 0
            async for chunk in stream:
                size += len(chunk)
                if size > max_body_bytes:
                    return None
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(read(), request_timeout)
        except asyncio.TimeoutError:
            raise _Timeout(f"The request body took longer than "
                           f"{request_timeout} s to arrive")
        if body is None:
            await _linger(stream)
            raise _TooLarge(f"Request body over {max_body_bytes} bytes, the "
                            "most this server takes")
        return body

    async def run(signature, arrays):
        """Runs the signature in a worker thread, at most a few at once."""
        try:
            await asyncio.wait_for(runs.acquire(), queue_timeout)
        except asyncio.TimeoutError:
            raise _Busy(f"All {max_concurrent_runs} model runs are busy; "
                        f"retry later")
        try:
            return await starlette.concurrency.run_in_threadpool(
                _run_signature, signature, arrays)
        finally:
            runs.release()

    @app.get("/healthz")
    def health():
        return {"status": "ok", "model": model_name,
                "versions": versions.versions()}

    @app.get("/v1/models/{path:path}")
    def status_or_metadata(path: str):
        try:
            version, action, metadata = resolve(path)
            if action:
                raise _NotFound(f"Unknown resource {path[:100]!r}")
            if metadata:
                version, loaded = versions.get(version)
                return {
                    "model_spec": {"name": model_name, "signature_name": "",
                                   "version": str(version)},
                    "metadata": {"signature_def": {"signature_def": {
                        key: _signature_metadata(sig)
                        for key, sig in loaded.signatures.items()}}},
                }
            return {"model_version_status": versions.status(version)}
        except _RequestError as error:
            return answer(error.status, {"error": str(error)}, error.headers)

    @app.post("/v1/models/{path:path}")
    async def predict(path: str, request: fastapi.Request):
        try:
            version, action, metadata = resolve(path)
            if action != "predict" or metadata:
                raise _NotFound(f"Unknown resource {path[:100]!r}")
            data = await read_body(request)
            body = await starlette.concurrency.run_in_threadpool(
                _parse_json, data)
            if not isinstance(body, dict):
                raise _RequestError(
                    "JSON Value: the request body must be an object")
            version, loaded = versions.get(version)
            name = body.get("signature_name", "serving_default")
            if not isinstance(name, str):
                raise _RequestError("'signature_name' must be a string")
            name = name or "serving_default"
            if name not in loaded.signatures:
                raise _RequestError(
                    f"Serving signature name: \"{name[:100]}\" not found in "
                    f"signature def; available: {sorted(loaded.signatures)}")
            signature = loaded.signatures[name]
            arrays, row = await starlette.concurrency.run_in_threadpool(
                _parse_inputs, body, signature, max_instances)
            outputs = await run(signature, arrays)
        except _RequestError as error:
            return answer(error.status, {"error": str(error)}, error.headers)
        if len(outputs) == 1:  # TF Serving leaves out a lone output's name
            (values,) = outputs.values()
            return {"predictions" if row else "outputs": values}
        if not row:
            return {"outputs": outputs}
        count = len(next(iter(outputs.values())))
        return {"predictions": [{k: v[i] for k, v in outputs.items()}
                                for i in range(count)]}

    return app
