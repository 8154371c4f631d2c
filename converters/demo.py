"""``make demo``: the whole tool end to end on embedded defaults, with no downloads, no camera
and no broker to install.

1. Train a small CNN on scikit-learn's bundled 8x8 digits (a few seconds).
2. Export it to ONNX at opset 11 (as many real exporters still do) and save calibration and
   evaluation data as .npz.
3. ``edge-convert quantize`` to int8 ONNX and to int8 TFLite (no TensorFlow) within a 0.5-point
   accuracy budget: the fp32 vs int8 tables.
4. ``edge-convert keygen``, ``build`` a signed bundle v1.0.0 for two device profiles (x86-64 and
   a Raspberry Pi 5, which gets the TFLite artifact), ``verify`` it; then v1.1.0, pruned 20 %
   and quantized in the same command.
5. Start an MQTT broker on loopback (Mosquitto, or amqtt without it), the agent on a generated
   digits video at 30 fps, and print its live telemetry; ``edgectl rollout`` v1.1.0 and watch the
   hot swap; stop.
6. Write ``report.md`` with PNG plots: per-stage latency histograms, fps over time with the
   swap marked, the fp32 vs int8 table, and the swap's frame accounting.

Each step runs the real command line, as a user would.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.cli import main as edge_convert

if TYPE_CHECKING:
    from converters.zoo import DigitsData


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _run(args: list[str]) -> None:
    print("$ edge-convert " + " ".join(args), flush=True)
    code = edge_convert(args)
    if code != 0:
        raise SystemExit(code)


def run(out: Path, *, live: bool = True, broker: str = "auto") -> int:
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
    _step("3. quantize to int8 (ONNX, and TFLite without TensorFlow) within a 0.5-point budget")
    _run(["inspect", str(onnx_path)])
    for fmt, suffix in (("onnx-int8", "onnx"), ("tflite-int8", "tflite")):
        _run(
            ["quantize", str(onnx_path), "-o", str(out / f"digits-cnn.int8.{suffix}"),
             "--format", fmt, "--calibration", str(out / "calibration.npz"),
             "--eval", str(out / "eval.npz"), "--max-accuracy-drop", "0.5",
             "--report", str(out / f"quantize-{fmt}.json")]
        )  # fmt: skip
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
    _run(
        ["build", str(onnx_path), "--profile", "x86-64", "--profile", "raspberry-pi-5",
         "--prune-structured", "0.2", "--calibration", str(out / "calibration.npz"),
         "--eval", str(out / "eval.npz"), "--max-accuracy-drop", "1.0",
         "--labels", str(out / "labels.txt"),
         "--sign-key", str(out / "keys" / "edge-signing.key"), "--name", "digits-cnn",
         "--version", "1.1.0", "-o", str(out / "digits-cnn-1.1.0.edgebundle"),
         "--report", str(out / "build-report-1.1.0.json")]
    )  # fmt: skip
    if live:
        _live(out, data, broker)
    _step(f"done in {time.monotonic() - t0:.1f} s; everything is in {out}/")
    return 0


def _live(out: Path, data: DigitsData, broker: str) -> None:
    import json

    from converters.demo_live import digits_video, run_live
    from converters.demo_report import write_report

    _step("5. the agent: a loopback broker, a digits video at 30 fps, live telemetry, a rollout")
    x = data.x_test[:300]
    video = digits_video(out / "digits.mp4", x)
    print(f"wrote {video} ({len(x)} frames, 64 px, 30 fps; played in a loop, live)")
    live_run = run_live(
        out, v1=out / "digits-cnn.edgebundle", v2=out / "digits-cnn-1.1.0.edgebundle",
        pub=out / "keys" / "edge-signing.pub", video=video, before_s=6.0, after_s=5.0,
        broker=broker,
    )  # fmt: skip
    _step("6. the report")
    reports = {
        "ours onnx-int8": json.loads((out / "quantize-onnx-int8.json").read_text()),
        "ours tflite-int8": json.loads((out / "quantize-tflite-int8.json").read_text()),
    }
    path = write_report(out, live=live_run, quantize_reports=reports,
                        v2_note="1.1.0: pruned 20 % and int8")  # fmt: skip
    print(path.read_text().split("## edgectl rollout")[0])
    print(f"wrote {path}, {out / 'latency-histograms.png'}, {out / 'fps.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--no-live", action="store_true", help="stop after the converter steps")
    parser.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "amqtt"),
        default="auto",
        help="auto (default): Mosquitto when installed, else amqtt",
    )
    args = parser.parse_args(argv)
    return run(args.out, live=not args.no_live, broker=args.broker)


if __name__ == "__main__":
    sys.exit(main())
