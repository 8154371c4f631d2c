"""TFLite benchmark (``make bench``): our ONNX -> TFLite writer (no TensorFlow) side by side with
onnxruntime and, when a Python with TensorFlow is given, with TensorFlow's own ``TFLiteConverter``
on the same Keras MobileNetV2.

Part 1, always: the end-to-end nets of the tests, converted to tflite-fp32 / fp16 / int8: the
fp32 error against onnxruntime, Transposes left inside, sizes, and conversion time of a
MobileNetV2-sized model; the trained digits CNN in tflite-int8 through ``convert`` (accuracy and
top-1 agreement with fp32); latency of onnxruntime fp32 vs LiteRT fp32 vs LiteRT int8 on a
MobileNetV2 at 224 (raw invoke loops, 2 threads, interleaved).

Part 2, with ``--tf-python PY`` (``make bench`` creates ``.venv-tf`` with tensorflow-cpu and
tf2onnx for it): ``benchmarks/tf_reference.py`` builds the Keras model and converts it with
``TFLiteConverter`` (fp32, and full int8 with a representative dataset); we convert its tf2onnx
export with the same calibration samples. TensorFlow's float16-weight model (fp16 constants
behind DEQUANTIZE, as mobile SDKs ship float models) is imported by our importer and quantized to
tflite-int8 by ``convert`` with the same samples in NCHW; its fidelity to the fp16 original is
measured in LiteRT on held-out samples. All the .tflite files are timed in one interleaved loop in
LiteRT.

Writes ``benchmarks/results/tflite.json`` and ``tflite.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.convert import RESULTS, _cpu_name, digits_files, targets_markdown
from converters import zoo
from converters.canonical import canonicalize, tensor_spec
from converters.convert import ConvertOptions, convert
from converters.tflite import count_transposes, onnx_to_tflite
from converters.validate import LiteRTSession, make_session, measure_latency
from edge_agent.errors import EdgeError
from edge_agent.model.profiles import detect_host_profile

THREADS = 2
#: held-out samples (not the calibration set) for the int8-from-fp16 fidelity
HELDOUT = 16
FP16 = "TFLiteConverter fp16"
FP16_INT8 = "ours int8 from TF fp16"


class _Raw:
    """A bare LiteRT interpreter behind the session interface measure_latency times: the input
    is set once, each run is one invoke and one output read."""

    def __init__(self, path: Path, x_nhwc: np.ndarray) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=THREADS)
        self.it.allocate_tensors()
        (self.inp,) = self.it.get_input_details()
        self.out = self.it.get_output_details()[0]["index"]
        self._feed(x_nhwc)

    def _feed(self, x: np.ndarray) -> None:
        d = self.inp
        if d["dtype"] == np.int8:
            s, z = d["quantization"]
            x = np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)
        self.it.set_tensor(d["index"], np.ascontiguousarray(x))

    def get_outputs(self) -> list[Any]:
        return []

    def run(self, _names: Any, _feed: Any) -> list[np.ndarray]:
        self.it.invoke()
        return [self.it.get_tensor(self.out)]

    def output(self) -> np.ndarray:
        (d,) = self.it.get_output_details()
        self.it.invoke()
        y = self.it.get_tensor(d["index"]).astype(np.float32)
        if d["dtype"] == np.int8:
            s, z = d["quantization"]
            y = (y - z) * s
        return y

    def outputs(self, xs_nhwc: np.ndarray) -> np.ndarray:
        """The float output for each sample of ``xs_nhwc`` (batch 1 each), stacked."""
        ys = []
        for i in range(len(xs_nhwc)):
            self._feed(xs_nhwc[i : i + 1])
            ys.append(self.output())
        return np.stack(ys)


def _canonical(net: Any, shape: tuple[int, ...]) -> onnx.ModelProto:
    raw = onnx.load_from_string(zoo.export_onnx(net, shape, dynamic_batch=False))
    return canonicalize(raw).model


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-6))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _op_counts(path: Path) -> dict[str, int]:
    """How many of each builtin operator the .tflite at ``path`` holds (its first subgraph)."""
    from ai_edge_litert import schema_py_generated as S

    m = S.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    names = {v: k for k, v in vars(S.BuiltinOperator).items() if isinstance(v, int)}
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in m.operatorCodes]
    counts: dict[str, int] = {}
    for op in m.subgraphs[0].operators:
        name = names.get(codes[op.opcodeIndex], str(codes[op.opcodeIndex]))
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _nets() -> dict[str, tuple[Any, tuple[int, ...], bool]]:
    return {
        "resnet-style": (lambda: zoo.resnet_style(width=16), (1, 3, 96, 96), True),
        "mobilenetv2-style": (lambda: zoo.mobilenet_v2_style(), (1, 3, 224, 224), True),
        "se-hardswish": (lambda: zoo.se_hardswish_cnn(), (1, 3, 64, 64), True),
        "unet": (lambda: zoo.tiny_unet(), (1, 3, 64, 64), True),
        "conv1d-sensor": (lambda: zoo.conv1d_sensor(), (1, 6, 128), False),
    }


def part_writer(tmp: Path, seconds: float) -> dict[str, Any]:
    import torch

    rows = []
    rng = np.random.default_rng(0)
    mbv2: dict[str, Any] = {}
    for name, (make, shape, cnn) in _nets().items():
        torch.manual_seed(0)
        model = _canonical(make(), shape)
        t0 = time.perf_counter()
        fp32 = onnx_to_tflite(model)
        took = time.perf_counter() - t0
        fp16 = onnx_to_tflite(model, fp16_weights=True)
        (tmp / f"{name}.tflite").write_bytes(fp32)
        sess = make_session(model.SerializeToString(), threads=THREADS)
        inp = model.graph.input[0].name
        lite = LiteRTSession(
            tmp / f"{name}.tflite",
            inputs=tensor_spec(model),
            outputs=tensor_spec(model, outputs=True),
        )
        err = 0.0
        for _ in range(4):
            x = rng.standard_normal(shape).astype(np.float32)
            err = max(err, _rel(sess.run(None, {inp: x})[0], lite.run(None, {inp: x})[0]))
        rows.append(
            {
                "model": name,
                "onnx_bytes": len(model.SerializeToString()),
                "fp32_bytes": len(fp32),
                "fp16_ratio": round(len(fp16) / len(fp32), 4),
                "fp32_max_rel_err": float(f"{err:.3g}"),
                "transposes": count_transposes(fp32),
                "cnn": cnn,
                "convert_s": round(took, 3),
            }
        )
        print(f"  {name}: {rows[-1]}", flush=True)
        if name == "mobilenetv2-style":
            mbv2 = {"model": model, "fp32": tmp / f"{name}.tflite", "shape": shape}

    # MobileNetV2 at 224 in int8 through convert (calibration on random images), then timed
    # against onnxruntime fp32 and LiteRT fp32.
    cal = tmp / "mbv2-cal.npz"
    np.savez(cal, x=rng.standard_normal((48, *mbv2["shape"][1:])).astype(np.float32))
    opts = ConvertOptions(
        fmt="tflite-int8", profile=detect_host_profile(), calibration=cal, latency_seconds=0.3
    )
    t0 = time.perf_counter()
    res = convert(mbv2["model"], options=opts)
    int8_convert_s = time.perf_counter() - t0
    (tmp / "mbv2-int8.tflite").write_bytes(res.model_bytes)
    x = rng.standard_normal(mbv2["shape"]).astype(np.float32)
    x_nhwc = x.transpose(0, 2, 3, 1).copy()
    sessions = {
        "onnxruntime fp32": make_session(mbv2["model"].SerializeToString(), threads=THREADS),
        "LiteRT fp32 (ours)": _Raw(mbv2["fp32"], x_nhwc),
        "LiteRT int8 (ours)": _Raw(tmp / "mbv2-int8.tflite", x_nhwc),
    }
    lat = measure_latency(sessions, {mbv2["model"].graph.input[0].name: x}, seconds=seconds)
    latency = {k: round(v.median_ms, 3) for k, v in lat.items()}
    print(f"  mobilenetv2-224 latency: {latency}", flush=True)

    digits = _digits(tmp)
    return {
        "nets": rows,
        "mobilenetv2_224": {
            "latency_ms": latency,
            "int8_bytes": len(res.model_bytes),
            "int8_convert_s_incl_calibration_and_validation": round(int8_convert_s, 2),
            "int8_cosine": res.report["fidelity"]["cosine"],
        },
        "digits": digits,
    }


def _digits(tmp: Path) -> dict[str, Any]:
    p, cal, ev = digits_files(tmp)
    out = {}
    for fmt in ("tflite-fp32", "tflite-int8"):
        opts = ConvertOptions(
            fmt=fmt,
            profile=detect_host_profile(),
            calibration=cal,
            eval=ev,
            max_accuracy_drop=0.5,
            latency_seconds=0.3,
        )
        rep = convert(onnx.load(str(p)), options=opts).report
        out[fmt] = {
            "accuracy": round(rep["accuracy"]["converted"], 3),
            "accuracy_fp32": round(rep["accuracy"]["original"], 3),
            "top1_agreement": rep["fidelity"]["top1_agreement"],
            "size_ratio": rep["size_bytes"]["ratio"],
            "float_nodes": len(rep["float_nodes"]),
        }
        print(f"  digits {fmt}: {out[fmt]}", flush=True)
    return out


def _quantize_tf_fp16(ref: Path, tmp: Path) -> tuple[dict[str, Any], Path | None]:
    """Import TensorFlow's fp16 .tflite with our importer and quantize it to tflite-int8 through
    ``convert`` with the calibration samples (``x``: NCHW, the imported model's layout). Returns
    what happened and the int8 file, or None when the import or the conversion raised (the message
    is recorded: an operator our importer refuses is a finding)."""
    from converters.importers import import_model

    src = ref / "tf-fp16.tflite"
    info: dict[str, Any] = {"ops": _op_counts(src), "import_error": None}
    t0 = time.perf_counter()
    try:
        imported = import_model(src)
    except Exception as exc:  # any failure is the finding: keep its type and message
        info["import_s"] = round(time.perf_counter() - t0, 3)
        info["import_error"] = f"{type(exc).__name__}: {exc}"
        print(f"  import of {src.name} raised: {info['import_error']}", flush=True)
        return info, None
    info["import_s"] = round(time.perf_counter() - t0, 3)
    opts = ConvertOptions(
        fmt="tflite-int8",
        profile=detect_host_profile(),
        calibration=ref / "calibration.npz",
        latency_seconds=0.3,
    )
    t0 = time.perf_counter()
    try:
        res = convert(imported, options=opts, original_size=src.stat().st_size)
    except EdgeError as exc:
        info["convert_error"] = f"{type(exc).__name__}: {exc}"
        print(f"  quantizing {src.name} raised: {info['convert_error']}", flush=True)
        return info, None
    info["convert_s"] = round(time.perf_counter() - t0, 2)
    info["convert_report"] = {
        "cosine_vs_imported_onnx": res.report["fidelity"].get("cosine"),
        "float_nodes": len(res.report.get("float_nodes", [])),
    }
    out = tmp / "ours-int8-from-tf-fp16.tflite"
    out.write_bytes(res.model_bytes)
    print(
        f"  {src.name}: imported in {info['import_s']} s, int8 in {info['convert_s']} s", flush=True
    )
    return info, out


def part_tensorflow(tmp: Path, tf_python: str, seconds: float) -> dict[str, Any]:
    ref = tmp / "tf"
    script = Path(__file__).with_name("tf_reference.py")
    run = subprocess.run(
        [tf_python, str(script), str(ref)], capture_output=True, text=True, timeout=900
    )
    if run.returncode != 0:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"tf_reference.py failed: {tail[0][:200]}"}
    info = json.loads(run.stdout.strip().splitlines()[-1])
    model = onnx.load(str(ref / "model.onnx"))
    ours: dict[str, Path] = {}
    times = {}
    for fmt in ("tflite-fp32", "tflite-int8"):
        opts = ConvertOptions(
            fmt=fmt,
            profile=detect_host_profile(),
            calibration=ref / "calibration.npz",
            latency_seconds=0.3,
        )
        t0 = time.perf_counter()
        res = convert(model, options=opts)
        times[fmt] = round(time.perf_counter() - t0, 2)
        ours[fmt] = tmp / f"ours-{fmt}.tflite"
        ours[fmt].write_bytes(res.model_bytes)
    t0 = time.perf_counter()
    onnx_to_tflite(canonicalize(model).model)
    writer_s = round(time.perf_counter() - t0, 2)
    fp16, fp16_int8 = _quantize_tf_fp16(ref, tmp)
    with np.load(ref / "calibration.npz") as d:
        x_nhwc = d["x_nhwc"][:1]
    files = {
        "TFLiteConverter fp32": ref / "tf-fp32.tflite",
        "ours fp32": ours["tflite-fp32"],
        "TFLiteConverter int8": ref / "tf-int8.tflite",
        "ours int8": ours["tflite-int8"],
        FP16: ref / "tf-fp16.tflite",
    }
    if fp16_int8 is not None:
        files[FP16_INT8] = fp16_int8
        # held-out samples, drawn like the calibration ones (uniform in [-1, 1]) but not them
        held = np.random.default_rng(1).random((HELDOUT, *x_nhwc.shape[1:]), dtype=np.float32)
        held = held * 2 - 1
        want = _Raw(files[FP16], x_nhwc).outputs(held)
        got = _Raw(fp16_int8, x_nhwc).outputs(held)
        cos = [_cos(want[i], got[i]) for i in range(HELDOUT)]
        agree = np.argmax(want.reshape(HELDOUT, -1), 1) == np.argmax(got.reshape(HELDOUT, -1), 1)
        fp16.update(
            heldout_samples=HELDOUT,
            cosine_vs_tf_fp16=round(float(np.mean(cos)), 6),
            cosine_min_vs_tf_fp16=round(float(np.min(cos)), 6),
            top1_agreement_vs_tf_fp16=round(float(np.mean(agree)), 4),
        )
    sessions = {k: _Raw(p, x_nhwc) for k, p in files.items()}
    outs = {k: s.output() for k, s in sessions.items()}
    lat = measure_latency(sessions, {}, seconds=seconds)
    rows: list[dict[str, Any]] = []
    for k, p in files.items():
        rows.append(
            {
                "variant": k,
                "size_bytes": p.stat().st_size,
                "latency_ms": round(lat[k].median_ms, 3),
                "p90_ms": round(lat[k].p90_ms, 3),
                "runs": lat[k].runs,
                "cosine_vs_tf_fp32": round(_cos(outs["TFLiteConverter fp32"], outs[k]), 6),
            }
        )
        print(f"  {rows[-1]}", flush=True)
    by = {r["variant"]: r for r in rows}
    ratios = {
        prec: {
            "latency": round(
                by[f"ours {prec}"]["latency_ms"] / by[f"TFLiteConverter {prec}"]["latency_ms"], 4
            ),
            "size": round(
                by[f"ours {prec}"]["size_bytes"] / by[f"TFLiteConverter {prec}"]["size_bytes"], 4
            ),
        }
        for prec in ("fp32", "int8")
    }
    if FP16_INT8 in by:
        fp16["latency_ratio_int8_vs_fp16"] = round(
            by[FP16_INT8]["latency_ms"] / by[FP16]["latency_ms"], 4
        )
        fp16["size_ratio_int8_vs_fp16"] = round(
            by[FP16_INT8]["size_bytes"] / by[FP16]["size_bytes"], 4
        )
    print(f"  TF fp16 imported and quantized: {fp16}", flush=True)
    return {
        "reference": info,
        "rows": rows,
        "ratios": ratios,
        "tf_fp16_import": fp16,
        "ours_convert_s": times,
        "ours_writer_s": writer_s,
    }


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: Any, limit: str, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": ok})

    w = result["writer"]
    worst = max(r["fp32_max_rel_err"] for r in w["nets"])
    add(
        "fp32 TFLite vs onnxruntime, max relative error (worst net)",
        worst,
        "<= 1e-4",
        worst <= 1e-4,
    )
    d = w["digits"]["tflite-int8"]
    add("digits tflite-int8 top-1 agreement with fp32", d["top1_agreement"], ">= 0.99",
        d["top1_agreement"] >= 0.99)  # fmt: skip
    drop = round(d["accuracy_fp32"] - d["accuracy"], 3)
    add("digits tflite-int8 accuracy drop (points)", drop, "<= 0.5", drop <= 0.5)
    conv = next(r for r in w["nets"] if r["model"] == "mobilenetv2-style")["convert_s"]
    tf = result.get("tensorflow") or {}
    if "ours_writer_s" in tf:
        conv = max(conv, tf["ours_writer_s"])
    add("MobileNetV2 conversion (writer), seconds", conv, "<= 10", conv <= 10)
    tr = sum(r["transposes"] for r in w["nets"] if r["cnn"])
    add("Transposes inside the converted CNNs", tr, "0", tr == 0)
    if "ratios" in tf:
        for prec in ("fp32", "int8"):
            for what in ("latency", "size"):
                v = tf["ratios"][prec][what]
                add(f"ours / TFLiteConverter {prec} {what}, Keras MobileNetV2 224", v, "<= 1.05",
                    v <= 1.05)  # fmt: skip
    else:
        add("ours vs TFLiteConverter", tf.get("error", "not run (no --tf-python)"), "<= 1.05", None)
    f = tf.get("tf_fp16_import")
    cos_name = "TF-made fp16 .tflite imported and quantized: cosine to the fp16 original (held-out)"
    fast_name = "TF-made fp16 .tflite imported and quantized: int8 / fp16 latency here"
    if f is None:
        why = tf.get("error", "not run (no --tf-python)")
        add(cos_name, why, ">= 0.99", None)
        add(fast_name, why, "< 1 (faster)", None)
    elif "cosine_vs_tf_fp16" not in f:
        why = f.get("import_error") or f.get("convert_error")
        add(cos_name, why, ">= 0.99", False)
        add(fast_name, why, "< 1 (faster)", False)
    else:
        add(cos_name, f["cosine_vs_tf_fp16"], ">= 0.99", f["cosine_vs_tf_fp16"] >= 0.99)
        v = f["latency_ratio_int8_vs_fp16"]
        add(fast_name, v, "< 1 (faster)", v < 1)
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"TFLite benchmark, {result['when']}, {m['cpu']} ({m['cores']} cores), {THREADS} threads, "
        "batch 1, median of interleaved runs. `make bench`.",
        "",
        "| net | ONNX KB | tflite fp32 KB | fp16 / fp32 size | fp32 max rel err vs ORT "
        "| Transposes | writer s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["writer"]["nets"]:
        lines.append(
            f"| {r['model']} | {r['onnx_bytes'] / 1024:.1f} | {r['fp32_bytes'] / 1024:.1f} | "
            f"{r['fp16_ratio']:.3f} | {r['fp32_max_rel_err']:.2g} | {r['transposes']} | "
            f"{r['convert_s']:.2f} |"
        )
    mb = result["writer"]["mobilenetv2_224"]
    lines += ["", "MobileNetV2-style 224 (our zoo), latency ms: " + ", ".join(
        f"{k} {v}" for k, v in mb["latency_ms"].items()
    ) + f"; int8 {mb['int8_bytes'] / 1024:.0f} KB, cosine {mb['int8_cosine']:.5f}."]  # fmt: skip
    tf = result.get("tensorflow") or {}
    if "rows" in tf:
        ref = tf["reference"]
        lines += [
            "",
            f"Keras {ref['keras_model']} ({ref['params']:,} parameters): TensorFlow "
            f"{ref['tensorflow']}'s TFLiteConverter vs ours on its tf2onnx {ref['tf2onnx']} "
            f"export, same {ref['samples']} calibration samples, all in LiteRT.",
            "",
            "| variant | size KB | latency ms | p90 ms | cosine vs TF fp32 |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in tf["rows"]:
            lines.append(
                f"| {r['variant']} | {r['size_bytes'] / 1024:.0f} | {r['latency_ms']:.3f} | "
                f"{r['p90_ms']:.3f} | {r['cosine_vs_tf_fp32']:.5f} |"
            )
        lines += _fp16_markdown(tf)
    elif tf:
        lines += ["", f"TensorFlow comparison: {tf.get('error')}"]
    lines += targets_markdown(result["targets"])
    return "\n".join(lines) + "\n"


def _fp16_markdown(tf: dict[str, Any]) -> list[str]:
    f = tf["tf_fp16_import"]
    ops = ", ".join(f"{k} {v}" for k, v in f["ops"].items())
    lines = ["", f"TensorFlow's fp16-weight .tflite ({ops}) through our importer: "]
    if f["import_error"]:
        lines[-1] += f"the import raised after {f['import_s']} s: `{f['import_error']}`."
        return lines
    lines[-1] += f"imported in {f['import_s']:.2f} s"
    if "convert_error" in f:
        lines[-1] += f"; quantizing it raised: `{f['convert_error']}`."
        return lines
    by = {r["variant"]: r for r in tf["rows"]}
    a, b = by[FP16], by[FP16_INT8]
    lines[-1] += (
        f", quantized to tflite-int8 by `convert` in {f['convert_s']:.1f} s (calibration: the same "
        f"samples in NCHW; {f['convert_report']['float_nodes']} nodes kept float). Fidelity on "
        f"{f['heldout_samples']} held-out samples, both run in LiteRT:"
    )
    lines += [
        "",
        "| variant | size KB | latency ms | p90 ms | cosine vs TF fp16 (mean / worst) "
        "| top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {FP16} | {a['size_bytes'] / 1024:.0f} | {a['latency_ms']:.3f} | {a['p90_ms']:.3f} "
        "| 1 | 1 |",
        f"| {FP16_INT8} | {b['size_bytes'] / 1024:.0f} | {b['latency_ms']:.3f} | "
        f"{b['p90_ms']:.3f} | {f['cosine_vs_tf_fp16']:.5f} / {f['cosine_min_vs_tf_fp16']:.5f} "
        f"| {f['top1_agreement_vs_tf_fp16']:.3f} |",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0, help="latency timing budget")
    parser.add_argument("--tf-python", help="a Python with tensorflow and tf2onnx (optional)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    host = detect_host_profile()
    with tempfile.TemporaryDirectory(prefix="edge-bench-tflite-") as tmp_name:
        tmp = Path(tmp_name)
        print("## our writer", flush=True)
        result: dict[str, Any] = {
            "benchmark": "tflite",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpu": _cpu_name(), "cores": host.cores},
            "writer": part_writer(tmp, args.seconds),
        }
        if args.tf_python:
            print("## against TensorFlow's TFLiteConverter", flush=True)
            result["tensorflow"] = part_tensorflow(tmp, args.tf_python, args.seconds)
    result["targets"] = targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tflite.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "tflite.md").write_text(md)
    print("\n" + md)
    return 0 if all(t["met"] is not False for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
