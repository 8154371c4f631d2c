"""Shared fixtures: real models built or trained here, real data files, the real CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.cli import main as edge_convert


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``edge-convert`` in-process (fast); returns exit code, stdout, stderr."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        code = edge_convert([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@dataclass
class DigitsModel:
    onnx: Path
    onnx11: Path
    calibration: Path
    eval: Path
    torch_accuracy: float


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsModel:
    """The digits CNN, trained once per session on scikit-learn's bundled digits."""
    from converters.zoo import export_onnx, torch_accuracy, train_digits_cnn

    root = tmp_path_factory.mktemp("digits")
    model, data = train_digits_cnn()
    (root / "digits.onnx").write_bytes(export_onnx(model, (1, 1, 8, 8)))
    (root / "digits11.onnx").write_bytes(export_onnx(model, (1, 1, 8, 8), opset=11))
    np.savez(root / "cal.npz", x=data.x_train[:200])
    np.savez(root / "eval.npz", x=data.x_test, y=data.y_test)
    return DigitsModel(
        onnx=root / "digits.onnx",
        onnx11=root / "digits11.onnx",
        calibration=root / "cal.npz",
        eval=root / "eval.npz",
        torch_accuracy=torch_accuracy(model, data.x_test, data.y_test),
    )


@pytest.fixture(scope="session")
def image_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-normal 3x64x64 calibration samples (what a normalised image looks like)."""
    path = tmp_path_factory.mktemp("cal") / "img.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((40, 3, 64, 64)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from edge_agent.model.keys import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


# Models shaped like real exports (converters/standins.py), trained once per session: each
# takes from about 15 s (DB) to about a minute (SVTR) on the 2-core build machine.
@pytest.fixture(scope="session")
def standin_yolo() -> Any:
    """The YOLOv8-style detector as the benchmark builds it: fewer images cost it the
    precision and the quiet background that the floors in test_standins.py check."""
    from converters.standins import yolov8_style

    return yolov8_style()


@pytest.fixture(scope="session")
def standin_svtr() -> Any:
    """The SVTR-style recognizer on batches of 24 (the benchmark's: 32), as many steps: it
    reads as many lines (0.99 exact) and int8 keeps them. Fewer steps or lines leave it less
    sure of its readings, and int8 flips more of them than a real recognizer's."""
    from converters.standins import svtr_style

    return svtr_style(batch=24)


@pytest.fixture(scope="session")
def standin_db() -> Any:
    """The DB-style detector on batches of 8 (the benchmark's: 16) at a higher rate: the same
    map quality (mean IoU 0.77) in half the images."""
    from converters.standins import db_style

    return db_style(batch=8, lr=6e-3)


@pytest.fixture(scope="session")
def standin_vad() -> Any:
    """The GRU voice-activity detector (converters/standins.py: vad_style): a few seconds."""
    from converters.standins import vad_style

    return vad_style()


@pytest.fixture(scope="session")
def standin_blazeface() -> Any:
    """The BlazeFace-style detector (converters/standins.py: blazeface_style) at the real
    128 px and channel counts, trained on half batches: about 7 s of CPU."""
    from converters.standins import blazeface_style

    return blazeface_style(steps=60, batch=8, lr=8e-3, n_calibration=4, n_eval=48)


@pytest.fixture(scope="session")
def standin_landmark() -> Any:
    """The hand-landmark-style regressor (converters/standins.py: landmark_style), built small
    (96 px, half the channels; the benchmark's is 256 px): about 11 s of CPU."""
    from converters.standins import landmark_style

    return landmark_style(
        size=96, width=0.5, steps=60, batch=16, lr=2e-3, n_calibration=4, n_eval=64
    )
