"""An optional local REST endpoint with TensorFlow Serving's REST API shapes.

Other programs on the device can call the served model the way they would call TF Serving
(https://www.tensorflow.org/tfx/serving/api_rest)::

    GET  /v1/models/<name>[/versions/<v>]             model status
    GET  /v1/models/<name>[/versions/<v>]/metadata    inputs and outputs (signature_def)
    POST /v1/models/<name>[/versions/<v>]:predict     row ("instances") or columnar ("inputs")

``get_model()`` is called on every request, so a hot swap is picked up by the next request.
A request for another name (or another version) than the served model's is a 404.

Status body::

    {"model_version_status": [{"version": "1.2.0", "state": "AVAILABLE",
                               "status": {"error_code": "OK", "error_message": ""}}]}

Metadata body (TF Serving's shape; sizes are strings as in proto3 JSON, -1 is a dynamic dim;
a quantized tensor is listed as DT_FLOAT because the endpoint takes and returns floats)::

    {"model_spec": {"name": "linear", "signature_name": "", "version": "0.0.0"},
     "metadata": {"signature_def": {"signature_def": {"serving_default": {
         "inputs": {"x": {"name": "x", "dtype": "DT_FLOAT",
                          "tensor_shape": {"dim": [{"size": "-1"}, {"size": "4"}],
                                           "unknown_rank": false}}},
         "outputs": {...same shape...},
         "method_name": "tensorflow/serving/predict"}}}}}

Predict: values are read as float32 and cast to each input's dtype (quantized inputs stay float;
the runtime quantizes them). Row format: an instance is the input tensor without its batch dim,
or an object keyed by input name (required for multi-input models). Each instance runs as
batch 1, unless every input's batch dim is dynamic: then all instances run as one batched call.
A single-output model's predictions are its output rows; a multi-output model's are objects
keyed by output name. Columnar format: ``"inputs"`` is the whole tensor (batch dim included)
or an object keyed by input name; ``"outputs"`` mirrors it. ``"signature_name"`` may only be
``"serving_default"``.

Errors are ``{"error": "<one line>"}``: 400 bad JSON / shape / input, 404 unknown model or
path, 405 wrong method, 411 no Content-Length, 413 body over ``max_body``, 500 inference
failed, 503 no model to serve. Never a traceback. Requests are logged at DEBUG.

Thread safety: onnxruntime sessions may run concurrently, LiteRT interpreters may not. Every
``infer`` made here holds the runtime's ``infer_lock`` (``edge_agent.model.runtimes``: a lock per
runtime object, kept in a WeakKeyDictionary so it goes away with the runtime). Requests are
serialized with each other per model; the pipeline takes the same lock around its call.

The server binds to loopback only unless ``allow_remote=True``: it has no authentication.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import numpy as np

from edge_agent.errors import ConfigError, EdgeError, first_line
from edge_agent.model.loader import LoadedModel
from edge_agent.model.runtimes import TensorSpec, infer_lock

log = logging.getLogger(__name__)


_TF_DTYPES = {
    "float32": "DT_FLOAT",
    "float16": "DT_HALF",
    "float64": "DT_DOUBLE",
    "int64": "DT_INT64",
    "int32": "DT_INT32",
    "int8": "DT_INT8",
    "uint8": "DT_UINT8",
    "bool": "DT_BOOL",
}

_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|(?P<verb>:predict))?$"
)

_POLL_S = 0.05  # how often serve_forever checks for shutdown: bounds how long stop() takes
_SOCKET_TIMEOUT_S = 30.0  # a client that stalls mid-request frees its thread after this


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dims(shape: tuple[int | None, ...]) -> list[int]:
    return [-1 if d is None else d for d in shape]


def _signature(spec: TensorSpec) -> dict[str, Any]:
    dtype = "float32" if spec.quantized else spec.dtype
    return {
        "name": spec.name,
        "dtype": _TF_DTYPES.get(dtype, "DT_INVALID"),
        "tensor_shape": {
            "dim": [{"size": str(d)} for d in _dims(spec.shape)],
            "unknown_rank": False,
        },
    }


def _to_array(spec: TensorSpec, value: Any, *, batched: bool) -> np.ndarray:
    """A JSON value -> the input's array, shape-checked (without the batch dim unless batched)."""
    try:
        x = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _HttpError(
            400, f"input '{spec.name}': not a numeric tensor ({first_line(exc)})"
        ) from exc
    want = spec.shape if batched else spec.shape[1:]
    if x.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, x.shape)):
        what = "shape" if batched else "instance shape"
        raise _HttpError(
            400, f"input '{spec.name}': {what} {list(x.shape)} does not match {_dims(want)}"
        )
    if spec.quantized or spec.dtype == "float32":
        return x
    if spec.dtype not in _TF_DTYPES:
        raise _HttpError(400, f"input '{spec.name}': dtype {spec.dtype} is not supported here")
    return x.astype(spec.dtype)


def _named(specs: list[TensorSpec], value: Any, *, what: str) -> dict[str, Any]:
    """An instance / inputs value -> {input name: value}: keyed by name, or bare for one input."""
    names = [s.name for s in specs]
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise _HttpError(400, f"{what}: unknown input {unknown[0]!r}; model inputs: {names}")
        missing = [n for n in names if n not in value]
        if missing:
            raise _HttpError(400, f"{what}: missing input {missing[0]!r}; model inputs: {names}")
        return value
    if len(specs) != 1:
        raise _HttpError(400, f"{what}: the model has inputs {names}; key the values by name")
    return {names[0]: value}


class _Handler(BaseHTTPRequestHandler):
    server_version = "edge-agent-rest"
    timeout = _SOCKET_TIMEOUT_S

    @property
    def rest(self) -> RestServer:
        return cast("_Server", self.server).rest

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("rest %s: %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (bad request line, unsupported method) as JSON, too."""
        self.close_connection = True
        self._send(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _send(self, status: int, body: Mapping[str, Any], allow: str | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if allow:
                self.send_header("Allow", allow)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client went away; nothing to tell it
            self.close_connection = True

    def _dispatch(self, method: str) -> None:
        try:
            status, body = self._route(method)
            self._send(status, body)
        except _HttpError as exc:
            allow = "POST" if self.path.split("?")[0].endswith(":predict") else "GET"
            self._send(exc.status, {"error": exc.message}, allow if exc.status == 405 else None)
        except Exception:  # a bug here: logged with its traceback, never sent
            log.exception("rest: %s %s failed", method, self.path)
            self._send(500, {"error": "internal error; see the agent's log"})

    def _route(self, method: str) -> tuple[int, dict[str, Any]]:
        match = _ROUTE.match(unquote(urlsplit(self.path).path))
        if match is None:
            raise _HttpError(404, f"unknown path {self.path!r}; see /v1/models/<name>")
        wanted = "POST" if match["verb"] else "GET"
        if method != wanted:
            raise _HttpError(405, f"{method} is not allowed here; use {wanted}")
        body = self._read_body() if method == "POST" else b""
        model = self._model(match["name"], match["version"])
        if match["verb"]:
            return 200, _predict(model, body)
        if match["metadata"]:
            return 200, _metadata(model)
        return 200, {
            "model_version_status": [
                {
                    "version": model.version,
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise _HttpError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise _HttpError(400, f"bad Content-Length {length!r}")
        if n > self.rest.max_body:
            self.close_connection = True  # the unread body must not be parsed as a request
            raise _HttpError(413, f"body of {n} bytes is over the limit of {self.rest.max_body}")
        return self.rfile.read(n)

    def _model(self, name: str, version: str | None) -> LoadedModel:
        try:
            model = self.rest.get_model()
        except EdgeError as exc:
            raise _HttpError(503, f"no model is being served: {exc}") from exc
        if model is None:
            raise _HttpError(503, "no model is being served")
        if name != model.name:
            raise _HttpError(404, f"model {name!r} not found; serving {model.name!r}")
        if version is not None and version != model.version:
            raise _HttpError(
                404, f"model {name!r} version {version!r} not found; serving {model.version!r}"
            )
        return model


def _metadata(model: LoadedModel) -> dict[str, Any]:
    runtime = model.runtime
    signature = {
        "inputs": {s.name: _signature(s) for s in runtime.inputs},
        "outputs": {s.name: _signature(s) for s in runtime.outputs},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": model.name, "signature_name": "", "version": model.version},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    }


def _infer(model: LoadedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        with infer_lock(model.runtime):
            return model.runtime.infer(feeds)
    except EdgeError as exc:
        log.debug("rest: %s: %s", model.name, exc)
        raise _HttpError(500, str(exc)) from exc


def _predict(model: LoadedModel, body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HttpError(400, f"body is not valid JSON: {first_line(exc)}") from exc
    if not isinstance(request, dict):
        raise _HttpError(400, 'body must be a JSON object with "instances" or "inputs"')
    signature = request.get("signature_name", "serving_default")
    if signature != "serving_default":
        raise _HttpError(400, f"unknown signature_name {signature!r}; only 'serving_default'")
    if ("instances" in request) == ("inputs" in request):
        raise _HttpError(400, 'body must have exactly one of "instances" or "inputs"')
    inputs, outputs = model.runtime.inputs, model.runtime.outputs
    out_names = [s.name for s in outputs]

    if "inputs" in request:  # columnar: whole tensors, batch dim included
        values = _named(inputs, request["inputs"], what="inputs")
        feeds = {s.name: _to_array(s, values[s.name], batched=True) for s in inputs}
        outs = _infer(model, feeds)
        if len(outs) == 1:
            return {"outputs": outs[0].tolist()}
        return {"outputs": {n: o.tolist() for n, o in zip(out_names, outs)}}

    instances = request["instances"]
    if not isinstance(instances, list) or not instances:
        raise _HttpError(400, '"instances" must be a non-empty list')
    rows = []
    for i, instance in enumerate(instances):
        values = _named(inputs, instance, what=f"instance {i}")
        rows.append({s.name: _to_array(s, values[s.name], batched=False) for s in inputs})

    per_instance: list[list[np.ndarray]] = []
    if all(s.shape and s.shape[0] is None for s in inputs):  # dynamic batch: one call
        try:
            feeds = {s.name: np.stack([r[s.name] for r in rows]) for s in inputs}
        except ValueError as exc:
            raise _HttpError(400, "instances have different shapes") from exc
        outs = _infer(model, feeds)
        for name, out in zip(out_names, outs):
            if out.ndim == 0 or out.shape[0] != len(rows):
                raise _HttpError(
                    500, f"output '{name}' shape {list(out.shape)} has no batch of {len(rows)}"
                )
        per_instance = [[out[i] for out in outs] for i in range(len(rows))]
    else:  # fixed batch: each instance as batch 1
        for row in rows:
            outs = _infer(model, {name: x[None] for name, x in row.items()})
            per_instance.append([o[0] if o.ndim and o.shape[0] == 1 else o for o in outs])

    if len(out_names) == 1:
        return {"predictions": [p[0].tolist() for p in per_instance]}
    return {"predictions": [{n: o.tolist() for n, o in zip(out_names, p)} for p in per_instance]}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    rest: RestServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class RestServer:
    """A TF Serving-style REST endpoint for the model ``get_model()`` returns.

    ``start()`` serves from a daemon thread (``port=0`` picks a free port, see :attr:`port`);
    ``stop()`` is prompt and idempotent. A server is started at most once.
    """

    def __init__(
        self,
        get_model: Callable[[], LoadedModel],
        *,
        host: str = "127.0.0.1",
        port: int = 8501,
        max_body: int = 8 * 2**20,
        allow_remote: bool = False,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"rest: port = {port}: must be 0..65535 (0 picks a free port)")
        if max_body <= 0:
            raise ConfigError(f"rest: max_body = {max_body}: must be > 0")
        self.get_model = get_model
        self.host = host
        self.max_body = max_body
        self.allow_remote = allow_remote
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._state_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port listened on (the one picked when constructed with ``port=0``)."""
        return self._port

    def start(self) -> None:
        with self._state_lock:
            if self._started:
                raise RuntimeError("Cannot start a RestServer more than once.")
            if not self.allow_remote and not _is_loopback(self.host):
                raise ConfigError(
                    f"rest: host = {self.host!r} is not loopback and the endpoint has no "
                    "authentication; use 127.0.0.1 or pass allow_remote=True"
                )
            cls = _Server6 if ":" in self.host else _Server
            try:
                server = cls((self.host, self._port), _Handler)
            except OSError as exc:
                raise ConfigError(
                    f"rest: cannot listen on {self.host}:{self._port}: "
                    f"{exc.strerror or first_line(exc)}; pick another host or port"
                ) from exc
            server.rest = self
            self._server, self._started = server, True
            self._port = int(server.server_address[1])
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": _POLL_S},
                name="edge-agent-rest",
                daemon=True,
            )
            self._thread.start()
            log.info("rest: serving on http://%s:%d/v1/models/", self.host, self._port)

    def stop(self) -> None:
        with self._state_lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)


__all__ = ["RestServer"]
