"""Pruning benchmark (``make bench``): measured, not derived from FLOPs.

- 30 % structured pruning of a ResNet-style and a MobileNetV2-style net at 160 px: latency of
  the pruned model against the unpruned one (onnxruntime, 2 threads, batch 1, median of
  interleaved runs), with channel counts kept to multiples of 8 (the default) and of 16;
- the trained digits CNN pruned 20 % with least-squares recovery: the accuracy drop;
- magnitude pruning at 50 % sparsity: the signed bundle's size against the unpruned model's
  bundle (an fp32 artifact, and the int8 one the x86-64 profile builds).

Writes ``benchmarks/results/prune.json`` and ``prune.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.convert import RESULTS, _cpu_name, digits_files, targets_markdown
from converters import prune as P
from converters import zoo
from converters.canonical import canonicalize
from converters.pruning import PruneOptions, prune_model
from converters.validate import make_session, measure_latency
from edge_agent.model.profiles import detect_host_profile, load_profile

THREADS = 2


def _latency(tmp: Path, seconds: float) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    for name, net in (
        ("resnet-style-160", zoo.resnet_style()),
        ("mobilenetv2-160", zoo.mobilenet_v2_style()),
    ):
        model = canonicalize(
            onnx.load_from_string(zoo.export_onnx(net, (1, 3, 160, 160), dynamic_batch=False))
        ).model
        x = rng.standard_normal((1, 3, 160, 160)).astype(np.float32)
        sessions = {"unpruned": make_session(model.SerializeToString(), threads=THREADS)}
        pruned = {}
        for mult in (8, 16):
            pr = P.prune_channels(model, 0.3, multiple=mult)
            pruned[mult] = pr
            sessions[f"30% (x{mult})"] = make_session(pr.model.SerializeToString(), threads=THREADS)
        lat = measure_latency(sessions, {model.graph.input[0].name: x}, seconds=seconds)
        base = lat["unpruned"].median_ms
        for key, value in lat.items():
            m_of = int(key.split("x")[1].rstrip(")")) if "x" in key else None
            got = pruned.get(m_of) if m_of else None
            chans = None
            if got is not None:
                chans = round(
                    1 - sum(g["kept"] for g in got.groups) / sum(g["channels"] for g in got.groups),
                    4,
                )
            row = {
                "model": name, "variant": key, "latency_ms": round(value.median_ms, 4),
                "latency_ratio": round(value.median_ms / base, 4), "runs": value.runs,
                "params_ratio": 1.0 if got is None else round(P.param_count(got.model) / P.param_count(model), 4),
                "channels_removed": chans,
            }  # fmt: skip
            rows.append(row)
            print(f"  {row}", flush=True)
    return rows


def _digits(tmp: Path) -> dict[str, Any]:
    p, cal, ev = digits_files(tmp)
    out = {}
    for label, recover in (("with recovery", True), ("without recovery", False)):
        opts = PruneOptions(
            structured=0.2, calibration=cal, eval=ev,
            recover=recover, channel_multiple=1, latency_seconds=0.5,
        )  # fmt: skip
        rep = prune_model(onnx.load(str(p)), opts).report
        out[label] = {
            "accuracy_original": round(rep["accuracy"]["original"], 3),
            "accuracy": round(rep["accuracy"]["pruned"], 3),
            "drop": round(rep["accuracy"]["drop"], 3),
            "params_ratio": rep["params"]["ratio"],
        }
        print(f"  digits 20% {label}: {out[label]}", flush=True)
    return out


def _bundles(tmp: Path) -> dict[str, Any]:
    from converters.build import BuildOptions, build_bundle
    from converters.convert import ConvertOptions
    from edge_agent.model.keys import generate_keypair

    priv, _pub = generate_keypair(tmp / "keys")
    model = canonicalize(
        onnx.load_from_string(zoo.export_onnx(zoo.resnet_style(), (1, 3, 64, 64)))
    ).model
    cal = tmp / "img-cal.npz"
    np.savez(cal, x=np.random.default_rng(1).standard_normal((32, 3, 64, 64)).astype(np.float32))
    sparse, _ = P.magnitude_prune(model, 0.5)
    host = detect_host_profile()
    fp32_profile = dataclasses.replace(load_profile("x86-64"), formats=("onnx-fp32",))
    out: dict[str, Any] = {}
    for label, profile in (("fp32", fp32_profile), ("int8", host)):
        sizes = {}
        for which, m in (("unpruned", model), ("50% sparse", sparse)):
            path = tmp / f"{label}-{which.split('%')[0]}.edgebundle"
            build_bundle(
                m,
                options=BuildOptions(output=path, profiles=(profile,), sign_key=priv, name="r"),
                make_options=lambda fmt, prof: ConvertOptions(
                    fmt=fmt, profile=prof, calibration=cal, latency_seconds=0.2, min_cosine=0.9
                ),
            )
            sizes[which] = path.stat().st_size
        out[label] = {**sizes, "ratio": round(sizes["50% sparse"] / sizes["unpruned"], 4)}
        print(f"  bundle {label}: {out[label]}", flush=True)
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: Any, limit: str, ok: bool) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": ok})

    for model in ("resnet-style-160", "mobilenetv2-160"):
        r = next(x for x in result["latency"] if x["model"] == model and x["variant"] == "30% (x8)")
        add(f"30% structured, {model}: latency / unpruned (channels x8)", r["latency_ratio"],
            "<= 0.75", r["latency_ratio"] <= 0.75)  # fmt: skip
    d = result["digits"]["with recovery"]["drop"]
    add("digits CNN 20% with recovery: accuracy drop (points)", d, "<= 1.0", d <= 1.0)
    b = result["bundles"]["fp32"]["ratio"]
    add("50% magnitude sparsity: bundle / unpruned bundle (fp32 artifact)", b, "<= 0.6", b <= 0.6)
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Pruning benchmark, {result['when']}, {m['cpu']} ({m['cores']} cores), onnxruntime "
        f"{THREADS} threads, batch 1, median of interleaved runs. `make bench`.",
        "",
        "| model | variant | latency ms | latency × | params × | channels removed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["latency"]:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['latency_ms']:.3f} | {r['latency_ratio']:.3f} | "
            f"{r['params_ratio']:.3f} | {'-' if r['channels_removed'] is None else r['channels_removed']} |"
        )
    lines += ["", "| digits CNN, 20 % structured | accuracy % (fp32) | drop | params × |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for k, v in result["digits"].items():
        lines.append(f"| {k} | {v['accuracy']} ({v['accuracy_original']}) | {v['drop']} | "
                     f"{v['params_ratio']} |")  # fmt: skip
    lines += ["", "| bundle (ResNet-style) | unpruned bytes | 50 % sparse bytes | ratio |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for k, v in result["bundles"].items():
        lines.append(f"| {k} artifact | {v['unpruned']} | {v['50% sparse']} | {v['ratio']} |")
    lines += targets_markdown(result["targets"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0, help="latency timing per model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    host = detect_host_profile()
    with tempfile.TemporaryDirectory(prefix="edge-bench-prune-") as tmp_name:
        tmp = Path(tmp_name)
        print("## structured latency", flush=True)
        lat = _latency(tmp, args.seconds)
        print("## digits", flush=True)
        digits = _digits(tmp)
        print("## bundles", flush=True)
        bundles = _bundles(tmp)
    result: dict[str, Any] = {
        "benchmark": "prune",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": _cpu_name(), "cores": host.cores},
        "latency": lat,
        "digits": digits,
        "bundles": bundles,
    }
    result["targets"] = targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "prune.md").write_text(md)
    print("\n" + md)
    return 0 if all(t["met"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
