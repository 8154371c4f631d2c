"""Converter benchmark (``make bench``): for a few models, fp32 vs fp16 vs our int8 vs
onnxruntime's ``quantize_static`` with its defaults (and with per-channel, the usual hand-tuned
setting), side by side in one run: size, latency (median of interleaved batch-1 runs, 2 threads),
fidelity, and accuracy on the digits test split.

Part 2, models shaped like real exports (``converters/standins.py``, trained briefly here): a
YOLOv8-style detector, an SVTR-style CTC recognizer, a DB-style text detector, and a
mobile-SDK-style TFLite model (NHWC, fp16 weights behind DEQUANTIZE). Each is converted with our
defaults to onnx-int8 and tflite-int8 (the TFLite one imported first) and set beside
``quantize_static`` with its defaults: the task metric against fp32 (detection F1, CTC sequence
agreement, mask IoU), cosine, size, latency, and the conversion time.

Writes ``benchmarks/results/convert.json`` and ``convert.md``; prints the table and the targets.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from converters import zoo
from converters.canonical import fix_ir_version
from converters.convert import ConvertOptions, convert
from converters.data import load_dataset
from converters.quantize import FeedReader, _quiet
from converters.validate import (
    accuracy,
    compare_outputs,
    concat,
    make_session,
    measure_latency,
    run_all,
)
from edge_agent.errors import EdgeError
from edge_agent.model.profiles import detect_host_profile

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _models(tmp: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    models = []
    cnn, data = zoo.train_digits_cnn(width=64)
    p = tmp / "digits.onnx"
    p.write_bytes(zoo.export_onnx(cnn, (1, 1, 8, 8)))
    np.savez(tmp / "digits-cal.npz", x=data.x_train[:256])
    np.savez(tmp / "digits-eval.npz", x=data.x_test, y=data.y_test)
    models.append(
        {
            "name": "digits-cnn",
            "path": p,
            "cal": tmp / "digits-cal.npz",
            "eval": tmp / "digits-eval.npz",
        }
    )
    cal = tmp / "img-cal.npz"
    np.savez(cal, x=rng.standard_normal((96, 3, 160, 160)).astype(np.float32))
    for name, net, opset in (
        ("resnet-style-160", zoo.resnet_style(), 17),
        ("mobilenetv2-160", zoo.mobilenet_v2_style(), 17),
        ("resnet-style-160-opset11", zoo.resnet_style(seed=1), 11),
    ):
        p = tmp / f"{name}.onnx"
        p.write_bytes(zoo.export_onnx(net, (1, 3, 160, 160), opset=opset))
        models.append({"name": name, "path": p, "cal": cal, "eval": None})
    return models


def _ort_default(
    src: Path, out: Path, cal: Path, *, per_channel: bool
) -> tuple[Path | None, str | None]:
    """onnxruntime.quantization.quantize_static as a user calls it: defaults, same data."""
    from onnxruntime.quantization import quantize_static

    model = onnx.load(str(src))
    name = model.graph.input[0].name
    shape = [d.dim_value or None for d in model.graph.input[0].type.tensor_type.shape.dim]
    ds = load_dataset(cal, input_specs=[{"name": name, "shape": shape, "dtype": "float32"}])
    try:
        with _quiet():
            quantize_static(
                str(src),
                str(out),
                FeedReader(ds.batches(batch=1, stop=200)),
                per_channel=per_channel,
            )
        make_session(str(out))
        return out, None
    except Exception as exc:  # what a user would hit
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"


def bench(seconds: float) -> dict[str, Any]:
    host = detect_host_profile()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for m in _models(tmp):
            print(f"\n## {m['name']}", flush=True)
            imported = onnx.load(str(m["path"]))
            outputs: dict[str, Path] = {}
            reports: dict[str, dict[str, Any]] = {}
            for fmt in ("onnx-fp32", "onnx-fp16", "onnx-int8"):
                opts = ConvertOptions(
                    fmt=fmt,
                    profile=host,
                    calibration=m["cal"],
                    eval=m["eval"],
                    max_accuracy_drop=0.5 if m["eval"] else None,
                    latency_seconds=0.5,
                )
                try:
                    res = convert(imported, options=opts, original_size=m["path"].stat().st_size)
                except EdgeError as exc:
                    print(f"  {fmt}: {exc}")
                    continue
                path = tmp / f"{m['name']}.{fmt}.onnx"
                path.write_bytes(res.model_bytes)
                outputs[f"ours {fmt}"] = path
                reports[f"ours {fmt}"] = res.report
            for label, per_channel in (
                ("ort quantize_static defaults", False),
                ("ort quantize_static per-channel", True),
            ):
                path, err = _ort_default(
                    m["path"],
                    tmp / f"{m['name']}.{label[-8:]}.onnx",
                    m["cal"],
                    per_channel=per_channel,
                )
                if path is not None:
                    outputs[label] = path
                else:
                    rows.append({"model": m["name"], "variant": label, "error": err})
                    print(f"  {label}: FAILED {err}")
            # Side by side: fidelity and accuracy against the original, latency interleaved.
            orig_bytes = imported.SerializeToString()
            om = onnx.ModelProto.FromString(orig_bytes)
            fix_ir_version(om)
            specs = [
                {
                    "name": i.name,
                    "shape": [d.dim_value or None for d in i.type.tensor_type.shape.dim],
                    "dtype": "float32",
                }
                for i in om.graph.input
            ]
            val = load_dataset(m["eval"] or m["cal"], input_specs=specs)
            lo = 0 if m["eval"] else len(val) - 32
            feeds = list(val.batches(batch=1, start=lo))
            labels = val.read_labels(lo) if m["eval"] else None
            sessions = {"original fp32": make_session(om.SerializeToString(), threads=2)}
            sessions.update({k: make_session(str(p), threads=2) for k, p in outputs.items()})
            ref = run_all(sessions["original fp32"], feeds)
            names = [o.name for o in sessions["original fp32"].get_outputs()]
            lat = measure_latency(sessions, feeds[0], seconds=seconds)
            base = lat["original fp32"].median_ms
            orig_size = m["path"].stat().st_size
            for key, sess in sessions.items():
                got = run_all(sess, feeds)
                fid = compare_outputs(ref, got, names)
                size = orig_size if key == "original fp32" else outputs[key].stat().st_size
                row = {
                    "model": m["name"],
                    "variant": key,
                    "size_bytes": size,
                    "size_ratio": round(size / orig_size, 4),
                    "latency_ms": round(lat[key].median_ms, 4),
                    "latency_ratio": round(lat[key].median_ms / base, 4),
                    "runs": lat[key].runs,
                    "cosine": fid["cosine"],
                    "top1_agreement": fid["top1_agreement"],
                    "accuracy": accuracy(concat(got), labels) if labels is not None else None,
                    "int8_scheme": reports.get(key, {}).get("int8_scheme"),
                    "float_nodes": len(reports.get(key, {}).get("float_nodes") or []),
                }
                rows.append(row)
                print(
                    f"  {key:<34} {size / 1024:9.1f} KB x{row['size_ratio']:.3f}  "
                    f"{row['latency_ms']:8.3f} ms x{row['latency_ratio']:.3f}  "
                    f"cos {row['cosine']:.5f}"
                    + (f"  acc {row['accuracy']:.2f}" if row["accuracy"] is not None else "")
                    + (f"  [{row['int8_scheme']}]" if row["int8_scheme"] else ""),
                    flush=True,
                )
            val.close()
    return {**_empty(), "rows": rows, "targets": targets(rows)}


def _standins(tmp: Path) -> list[dict[str, Any]]:
    """The stand-ins, written as a user would have them: a model file, calibration .npy, an
    evaluation .npz."""
    from converters import standins

    out = []
    for name, make, floor in (
        # yolov8n's width (16) exported at 160 px: trained at 96 like the toy below, then exported
        # at a size where, as at yolov8n's usual 320-640, convolutions outweigh per-op costs
        (
            "yolov8n-style",
            lambda: standins.yolov8_style(width=16, export_size=160),
            ("f1", 0.95),
        ),
        ("yolov8-style", standins.yolov8_style, ("f1", 0.95)),
        ("svtr-style", getattr(standins, "svtr_style", None), ("sequence_agreement", 0.97)),
        ("db-style", getattr(standins, "db_style", None), ("iou", 0.95)),
    ):
        if make is None:
            continue
        t0 = time.perf_counter()
        d = make()
        print(f"  built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        path = tmp / f"{name}.onnx"
        path.write_bytes(d.onnx)
        cal, ev = tmp / f"{name}-cal.npy", tmp / f"{name}-eval.npz"
        np.save(cal, d.calibration)
        np.savez(ev, x=_eval_inputs(d))
        out.append({"name": name, "path": path, "cal": cal, "eval": ev, "floor": floor})
    # A mobile-SDK-style .tflite: NHWC, fp16 weights behind DEQUANTIZE (our writer's
    # tflite-fp16, TFLite's standard float16 scheme), of a MobileNetV2-style net at 160.
    from converters.canonical import canonicalize
    from converters.tflite import onnx_to_tflite

    net = zoo.mobilenet_v2_style()
    canon = canonicalize(onnx.load_from_string(zoo.export_onnx(net, (1, 3, 160, 160), opset=13)))
    path = tmp / "mobile-sdk-fp16.tflite"
    path.write_bytes(onnx_to_tflite(canon.model, fp16_weights=True))
    rng = np.random.default_rng(0)
    cal, ev = tmp / "mobile-cal.npy", tmp / "mobile-eval.npz"
    np.save(cal, rng.standard_normal((64, 3, 160, 160)).astype(np.float32))
    np.savez(ev, x=rng.standard_normal((32, 3, 160, 160)).astype(np.float32))
    out.append({"name": "mobile-sdk-tflite", "path": path, "cal": cal, "eval": ev, "floor": None})
    return out


def _eval_inputs(d: Any) -> np.ndarray:
    for key in ("eval_images", "eval_inputs", "eval_x", "eval"):
        if hasattr(d, key):
            return np.asarray(getattr(d, key))
    raise AttributeError(f"{type(d).__name__} has no evaluation inputs")


def bench_standins(seconds: float) -> list[dict[str, Any]]:
    """Part 2: every stand-in through our defaults and through quantize_static's."""
    from converters.importers import import_model
    from converters.task import infer_task, model_metadata, task_fidelity
    from converters.validate import LiteRTSession

    host = detect_host_profile()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-real-") as tmp_name:
        tmp = Path(tmp_name)
        for m in _standins(tmp):
            print(f"\n## {m['name']}", flush=True)
            imported = import_model(m["path"])
            orig = onnx.ModelProto.FromString(imported.SerializeToString())
            fix_ir_version(orig)
            made: dict[str, Path] = {}
            conv_s: dict[str, float] = {}
            reports: dict[str, dict[str, Any]] = {}
            for fmt in ("onnx-int8", "tflite-int8"):
                opts = ConvertOptions(
                    fmt=fmt, profile=host, calibration=m["cal"], eval=m["eval"],
                    latency_seconds=0.5,
                )  # fmt: skip
                t0 = time.perf_counter()
                try:
                    res = convert(imported, options=opts, original_size=m["path"].stat().st_size)
                except EdgeError as exc:
                    rows.append({"model": m["name"], "variant": f"ours {fmt}", "error": str(exc)})
                    print(f"  ours {fmt}: FAILED {exc}", flush=True)
                    continue
                conv_s[f"ours {fmt}"] = time.perf_counter() - t0
                made_path = tmp / (
                    f"{m['name']}.{fmt}" + (".tflite" if "tflite" in fmt else ".onnx")
                )
                made_path.write_bytes(res.model_bytes)
                made[f"ours {fmt}"] = made_path
                reports[f"ours {fmt}"] = res.report
            fp32 = tmp / f"{m['name']}.fp32.onnx"
            onnx.save(orig, str(fp32))
            label = "ort quantize_static defaults"
            path, err = _ort_default(
                fp32, tmp / f"{m['name']}.ort.onnx", m["cal"], per_channel=False
            )
            if path is None:
                rows.append({"model": m["name"], "variant": label, "error": err})
            else:
                made[label] = path
            specs = [
                {
                    "name": i.name,
                    "shape": [d.dim_value or None for d in i.type.tensor_type.shape.dim],
                }
                for i in orig.graph.input
            ]
            outs = [
                {
                    "name": o.name,
                    "shape": [d.dim_value or None for d in o.type.tensor_type.shape.dim],
                }
                for o in orig.graph.output
            ]
            val = load_dataset(m["eval"], input_specs=[{**s, "dtype": "float32"} for s in specs])
            feeds = list(val.batches(batch=1))
            sessions: dict[str, Any] = {
                "original fp32": make_session(orig.SerializeToString(), threads=2)
            }
            if m["path"].suffix == ".tflite":
                sessions["original .tflite (fp16 weights)"] = LiteRTSession(
                    m["path"], inputs=specs, outputs=outs, threads=2
                )
            for key, p in made.items():
                sessions[key] = (
                    LiteRTSession(p, inputs=specs, outputs=outs, threads=2)
                    if p.suffix == ".tflite"
                    else make_session(str(p), threads=2)
                )
            ref = run_all(sessions["original fp32"], feeds)
            names = [o["name"] for o in outs]
            task = infer_task(
                concat(ref), output_names=names, metadata=model_metadata(imported.metadata_props)
            )
            lat = measure_latency(sessions, feeds[0], seconds=seconds)
            base = lat["original fp32"].median_ms
            orig_size = fp32.stat().st_size
            for key, sess in sessions.items():
                got = run_all(sess, feeds)
                fid = compare_outputs(ref, got, names)
                tf = task_fidelity(task, ref, got)
                size = {"original fp32": orig_size}.get(key) or (
                    m["path"].stat().st_size
                    if key.startswith("original .tflite")
                    else made[key].stat().st_size
                )
                row = {
                    "model": m["name"],
                    "variant": key,
                    "task": task.kind,
                    "task_metric": tf["metric"],
                    "task_value": tf["value"],
                    "size_bytes": size,
                    "size_ratio": round(size / orig_size, 4),
                    "latency_ms": round(lat[key].median_ms, 4),
                    "latency_ratio": round(lat[key].median_ms / base, 4),
                    "cosine": fid["cosine"],
                    "convert_seconds": round(conv_s[key], 1) if key in conv_s else None,
                    "float_nodes": len(reports.get(key, {}).get("float_nodes") or []),
                    "floor": m["floor"],
                }
                rows.append(row)
                print(
                    f"  {key:<32} {size / 1024:9.1f} KB x{row['size_ratio']:.3f}  "
                    f"{row['latency_ms']:8.3f} ms x{row['latency_ratio']:.3f}  "
                    f"cos {row['cosine']:.4f}  {tf['metric']} {tf['value']}",
                    flush=True,
                )
            val.close()
    return rows


def standin_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: Any, limit: str, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": ok})

    for fmt in ("onnx-int8", "tflite-int8"):
        r = _row(rows, "yolov8n-style", f"ours {fmt}")
        add(
            f"YOLO-style {fmt}: F1 vs fp32",
            r and r["task_value"],
            ">= 0.95",
            r is not None and r["task_value"] >= 0.95,
        )
        add(
            f"YOLO-style {fmt}: latency / fp32",
            r and r["latency_ratio"],
            "<= 0.65",
            r is not None and r["latency_ratio"] <= 0.65,
        )
        add(
            f"YOLO-style {fmt}: size / fp32",
            r and r["size_ratio"],
            "<= 0.35",
            r is not None and r["size_ratio"] <= 0.35,
        )
    for fmt in ("onnx-int8", "tflite-int8"):  # the 96-px, width-8 toy: per-op costs dominate
        r = _row(rows, "yolov8-style", f"ours {fmt}")
        add(
            f"YOLO-style toy (96 px, width 8) {fmt}: F1 / latency / size (reported)",
            r and (r["task_value"], r["latency_ratio"], r["size_ratio"]),
            "-",
            None,
        )
    r = _row(rows, "yolov8n-style", "ort quantize_static defaults")
    add("YOLO-style, quantize_static defaults: F1 (reported)", r and r["task_value"], "-", None)
    add(
        "YOLO-style, quantize_static defaults: latency / fp32 (reported)",
        r and r["latency_ratio"],
        "-",
        None,
    )
    for fmt in ("onnx-int8", "tflite-int8"):
        r = _row(rows, "svtr-style", f"ours {fmt}")
        ok = (
            r is not None
            and r["task_value"] >= 0.97
            and r["size_ratio"] <= 0.40
            and r["latency_ratio"] <= 1.0
        )
        add(
            f"SVTR-style {fmt}: sequence agreement / size / latency",
            r and (r["task_value"], r["size_ratio"], r["latency_ratio"]),
            ">= 0.97, <= 0.40, <= 1.0",
            ok,
        )
        r = _row(rows, "db-style", f"ours {fmt}")
        ok = r is not None and r["task_value"] >= 0.95 and r["size_ratio"] <= 0.40
        add(
            f"DB-style {fmt}: mask IoU / size",
            r and (r["task_value"], r["size_ratio"]),
            ">= 0.95, <= 0.40",
            ok,
        )
    r = _row(rows, "mobile-sdk-tflite", "ours tflite-int8")
    o = _row(rows, "mobile-sdk-tflite", "original .tflite (fp16 weights)")
    add(
        "mobile-SDK .tflite -> tflite-int8: cosine",
        r and r["cosine"],
        ">= 0.99",
        r is not None and r["cosine"] >= 0.99,
    )
    faster = None if not (r and o) else round(r["latency_ms"] / o["latency_ms"], 4)
    add(
        "mobile-SDK .tflite -> tflite-int8: latency / the fp16 original",
        faster,
        "< 1.0",
        faster is not None and faster < 1.0,
    )
    secs = [r["convert_seconds"] for r in rows if r.get("convert_seconds") is not None]
    add(
        "slowest conversion (s)",
        max(secs) if secs else None,
        "<= 300",
        bool(secs) and max(secs) <= 300,
    )
    return out


def standins_markdown(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "### Models shaped like real exports (part 2)",
        "",
        "| model | variant | task metric | size KB | size × | latency ms | latency × | cosine | float nodes | convert s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['variant']} | failed: {r['error'][:160]} | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['task_metric']} {r['task_value']} | {r['size_bytes'] / 1024:.1f} | "
            f"{r['size_ratio']:.3f} | {r['latency_ms']:.3f} | {r['latency_ratio']:.3f} | {r['cosine']:.4f} | "
            f"{r['float_nodes']} | {r['convert_seconds'] if r['convert_seconds'] is not None else '-'} |"
        )
    return lines + targets_markdown(targets)


def _row(rows: list[dict[str, Any]], model: str, variant: str) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["model"] == model and r["variant"] == variant and "error" not in r),
        None,
    )


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float | None, limit: str, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": ok})

    r = _row(rows, "resnet-style-160", "ours onnx-int8")
    add(
        "int8 latency / fp32, ResNet-style",
        r and r["latency_ratio"],
        "<= 0.55",
        r is not None and r["latency_ratio"] <= 0.55,
    )
    for model in ("resnet-style-160", "mobilenetv2-160"):
        r = _row(rows, model, "ours onnx-int8")
        ok = r is not None and r["size_ratio"] <= 0.27 and r["float_nodes"] == 0
        add(f"int8 size / fp32, {model}", r and r["size_ratio"], "<= 0.27, nothing in float", ok)
    o, r = _row(rows, "digits-cnn", "original fp32"), _row(rows, "digits-cnn", "ours onnx-int8")
    drop = None if not (o and r) else round(o["accuracy"] - r["accuracy"], 3)
    add("digits int8 accuracy drop (points)", drop, "<= 0.5", drop is not None and drop <= 0.5)
    agreements = [
        r["top1_agreement"]
        for r in rows
        if r.get("variant") == "ours onnx-int8" and r.get("top1_agreement") is not None
    ]
    worst = min(agreements) if agreements else None
    add(
        "top-1 agreement, our int8 (worst model)",
        worst,
        ">= 0.99",
        worst is not None and worst >= 0.99,
    )
    ours11 = _row(rows, "resnet-style-160-opset11", "ours onnx-int8")
    add(
        "opset-11 fused-BN model quantizes and runs",
        None if ours11 is None else ours11["cosine"],
        "succeeds",
        ours11 is not None,
    )
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Converter benchmark, {result['when']}, {m['cpu']} ({m['cores']} cores; "
        f"{', '.join(m['features'])}), {result['threads']} threads, batch 1, median of "
        "interleaved runs. `make bench`.",
        "",
        "| model | variant | size KB | size × | latency ms | latency × | cosine | top-1 agree "
        "| accuracy % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | | | | |")
            continue
        variant = r["variant"] + (f" ({r['int8_scheme']})" if r.get("int8_scheme") else "")
        lines.append(
            f"| {r['model']} | {variant} | {r['size_bytes'] / 1024:.1f} | {r['size_ratio']:.3f} | "
            f"{r['latency_ms']:.3f} | {r['latency_ratio']:.3f} | {r['cosine']:.5f} | "
            f"{'-' if r['top1_agreement'] is None else format(r['top1_agreement'], '.4f')} | "
            f"{'-' if r['accuracy'] is None else format(r['accuracy'], '.2f')} |"
        )
    lines += targets_markdown(result["targets"])
    return "\n".join(lines) + "\n"


def targets_markdown(targets: list[dict[str, Any]]) -> list[str]:
    """The targets table every benchmark ends with (met: yes / NO / n/a when not run)."""
    lines = ["", "| target | value | limit | met |", "|---|---:|---|---|"]
    for t in targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['target']} | {t['value']} | {t['limit']} | {met} |")
    return lines


def save_results(out: Path, name: str, result: dict[str, Any], markdown: str) -> int:
    """``out/NAME.json`` and ``out/NAME.md``, the table printed; the exit code (1: a target
    missed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    return 0 if all(t["met"] is not False for t in result["targets"]) else 1


def digits_files(tmp: Path) -> tuple[Path, Path, Path]:
    """The trained digits CNN (.onnx), its calibration and its labelled eval split (.npz)."""
    cnn, data = zoo.train_digits_cnn()
    p = tmp / "digits.onnx"
    p.write_bytes(zoo.export_onnx(cnn, (1, 1, 8, 8)))
    np.savez(tmp / "digits-cal.npz", x=data.x_train[:256])
    np.savez(tmp / "digits-eval.npz", x=data.x_test, y=data.y_test)
    return p, tmp / "digits-cal.npz", tmp / "digits-eval.npz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="latency timing budget per model"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--part", choices=("all", "zoo", "standins"), default="all", help="run only one part"
    )
    args = parser.parse_args(argv)
    result = bench(args.seconds) if args.part != "standins" else _empty()
    if args.part != "zoo":
        result["standins"] = bench_standins(args.seconds)
        result["standin_targets"] = standin_targets(result["standins"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    if "standins" in result:
        md += "\n".join(standins_markdown(result["standins"], result["standin_targets"])) + "\n"
    (args.out / "convert.md").write_text(md)
    print("\n" + md)
    met = [t["met"] for t in result["targets"] + result.get("standin_targets", [])]
    return 0 if all(m is not False for m in met) else 1


def _empty() -> dict[str, Any]:
    """The result's header (when, where), with no rows yet."""
    host = detect_host_profile()
    return {
        "benchmark": "convert",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": _cpu_name(),
            "cores": host.cores,
            "features": list(host.cpu_features),
            "python": platform.python_version(),
        },
        "threads": 2,
        "rows": [],
        "targets": [],
    }


if __name__ == "__main__":
    sys.exit(main())
