"""The converter's Python API: the same work as ``edge-convert quantize``, for a model object
(a torch ``nn.Module``, a fitted sklearn estimator, an ``onnx.ModelProto``) or a file.

>>> from converters.api import quantize
>>> report = quantize(net, "net.int8.onnx", format="onnx-int8",
...                   input_shapes={"input": (1, 3, 224, 224)}, calibration="cal.npz")
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.convert import ConvertOptions, convert
from converters.importers import import_model
from edge_agent.model.profiles import DeviceProfile, detect_host_profile, load_profile


def quantize(
    model: Any,
    output: str | Path,
    *,
    format: str,
    calibration: str | Path | None = None,
    eval: str | Path | None = None,
    max_accuracy_drop: float | None = None,
    min_cosine: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    profile: str | DeviceProfile | None = None,
    calibration_method: str = "minmax",
    schemes: Sequence[str] = (),
    report: str | Path | None = None,
    trust_pickle: bool = False,
    latency_seconds: float = 1.5,
) -> dict[str, Any]:
    """Convert ``model`` to ``format``, validate it, write ``output`` (atomically) and return the
    report (the same keys as ``--report``). Raises an ``EdgeError`` subclass on bad input or when
    the accuracy budget cannot be met; nothing is written then."""
    from converters.cli import _host_arch, atomic_write_bytes

    imported = import_model(
        model, input_shapes=input_shapes, example_inputs=example_inputs, trust_pickle=trust_pickle
    )
    if profile is None:
        prof = detect_host_profile()
    elif isinstance(profile, DeviceProfile):
        prof = profile
    else:
        prof = load_profile(profile)
    options = ConvertOptions(
        fmt=format,
        profile=prof,
        calibration=Path(calibration) if calibration is not None else None,
        eval=Path(eval) if eval is not None else None,
        max_accuracy_drop=max_accuracy_drop,
        min_cosine=min_cosine,
        calibration_method=calibration_method,
        schemes=tuple(schemes),
        latency_seconds=latency_seconds,
        host_profile=prof.arch == _host_arch(),
    )
    result = convert(imported, options=options, input_shapes=input_shapes)
    out = Path(output)
    result.report["output"] = str(out)
    atomic_write_bytes(out, result.model_bytes)
    if report is not None:
        atomic_write_bytes(Path(report), (json.dumps(result.report, indent=2) + "\n").encode())
    return result.report
