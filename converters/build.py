"""``edge-convert build``: each profile's preferred artifact, validated, packed into one signed
bundle with everything the device needs to trust, run and watch the model.

For each profile the first format in its ``formats`` list is made (ONNX ones through
onnxruntime's quantizer, TFLite ones through our own writer: no TensorFlow). Profiles that ask for
the same thing share one conversion, and identical artifacts are stored once. If a format misses
the accuracy budget, the profile's next format is tried. Golden inputs and outputs are stored in
the ONNX model's layout; the device transposes them for an NHWC TFLite artifact. A streaming
model's state pairs (found as the device finds them, :mod:`converters.stateful`) are written to
the manifest's ``state``, and its golden input is the stream's first window with the initial
state.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import converters
from converters.convert import ConvertOptions, ConvertResult, convert
from converters.task import POSTPROCESS_KIND
from converters.validate import is_classifier_output
from edge_agent.errors import AccuracyBudgetError, ConfigError
from edge_agent.model.postprocess import ctc_charset, looks_like_characters
from edge_agent.model.profiles import DeviceProfile

log = logging.getLogger(__name__)

GOLDEN_FILE = "golden.npz"
#: How close a device's run of the golden input must come to the expected outputs.
GOLDEN_MIN_COSINE = 0.98


@dataclass(frozen=True)
class BuildOptions:
    output: Path
    profiles: tuple[DeviceProfile, ...]
    sign_key: Path
    name: str
    version: str = "1.0.0"
    labels: tuple[str, ...] | None = None
    task: str = "auto"
    source: str | None = None

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ConfigError("build needs at least one --profile")
        if not self.name.strip():
            raise ConfigError("--name: must not be empty")


def _text_postprocess(
    judged: Any, chars: Sequence[str], result: ConvertResult, *, given: str = "--labels"
) -> dict[str, Any]:
    """A CTC recognizer given ``--labels`` a character file (or carrying its dictionary:
    ``given`` names where the characters came from): the bundle reads its output as text (kind
    ``text``), with the blank the converter found (the class it says most)."""
    names = list(result.golden_outputs)
    name = names[judged.outputs[0]]
    out = np.asarray(result.golden_outputs[name], np.float64)
    classes, blank = int(out.shape[-1]), int(judged.blank or 0)
    read = ctc_charset(chars, classes, blank_last=blank == classes - 1 and blank != 0)
    if read is None or read[1] != blank:
        raise ConfigError(
            f"{given} has {len(chars)} lines for the {classes} classes of CTC output '{name}' "
            f"(its blank, the class it says most, is class {blank}; it must be the first or "
            "the last): give one character a line, C - 1 lines without the blank, C - 2 "
            "(PP-OCR's space last), or C with the blank first"
        )
    return {"kind": "text", "output": name, "labels": list(read[0]), "blank": blank,
            "softmax": not _probabilities(out.reshape(-1, classes)[:8])}  # fmt: skip


#: where a recognizer's characters came from when the model file carries them
_OWN_DICTIONARY = "the model's dictionary (metadata 'character')"


def _probabilities(rows: np.ndarray) -> bool:
    """Whether every row holds probabilities (non-negative, summing to 1): the device needs no
    softmax for them."""
    return bool(np.all(rows >= 0) and np.all(np.abs(rows.sum(axis=-1) - 1.0) < 1e-3))


def _postprocess(task: str, labels: Sequence[str] | None, result: ConvertResult) -> dict[str, Any]:
    """The bundle's ``postprocess`` block: the ``--task`` given, else the task the converter
    judged the model on (a detector's decoding options and metadata labels included)."""
    state = {p.output for p in result.state_pairs}
    classifier = [
        name
        for name, arr in result.golden_outputs.items()
        if is_classifier_output(np.asarray(arr)) and name not in state
    ]
    judged = result.task
    if task == "auto":
        if judged is not None and judged.kind != "classify":
            task = POSTPROCESS_KIND[judged.kind]
        else:
            task = "classification" if classifier else "raw"
    task = POSTPROCESS_KIND.get(task, task)  # classify / detect / ctc / mask as their kinds
    post: dict[str, Any] = {"kind": task}
    if task == "detection" and judged is not None and judged.kind == "detect":
        post = judged.to_postprocess()
        names = list(result.golden_outputs)
        if judged.outputs:
            post["output"] = names[judged.outputs[0]]
            if post.get("format") == "ssd":
                post["scores_output"] = names[judged.outputs[1]]
        if labels is None and judged.labels:
            labels = judged.labels
    if task == "raw" and judged is not None and judged.kind == "ctc":
        if labels is not None and looks_like_characters(labels):
            return _text_postprocess(judged, labels, result)
        own = judged.labels  # the dictionary the file carries (RapidOCR's)
        if labels is None and own is not None and looks_like_characters(own):
            try:
                return _text_postprocess(judged, own, result, given=_OWN_DICTIONARY)
            except ConfigError as exc:  # the file's own, not the user's: shipped raw, said
                log.warning("%s; the bundle reports the output raw", exc)
    if labels is not None:  # a line of one space is a character, not a class name
        labels = [x for x in labels if x.strip()]
    if task == "classification":
        if not classifier:
            raise ConfigError("--task classification: the model has no [N, classes] float output")
        name = classifier[0]  # the output accuracy was measured on (class_predictions)
        n_classes = int(np.asarray(result.golden_outputs[name]).shape[1])
        post["output"] = name
        post["num_classes"] = n_classes
        row = np.asarray(result.golden_outputs[name], np.float64)[:1]
        post["softmax"] = not _probabilities(row)
        if labels is not None:
            if len(labels) != n_classes:
                raise ConfigError(
                    f"--labels has {len(labels)} labels but output '{name}' has {n_classes} classes"
                )
            post["labels"] = list(labels)
    elif labels is not None:
        post["labels"] = list(labels)
    return post


def build_bundle(
    model: onnx.ModelProto,
    *,
    options: BuildOptions,
    make_options: Callable[[str, DeviceProfile], ConvertOptions],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    original_size: int | None = None,
) -> dict[str, Any]:
    """Convert for every profile, sign and write the bundle; return the build report."""
    from edge_agent.model.bundle import ArtifactInput, write_bundle
    from edge_agent.model.keys import key_id, load_private_key

    signing_key = load_private_key(options.sign_key)  # fail before any slow work
    notes: list[str] = []
    done: dict[tuple[Any, ...], ConvertResult] = {}
    chosen: dict[str, tuple[str, tuple[Any, ...]]] = {}  # profile -> (format, key)
    failures: dict[str, list[str]] = {}
    for profile in options.profiles:
        for fmt in profile.formats:  # every artifact format is producible (formats.py)
            opts = make_options(fmt, profile)
            schemes = (opts.schemes or profile.int8_schemes) if fmt == "onnx-int8" else ()
            key = (fmt, schemes, opts.host_profile, profile.threads, opts.int8_io)
            if key not in done:
                try:
                    done[key] = convert(
                        model, options=opts, input_shapes=input_shapes, original_size=original_size
                    )
                except AccuracyBudgetError as exc:
                    failures.setdefault(profile.name, []).append(str(exc))
                    continue
            chosen[profile.name] = (fmt, key)
            break
        else:
            reasons = "; ".join(failures.get(profile.name, [])) or "no producible format"
            raise AccuracyBudgetError(
                f"profile {profile.name}: no artifact met the budget ({reasons})"
            )
        if failures.get(profile.name):
            notes.append(
                f"{profile.name}: fell back to {chosen[profile.name][0]} "
                f"({failures[profile.name][0]})"
            )

    with tempfile.TemporaryDirectory(prefix="edge-build-") as tmp_name:
        tmp = Path(tmp_name)
        # One artifact per distinct model file.
        by_hash: dict[str, dict[str, Any]] = {}
        for profile_name, (fmt, key) in chosen.items():
            result = done[key]
            digest = hashlib.sha256(result.model_bytes).hexdigest()
            if digest not in by_hash:
                scheme = result.report.get("int8_scheme")
                stem = fmt.replace("onnx-", "") + (f"-{scheme}" if scheme else "")
                suffix = ".tflite" if fmt.startswith("tflite") else ".onnx"
                path = tmp / f"model.{stem}{suffix}"
                path.write_bytes(result.model_bytes)
                by_hash[digest] = {"fmt": fmt, "path": path, "result": result, "profiles": []}
            by_hash[digest]["profiles"].append(profile_name)

        first: ConvertResult = next(iter(by_hash.values()))["result"]
        golden_arrays: dict[str, np.ndarray] = {}
        golden_inputs = {}
        for i, (name, arr) in enumerate(first.golden_inputs.items()):
            golden_inputs[name] = f"input_{i}"
            golden_arrays[f"input_{i}"] = np.asarray(arr)
        expected: dict[str, dict[str, str]] = {}
        artifacts = []
        validation = []
        for a_index, entry in enumerate(by_hash.values()):
            result, fmt = entry["result"], entry["fmt"]
            report = result.report
            arc_name = f"artifacts/{entry['path'].name}"
            outs = {}
            for o_index, (name, arr) in enumerate(result.golden_outputs.items()):
                k = f"expected_{a_index}_{o_index}"
                golden_arrays[k] = np.asarray(arr)
                outs[name] = k
            expected[arc_name] = outs
            extra: dict[str, Any] = {
                "runtime_needs": {"litert": ">=1.0"}
                if fmt.startswith("tflite")
                else {"onnxruntime": ">=1.18", "opset": result.canonical.opset}
            }
            if report.get("int8_scheme"):
                extra["int8_scheme"] = report["int8_scheme"]
            if report.get("float_nodes"):
                extra["float_nodes"] = [n["node"] for n in report["float_nodes"]]
            artifacts.append(
                ArtifactInput(
                    path=entry["path"],
                    format=fmt,
                    precision=fmt.split("-", 1)[1],
                    profiles=tuple(entry["profiles"]),
                    extra=extra,
                    name=arc_name,
                )
            )
            validation.append(
                {
                    "artifact": arc_name,
                    "format": fmt,
                    "int8_scheme": report.get("int8_scheme"),
                    "profiles": entry["profiles"],
                    "size_bytes": report["size_bytes"]["converted"],
                    "latency_ms": report["latency_ms"]["converted"],
                    "latency_ms_original": report["latency_ms"]["original"],
                    "cosine": report["fidelity"].get("cosine"),
                    "top1_agreement": report["fidelity"].get("top1_agreement"),
                    "max_abs_error": report["fidelity"].get("max_abs_error"),
                    "accuracy": report["accuracy"]["converted"],
                    "accuracy_original": report["accuracy"]["original"],
                    "float_nodes": len(report.get("float_nodes") or []),
                    "validation": report["validation"],
                    "warnings": report.get("warnings", []),
                }
            )
        golden_path = tmp / GOLDEN_FILE
        with golden_path.open("wb") as fh:
            np.savez(fh, **golden_arrays)  # type: ignore[arg-type]

        stats = next(
            (
                e["result"].calibration_stats
                for e in by_hash.values()
                if e["result"].calibration_stats
            ),
            None,
        )
        manifest: dict[str, Any] = {
            "name": options.name,
            "version": options.version,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "converter": {"name": "edge-convert", "version": converters.__version__},
            "source": {"file": options.source, "size_bytes": original_size},
            "inputs": [{**s, "quantization": None} for s in first.input_specs],
            "outputs": [{**s, "quantization": None} for s in first.output_specs],
            "preprocess": None if first.preprocess is None else first.preprocess.to_dict(),
            "postprocess": _postprocess(options.task, options.labels, first),
            "golden": {
                "file": GOLDEN_FILE,
                "inputs": golden_inputs,
                "expected": expected,
                "tolerance": {"min_cosine": GOLDEN_MIN_COSINE, "top1_must_match": True},
            },
            "validation": validation,
            "calibration_stats": stats,
        }
        if first.state_pairs:
            manifest["state"] = [p.to_manifest() for p in first.state_pairs]
        final = write_bundle(
            options.output,
            manifest=manifest,
            artifacts=artifacts,
            files={GOLDEN_FILE: golden_path},
            signing_key=signing_key,
        )
    orig = first.report
    return {
        "output": str(options.output),
        "name": options.name,
        "version": options.version,
        "key_id": key_id(signing_key.public_key()),
        "bundle_size_bytes": options.output.stat().st_size,
        "original": {
            "size_bytes": orig["size_bytes"]["original"],
            "latency_ms": orig["latency_ms"]["original"],
            "accuracy": orig["accuracy"]["original"],
        },
        "artifacts": [
            {**v, "profiles": a["profiles"], "sha256": a["sha256"]}
            for v, a in zip(validation, final["artifacts"])
        ],
        "profiles": {p: {"format": f} for p, (f, _) in chosen.items()},
        "notes": notes,
        "warnings": sorted({w for v in validation for w in v["warnings"]}),
        "reports": [e["result"].report for e in by_hash.values()],
    }
