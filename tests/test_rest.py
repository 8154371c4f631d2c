"""The REST endpoint against a real ONNX model on a real socket, with TF Serving's examples."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.errors import ConfigError
from edge_agent.model.loader import LoadedModel, load_model
from edge_agent.model.profiles import detect_host_profile
from edge_agent.rest import RestServer

W1 = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
W2 = -W1
B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def _linear(path: Path, w: np.ndarray) -> Path:
    """y = x @ W + b with x [N, 4] (dynamic batch)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(B, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _load(path: Path, state: Path) -> LoadedModel:
    return load_model(path, profile=detect_host_profile(), state_dir=state)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoadedModel, LoadedModel]]:
    root = tmp_path_factory.mktemp("rest")
    first = _load(_linear(root / "linear.onnx", W1), root)
    (root / "v2").mkdir()
    second = _load(_linear(root / "v2" / "linear.onnx", W2), root)
    yield first, second
    first.close()
    second.close()


@pytest.fixture(scope="module")
def served(models: tuple[LoadedModel, LoadedModel]) -> Iterator[tuple[str, dict[str, bool]]]:
    """A server on a free port; flip ``swap["on"]`` to serve the second model."""
    swap = {"on": False}
    server = RestServer(lambda: models[1] if swap["on"] else models[0], port=0, max_body=4096)
    server.start()
    yield f"http://127.0.0.1:{server.port}", swap
    server.stop()
    server.stop()  # idempotent


def call(url: str, body: Any = None, *, method: str | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def expected(x: Any, w: np.ndarray = W1) -> np.ndarray:
    return np.asarray(x, np.float32) @ w + B


def test_row_format_predicts_like_numpy(served: tuple[str, dict[str, bool]]) -> None:
    base, _ = served
    x = [[1, 2, 3, 4], [5, 6, 7, 8]]
    status, body = call(f"{base}/v1/models/linear:predict", {"instances": x})
    assert status == 200
    np.testing.assert_allclose(body["predictions"], expected(x), rtol=1e-5)
    status, body = call(
        f"{base}/v1/models/linear/versions/0.0.0:predict",
        {"signature_name": "serving_default", "instances": [{"x": [1, 0, 0, 1]}]},
    )
    assert status == 200
    np.testing.assert_allclose(body["predictions"], expected([[1, 0, 0, 1]]), rtol=1e-5)


def test_columnar_format(served: tuple[str, dict[str, bool]]) -> None:
    base, _ = served
    x = [[0.5, -1, 2, 3]]
    status, body = call(f"{base}/v1/models/linear:predict", {"inputs": x})
    assert status == 200
    np.testing.assert_allclose(body["outputs"], expected(x), rtol=1e-5)
    status, body = call(f"{base}/v1/models/linear:predict", {"inputs": {"x": x}})
    assert status == 200
    np.testing.assert_allclose(body["outputs"], expected(x), rtol=1e-5)


def test_status_and_metadata(served: tuple[str, dict[str, bool]]) -> None:
    base, _ = served
    status, body = call(f"{base}/v1/models/linear")
    assert status == 200
    assert body == {
        "model_version_status": [
            {
                "version": "0.0.0",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    status, body = call(f"{base}/v1/models/linear/metadata")
    assert status == 200
    assert body["model_spec"]["name"] == "linear"
    sig = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert sig["inputs"]["x"]["tensor_shape"]["dim"] == [{"size": "-1"}, {"size": "4"}]
    assert sig["outputs"]["y"]["tensor_shape"]["dim"] == [{"size": "-1"}, {"size": "3"}]


@pytest.mark.parametrize(
    ("path", "body", "method", "code", "words"),
    [
        ("/v1/models/other", None, None, 404, "not found"),
        ("/v1/models/linear/versions/9:predict", {"instances": [[1, 2, 3, 4]]}, None, 404, "9"),
        ("/v2/nothing", None, None, 404, "unknown path"),
        ("/v1/models/linear:predict", b"{not json", None, 400, "JSON"),
        ("/v1/models/linear:predict", {"instances": [[1, 2, 3]]}, None, 400, "[3]"),
        ("/v1/models/linear:predict", {"instances": [[1, 2], [1, 2, 3, 4]]}, None, 400, "shape"),
        ("/v1/models/linear:predict", {"inputs": [1, 2, 3, 4]}, None, 400, "[-1, 4]"),
        ("/v1/models/linear:predict", {"instances": [{"z": [1, 2, 3, 4]}]}, None, 400, "'z'"),
        ("/v1/models/linear:predict", {"instances": [["a", 2, 3, 4]]}, None, 400, "numeric"),
        ("/v1/models/linear:predict", {"instances": []}, None, 400, "non-empty"),
        ("/v1/models/linear:predict", {"signature_name": "s", "inputs": []}, None, 400, "'s'"),
        ("/v1/models/linear:predict", {"instances": [[0.0] * 4] * 400}, None, 413, "limit"),
        ("/v1/models/linear:predict", None, "GET", 405, "POST"),
        ("/v1/models/linear", b"{}", "POST", 405, "GET"),
    ],
)
def test_errors_are_tf_serving_style(
    served: tuple[str, dict[str, bool]],
    path: str,
    body: Any,
    method: str | None,
    code: int,
    words: str,
) -> None:
    base, _ = served
    status, reply = call(base + path, body, method=method)
    assert status == code
    assert set(reply) == {"error"}
    assert words in reply["error"]
    assert "Traceback" not in reply["error"]


def test_hot_swap_is_picked_up(served: tuple[str, dict[str, bool]]) -> None:
    base, swap = served
    x = [[1, 2, 3, 4]]
    url = f"{base}/v1/models/linear:predict"
    try:
        swap["on"] = True
        _, body = call(url, {"instances": x})
        np.testing.assert_allclose(body["predictions"], expected(x, W2), rtol=1e-5)
    finally:
        swap["on"] = False
    _, body = call(url, {"instances": x})
    np.testing.assert_allclose(body["predictions"], expected(x, W1), rtol=1e-5)


def test_remote_host_needs_allow_remote(models: tuple[LoadedModel, LoadedModel]) -> None:
    server = RestServer(lambda: models[0], host="0.0.0.0", port=0)
    with pytest.raises(ConfigError, match="allow_remote"):
        server.start()
    server.stop()  # never started: a no-op


def test_stop_closes_the_port(models: tuple[LoadedModel, LoadedModel]) -> None:
    server = RestServer(lambda: models[0], port=0)
    server.start()
    url = f"http://127.0.0.1:{server.port}/v1/models/linear"
    assert call(url)[0] == 200
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
