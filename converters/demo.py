"""``make demo``: the converter end to end on embedded defaults, with no downloads.

1. Train a small CNN on scikit-learn's bundled 8x8 digits (a few seconds).
2. Export it to ONNX at opset 11 (as many real exporters still do) and save calibration and
   evaluation data as .npz.
3. ``edge-convert quantize`` to int8 with a 0.5-point accuracy budget: prints the fp32 vs int8
   table and every int8 scheme tried.
4. ``edge-convert keygen``, ``build`` a signed bundle for two device profiles, and ``verify`` it.

Each step runs the real command line, as a user would.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from converters.cli import main as edge_convert


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _run(args: list[str]) -> None:
    print("$ edge-convert " + " ".join(args), flush=True)
    code = edge_convert(args)
    if code != 0:
        raise SystemExit(code)


def run(out: Path) -> int:
    from converters.zoo import export_onnx, torch_accuracy, train_digits_cnn

    t0 = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _step("1. train a small CNN on scikit-learn's digits (no downloads)")
    model, data = train_digits_cnn(width=64)
    acc = torch_accuracy(model, data.x_test, data.y_test)
    print(
        f"trained in {time.monotonic() - t0:.1f} s: {len(data.x_train)} train / "
        f"{len(data.x_test)} test images, torch accuracy {acc:.2f}%"
    )
    _step("2. export to ONNX (opset 11) and write calibration / evaluation data")
    onnx_path = out / "digits-cnn.onnx"
    onnx_path.write_bytes(export_onnx(model, (1, 1, 8, 8), opset=11))
    np.savez(out / "calibration.npz", x=data.x_train[:256])
    np.savez(out / "eval.npz", x=data.x_test, y=data.y_test)
    (out / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    print(
        f"wrote {onnx_path}, calibration.npz (256 samples), eval.npz ({len(data.x_test)} labelled)"
    )
    _step("3. quantize to int8 within a 0.5-point accuracy budget")
    _run(["inspect", str(onnx_path)])
    _run(
        [
            "quantize",
            str(onnx_path),
            "-o",
            str(out / "digits-cnn.int8.onnx"),
            "--format",
            "onnx-int8",
            "--calibration",
            str(out / "calibration.npz"),
            "--eval",
            str(out / "eval.npz"),
            "--max-accuracy-drop",
            "0.5",
            "--report",
            str(out / "quantize-report.json"),
        ]
    )
    _step("4. sign: keygen, build a bundle for two device profiles, verify it")
    _run(["keygen", "--out", str(out / "keys")])
    _run(
        [
            "build",
            str(onnx_path),
            "--profile",
            "x86-64",
            "--profile",
            "raspberry-pi-5",
            "--calibration",
            str(out / "calibration.npz"),
            "--eval",
            str(out / "eval.npz"),
            "--max-accuracy-drop",
            "0.5",
            "--labels",
            str(out / "labels.txt"),
            "--sign-key",
            str(out / "keys" / "edge-signing.key"),
            "--name",
            "digits-cnn",
            "--version",
            "1.0.0",
            "-o",
            str(out / "digits-cnn.edgebundle"),
            "--report",
            str(out / "build-report.json"),
        ]
    )
    _run(
        [
            "verify",
            str(out / "digits-cnn.edgebundle"),
            "--public-key",
            str(out / "keys" / "edge-signing.pub"),
        ]
    )
    _step(f"done in {time.monotonic() - t0:.1f} s; everything is in {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    return run(args.out)


if __name__ == "__main__":
    sys.exit(main())
