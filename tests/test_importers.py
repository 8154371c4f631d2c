"""converters.importers: real models in, checked ONNX out (no mocks)."""

from __future__ import annotations

import importlib.util
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from converters.importers import detect_kind, import_model, parse_input_shape
from edge_agent.errors import ConfigError, ModelError, UnsupportedModelError

HAVE_TF = importlib.util.find_spec("tensorflow") is not None


class ConvNet(torch.nn.Module):
    """Conv + BatchNorm + ReLU + Linear: the pattern the canonicaliser later fuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


def _convnet() -> ConvNet:
    torch.manual_seed(0)
    model = ConvNet()
    bn = model.bn
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN really matters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model)
    model.ir_version = min(model.ir_version, 10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _assert_matches_torch(model: onnx.ModelProto, module: Any, *, batch: int = 3) -> None:
    sess = _session(model)
    x = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_iris(return_X_y=True)
    return x, y


# --- parse_input_shape ------------------------------------------------------------------------


def test_parse_input_shape_good() -> None:
    assert parse_input_shape("input=1,3,224,224") == ("input", (1, 3, 224, 224))
    assert parse_input_shape(" x = 1, 4 ") == ("x", (1, 4))
    assert parse_input_shape("serving:0=8") == ("serving:0", (8,))


@pytest.mark.parametrize(
    "text", ["input", "=1,3", "input=", "input=1,a,3", "input=1,,3", "input=0,3", "input=1,-3"]
)
def test_parse_input_shape_bad(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_input_shape(text)
    assert repr(text) in str(err.value)
    assert "input=1,3,224,224" in str(err.value)  # the way out: an example


# --- ONNX files -------------------------------------------------------------------------------


def _tiny_onnx() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_onnx_file_and_proto_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save_model(_tiny_onnx(), str(path))
    assert detect_kind(path) == "onnx"
    model = import_model(path)
    (y,) = _session(model).run(None, {"x": np.ones((2, 4), np.float32)})
    np.testing.assert_allclose(y, np.full((2, 3), [18.0, 22.0, 26.0]))
    proto = _tiny_onnx()
    assert import_model(proto) is proto


def test_onnx_external_data_loaded_and_missing_data_refused(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        _tiny_onnx(), str(path), save_as_external_data=True, location="ext.data", size_threshold=0
    )
    model = import_model(str(path))
    assert numpy_helper.to_array(model.graph.initializer[0]).sum() == 66.0
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ModelError, match=r"ext\.onnx: external data file 'ext\.data'.*missing"):
        import_model(path)


def test_garbage_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("this is not a model\n")
    with pytest.raises(ModelError, match=r"model\.onnx: not an ONNX model \(protobuf parse failed"):
        import_model(path)
    path.write_bytes(b"")  # parses as an empty message: still not a model
    with pytest.raises(ModelError, match=r"model\.onnx: not an ONNX model"):
        import_model(path)


def test_missing_file_and_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.onnx: no such file"):
        import_model(tmp_path / "nope.onnx")
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"\x00\x01\x02 not a model")
    with pytest.raises(ModelError, match=r"weights\.bin: unrecognised .*TorchScript.*SavedModel"):
        import_model(odd)
    with pytest.raises(ModelError, match=r"without saved_model\.pb"):
        detect_kind(tmp_path)


# --- torch ------------------------------------------------------------------------------------


def test_torch_module_exports_and_matches(caplog: pytest.LogCaptureFixture) -> None:
    module = _convnet()
    module.train()  # the importer exports in eval mode and gives the module back as it was
    model = import_model(module, input_shapes={"image": (1, 3, 16, 16)})
    assert module.training
    module.eval()
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["output"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    assert {"Conv", "Relu", "Gemm"} <= {n.op_type for n in model.graph.node}
    _assert_matches_torch(model, module)  # batch 3 through a graph exported at batch 1


def test_torch_module_with_example_inputs_and_without_shapes() -> None:
    module = _convnet()
    model = import_model(module, example_inputs=(torch.zeros(2, 3, 16, 16),), opset=13)
    assert [i.name for i in model.graph.input] == ["input"]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 13)}
    _assert_matches_torch(model, module, batch=1)
    with pytest.raises(ConfigError, match="needs input shapes; pass --input-shape"):
        import_model(module)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_file_round_trip(tmp_path: Path, how: str) -> None:
    module = _convnet()
    example = torch.zeros(1, 3, 16, 16)
    scripted = torch.jit.script(module) if how == "script" else torch.jit.trace(module, example)
    path = tmp_path / "model.pt"
    torch.jit.save(scripted, str(path))
    assert detect_kind(path) == "torchscript"
    with pytest.raises(ConfigError) as err:
        import_model(path)
    assert str(err.value) == (
        f"{path}: TorchScript needs input shapes; pass --input-shape NAME=DIMS"
    )
    name, dims = parse_input_shape("input=1,3,16,16")
    model = import_model(path, input_shapes={name: dims})
    _assert_matches_torch(model, module)


def test_exported_program_round_trip(tmp_path: Path) -> None:
    module = _convnet()
    program = torch.export.export(module, (torch.zeros(1, 3, 16, 16),))
    path = tmp_path / "model.pt2"
    torch.export.save(program, str(path))
    assert detect_kind(path) == "exported-program"
    model = import_model(path)  # shapes from the program's own example inputs
    _assert_matches_torch(model, module, batch=1)
    _assert_matches_torch(model, module, batch=2)  # batch stays dynamic in the ONNX graph


def test_torch_save_pickle_needs_trust(tmp_path: Path) -> None:
    module = _convnet()
    path = tmp_path / "model.pt"
    torch.save(module, str(path))
    assert detect_kind(path) == "pickle"  # a .pt that is not TorchScript
    with pytest.raises(ConfigError) as err:
        import_model(path, input_shapes={"input": (1, 3, 16, 16)})
    assert str(err.value) == (
        f"{path}: loading a pickle runs arbitrary code; pass --trust-pickle only if you trust its "
        "source (or export it to ONNX yourself)"
    )
    model = import_model(path, input_shapes={"input": (1, 3, 16, 16)}, trust_pickle=True)
    _assert_matches_torch(model, module)


def test_trusted_pickle_of_unsupported_object(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save(_convnet().state_dict(), str(path))
    with pytest.raises(UnsupportedModelError, match=r"state\.pt: cannot import a .*OrderedDict"):
        import_model(path, trust_pickle=True)


# --- scikit-learn -----------------------------------------------------------------------------


def _check_classifier(model: onnx.ModelProto, est: Any, x: np.ndarray) -> None:
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["label", "probabilities"]
    x32 = x.astype(np.float32)
    labels, probs = _session(model).run(None, {"input": x32})
    np.testing.assert_allclose(probs, est.predict_proba(x32), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(labels, est.predict(x32))


def test_sklearn_logistic_regression(iris: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = iris
    est = LogisticRegression(max_iter=500).fit(x, y)
    _check_classifier(import_model(est), est, x)


def test_sklearn_pipeline_scaler_forest(iris: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = iris
    # random_state=5 is a forest where skl2onnx's default float32 scaler flips a tree split on
    # one iris row (0.006 off); the importer's double-precision scaler ("div_cast") matches.
    forest = RandomForestClassifier(n_estimators=20, max_depth=5, random_state=5)
    est = Pipeline([("scale", StandardScaler()), ("forest", forest)]).fit(x, y)
    _check_classifier(import_model(est), est, x)


def test_sklearn_shape_checks(iris: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = iris
    est = LogisticRegression(max_iter=500).fit(x, y)
    with pytest.raises(ConfigError, match="gives 5 features but the LogisticRegression"):
        import_model(est, input_shapes={"input": (1, 5)})
    with pytest.raises(ModelError, match="LogisticRegression is not fitted"):
        import_model(LogisticRegression())


@pytest.mark.parametrize("suffix", [".pkl", ".joblib"])
def test_sklearn_pickle_needs_trust(
    tmp_path: Path, iris: tuple[np.ndarray, np.ndarray], suffix: str
) -> None:
    import joblib

    x, y = iris
    est = LogisticRegression(max_iter=500).fit(x, y)
    path = tmp_path / f"model{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(est))
    else:
        joblib.dump(est, path)
    assert detect_kind(path) == "pickle"
    with pytest.raises(ConfigError, match="--trust-pickle") as err:
        import_model(path)
    assert str(err.value).startswith(f"{path}: loading a pickle runs arbitrary code")
    _check_classifier(import_model(path, trust_pickle=True), est, x)


def test_trusted_pickle_of_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(UnsupportedModelError, match=r"data\.pkl: cannot import a builtins\.list"):
        import_model(path, trust_pickle=True)


# --- TensorFlow (not installed here: the missing-extra message) ------------------------------


@pytest.mark.skipif(HAVE_TF, reason="TensorFlow is installed: the missing-extra path is moot")
def test_keras_and_savedmodel_need_the_tf_extra(tmp_path: Path) -> None:
    keras = tmp_path / "model.keras"  # a Keras 3 archive's layout
    with zipfile.ZipFile(keras, "w") as zf:
        zf.writestr("metadata.json", "{}")
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    h5 = tmp_path / "weights_named_oddly.bin"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 32)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    assert [detect_kind(p) for p in (keras, h5, saved)] == ["keras", "keras", "savedmodel"]
    with pytest.raises(ConfigError) as err:
        import_model(keras)
    assert str(err.value) == (
        f"{keras}: Keras models need TensorFlow; install the 'tf' extra: "
        "pip install 'edge-inference[tf]'"
    )
    with pytest.raises(ConfigError, match=r"SavedModel directories need TensorFlow.*\[tf\]"):
        import_model(saved)


class _Inverse(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.inv(x)


def test_torch_export_failure_names_the_operator() -> None:
    # The TorchScript-based exporter has no linalg_inv; the dynamo fallback fails too (without
    # onnxscript it cannot run at all; with it, it has no inverse either).
    with pytest.raises(ModelError) as err:
        import_model(_Inverse(), input_shapes={"x": (1, 4, 4)})
    message = str(err.value)
    assert message.startswith("_Inverse: torch cannot export the model to ONNX: ")
    assert "aten::linalg_inv" in message and "dynamo exporter also failed" in message
    assert "\n" not in message
