"""``edge-convert``: the desktop converter's command line.

Subcommands: ``quantize``, ``prune``, ``build``, ``verify``, ``inspect``, ``keygen``. Errors are
one line on stderr and an exit code (0 ok, 1 internal error, 2 bad input, 3 accuracy budget not met,
4 bundle failed verification); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.convert import QUANTIZE_FORMATS
from converters.task import ALIASES, TASKS
from edge_agent.common.argtypes import float_list
from edge_agent.common.durable import atomic_write
from edge_agent.errors import EXIT_INTERNAL, EXIT_OK, ConfigError, EdgeError
from edge_agent.model.formats import CALIBRATION_METHODS, label_lines
from edge_agent.model.preprocess import CHANNEL_ORDERS, LAYOUTS, RESIZE_MODES

PROG = "edge-convert"


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", type=Path, help="ONNX, TorchScript/.pt2, sklearn pickle, Keras or SavedModel"
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="fix an input's shape, e.g. input=1,3,224,224 (repeatable)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a pickle/joblib model (this runs code from the file)",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration", type=Path, metavar="PATH", help=".npy/.npz samples or an image directory"
    )
    p.add_argument(
        "--eval", type=Path, metavar="PATH", help="held-out .npz with x (inputs) and y (labels)"
    )
    p.add_argument(
        "--max-accuracy-drop", type=float, metavar="POINTS", help="accuracy budget (needs labels)"
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        metavar="C",
        help="fidelity floor: mean cosine similarity per output (default 0.99 without a budget)",
    )
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="minmax")
    p.add_argument("--max-calibration-samples", type=int, default=256, metavar="N")
    p.add_argument(
        "--max-eval-samples",
        type=int,
        default=1000,
        metavar="N",
        help="validate on at most N samples (default 1000)",
    )
    p.add_argument(
        "--no-float-fallback",
        action="store_true",
        help="fail instead of keeping quantization-sensitive nodes in float",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=1.5,
        metavar="S",
        help="time spent timing latency per candidate set (default 1.5)",
    )
    p.add_argument(
        "--scheme",
        action="append",
        default=[],
        metavar="SCHEME",
        help="int8 scheme(s) to try instead of the profile's, e.g. u8s8-rr-qop (repeatable)",
    )
    p.add_argument(
        "--io-type",
        choices=("float", "int8"),
        default="float",
        help="tflite-int8: float32 inputs/outputs quantized inside the model (default), or int8 "
        "ones with their scale and zero point in the model",
    )
    g = p.add_argument_group("image preprocessing (image-directory calibration and the bundle)")
    g.add_argument("--mean", type=float_list, metavar="M[,M,M]")
    g.add_argument("--std", type=float_list, metavar="S[,S,S]")
    g.add_argument(
        "--scale", type=float, metavar="F", help="pixel scale before mean/std (default 1/255)"
    )
    g.add_argument("--channels", choices=CHANNEL_ORDERS)
    g.add_argument("--resize", choices=RESIZE_MODES)
    g.add_argument("--layout", choices=LAYOUTS)


def _add_task_floor(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-task-metric",
        type=float,
        metavar="V",
        help="floor on the task metric: detection F1, CTC sequence agreement, mask IoU, binary "
        "decision agreement, top-1 agreement (default 0.95 / 0.97 / 0.95 / 0.98 / none)",
    )


def _add_prune_options(p: Any, *, prefix: str) -> None:
    """The pruning flags: ``--structured`` ... for ``prune``, ``--prune-structured`` ... for
    ``build``."""
    p.add_argument(
        f"--{prefix}structured",
        type=float,
        metavar="RATIO",
        help="remove this fraction of the channels of every prunable channel group",
    )
    p.add_argument(
        f"--{prefix}unstructured",
        type=float,
        metavar="SPARSITY",
        help="zero this fraction of the weights by magnitude (compressed size only)",
    )
    p.add_argument(
        f"--{prefix}target-latency",
        type=float,
        metavar="MS",
        help="choose per-group ratios by sensitivity until latency reaches MS",
    )
    p.add_argument(
        f"--{prefix}target-size",
        type=int,
        metavar="BYTES",
        help="choose per-group ratios by sensitivity until the model is at most BYTES",
    )
    p.add_argument(
        f"--{prefix}include-first-last",
        action="store_true",
        help="unstructured: prune the first and last weighted layers too (skipped by default)",
    )
    p.add_argument(
        f"--{prefix}score",
        choices=("l1", "l2"),
        default="l1",
        help="structured: rank channels by the L1 (default) or L2 norm of their filters",
    )
    p.add_argument(
        f"--{prefix}per-layer",
        action="store_true",
        help="unstructured: the sparsity in every layer, not one global threshold",
    )
    p.add_argument(
        f"--{prefix}channel-multiple",
        type=int,
        default=8,
        metavar="N",
        help="keep channel counts a multiple of N (default 8: fast kernels)",
    )
    p.add_argument(f"--{prefix}no-recovery", action="store_true",
                   help="skip the least-squares recovery on the calibration data")  # fmt: skip


def _prune_options(args: argparse.Namespace, *, prefix: str, threads: int) -> Any:
    from converters.pruning import PruneOptions

    def get(key: str) -> Any:
        return getattr(args, f"{prefix}{key}")

    modes = (get("structured"), get("unstructured"), get("target_latency"), get("target_size"))
    if prefix and all(m is None for m in modes):
        return None  # build without pruning (prune itself refuses: PruneOptions says why)
    return PruneOptions(
        structured=get("structured"),
        unstructured=get("unstructured"),
        target_latency_ms=get("target_latency"),
        target_size_bytes=get("target_size"),
        skip_first_last=not get("include_first_last"),
        score=get("score"),
        calibration=args.calibration,
        eval=args.eval,
        max_accuracy_drop=args.max_accuracy_drop,
        min_cosine=args.min_cosine,
        per_layer=get("per_layer"),
        channel_multiple=get("channel_multiple"),
        recover=not get("no_recovery"),
        threads=threads,
        latency_seconds=args.latency_seconds,
        max_calibration_samples=args.max_calibration_samples,
        max_validation_samples=args.max_eval_samples,
        preprocess_overrides=_preprocess_overrides(args),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Import, quantize, validate and sign models for edge devices.",
        epilog="exit codes: 0 ok, 1 internal error, 2 bad input, 3 accuracy budget not met, "
        "4 bundle failed verification",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show tracebacks and debug logs"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("quantize", help="convert one model to one format and validate it")
    _add_model_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT")
    p.add_argument("--format", required=True, choices=QUANTIZE_FORMATS)
    p.add_argument("--profile", metavar="NAME", help="target device profile (default: this host)")
    p.add_argument("--report", type=Path, metavar="REPORT.json")
    p.add_argument(
        "--task",
        choices=("auto", *TASKS, *ALIASES),
        default="auto",
        help="what the model is for, judged by its task metric (default: from its outputs)",
    )
    _add_task_floor(p)
    _add_data_options(p)

    p = sub.add_parser(
        "prune", help="prune a model (structured channels, magnitude, or to a target latency)"
    )
    _add_model_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx")
    mode = p.add_argument_group("what to prune (one of the first three; --unstructured combines)")
    _add_prune_options(mode, prefix="")
    p.add_argument("--report", type=Path, metavar="REPORT.json")
    _add_data_options(p)

    p = sub.add_parser(
        "build", help="make each profile's preferred artifacts and pack a signed bundle"
    )
    _add_model_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.edgebundle")
    p.add_argument("--profile", action="append", required=True, metavar="NAME", help="repeatable")
    _add_prune_options(
        p.add_argument_group("pruning before conversion (as edge-convert prune)"), prefix="prune-"
    )
    p.add_argument("--sign-key", type=Path, required=True, metavar="KEY", help="edge-signing.key")
    p.add_argument("--name", help="model name (default: the file's stem)")
    p.add_argument("--version", default="1.0.0", help="semantic version (default 1.0.0)")
    p.add_argument("--labels", type=Path, metavar="FILE", help="class labels, one per line")
    p.add_argument(
        "--task",
        choices=("auto", *ALIASES, *TASKS),
        default="auto",
        help="what the model is for: the task metric judged and the bundle's postprocessing "
        "(default: from its outputs and metadata)",
    )
    _add_task_floor(p)
    p.add_argument("--report", type=Path, metavar="REPORT.json")
    _add_data_options(p)

    p = sub.add_parser("verify", help="verify a bundle's signature and every artifact's hash")
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--public-key",
        type=Path,
        action="append",
        required=True,
        metavar="KEY",
        help="trusted .pub file or directory of them (repeatable, for key rotation)",
    )

    p = sub.add_parser("inspect", help="show a model's inputs, outputs, opset and operators")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("keygen", help="write an Ed25519 signing key pair")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        handler = {
            "quantize": cmd_quantize,
            "prune": cmd_prune,
            "build": cmd_build,
            "verify": cmd_verify,
            "inspect": cmd_inspect,
            "keygen": cmd_keygen,
        }[args.command]
        return handler(args)
    except EdgeError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so, briefly
        if args.verbose:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {exc} (rerun with --verbose for the "
            "traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


# --- helpers ----------------------------------------------------------------------------------


def _input_shapes(values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    from converters.importers import parse_input_shape

    shapes: dict[str, tuple[int, ...]] = {}
    for text in values:
        name, dims = parse_input_shape(text)
        shapes[name] = dims
    return shapes


def _preprocess_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("mean", "std", "scale", "channels", "resize", "layout"):
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    return out


def _host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _profile(name: str | None) -> Any:
    from edge_agent.model.profiles import detect_host_profile, load_profile

    return detect_host_profile() if name is None else load_profile(name)


def _path_size(path: Path) -> int:
    """A model's size on disk: a directory's files, or an ONNX file plus its external data."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    size = path.stat().st_size
    if path.suffix == ".onnx":
        import onnx

        try:
            model = onnx.load_model(str(path), load_external_data=False)
        except Exception:
            return size  # the importer reports what is wrong with it
        locations = {
            entry.value
            for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL
            for entry in t.external_data
            if entry.key == "location"
        }
        for loc in locations:
            data = path.parent / loc
            if data.is_file():
                size += data.stat().st_size
    return size


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, tuple[int, ...]], int]:
    from converters.importers import import_model

    if not args.model.exists():
        raise ConfigError(f"{args.model}: no such file or directory")
    shapes = _input_shapes(args.input_shape)
    model = import_model(args.model, input_shapes=shapes or None, trust_pickle=args.trust_pickle)
    return model, shapes, _path_size(args.model)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: no partial output (the folder
    is created first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def _check_writable(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.exists():
        raise ConfigError(f"{path}: the directory {parent} does not exist")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a file name")


def _options(args: argparse.Namespace, *, fmt: str, profile: Any) -> Any:
    from converters.convert import ConvertOptions

    return ConvertOptions(
        fmt=fmt,
        profile=profile,
        calibration=args.calibration,
        eval=args.eval,
        max_accuracy_drop=args.max_accuracy_drop,
        min_cosine=args.min_cosine,
        calibration_method=args.calibration_method,
        preprocess_overrides=_preprocess_overrides(args),
        max_calibration_samples=args.max_calibration_samples,
        max_validation_samples=args.max_eval_samples,
        schemes=tuple(args.scheme),
        latency_seconds=args.latency_seconds,
        float_fallback=not args.no_float_fallback,
        host_profile=profile.arch == _host_arch(),
        # quantize: ConvertOptions refuses int8 I/O for another format; build: tflite-int8 only
        int8_io=args.io_type == "int8" and (args.command == "quantize" or fmt == "tflite-int8"),
        task=getattr(args, "task", "auto"),
        min_task_metric=getattr(args, "min_task_metric", None),
    )


# --- quantize ---------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> int:
    from converters.convert import convert
    from converters.report import summary_table

    _check_writable(args.output)
    want = ".tflite" if args.format.startswith("tflite") else ".onnx"
    if args.output.suffix != want:
        raise ConfigError(f"-o {args.output}: a {args.format} model is written as {want}")
    if args.report is not None:
        _check_writable(args.report)
    model, shapes, size = _load(args)
    profile = _profile(args.profile)
    options = _options(args, fmt=args.format, profile=profile)
    result = convert(model, options=options, input_shapes=shapes or None, original_size=size)
    report = result.report
    report["output"] = str(args.output)
    report["source"] = str(args.model)
    atomic_write_bytes(args.output, result.model_bytes)
    if args.report is not None:
        atomic_write_bytes(
            args.report, (json.dumps(report, indent=2, default=_json) + "\n").encode()
        )
    print(summary_table(report))
    return EXIT_OK


def _json(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(value)


# --- prune ------------------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> int:
    from converters.pruning import prune_model
    from converters.report import prune_summary

    _check_writable(args.output)
    if args.output.suffix != ".onnx":
        raise ConfigError(f"-o {args.output}: the pruned model is written as .onnx")
    if args.report is not None:
        _check_writable(args.report)
    options = _prune_options(args, prefix="", threads=_profile(None).threads)
    model, shapes, _size = _load(args)
    result = prune_model(model, options, input_shapes=shapes or None)
    report = result.report
    report["output"], report["source"] = str(args.output), str(args.model)
    atomic_write_bytes(args.output, result.model.SerializeToString())
    if args.report is not None:
        atomic_write_bytes(
            args.report, (json.dumps(report, indent=2, default=_json) + "\n").encode()
        )
    print(prune_summary(report))
    return EXIT_OK


# --- build ------------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    from converters.build import BuildOptions, build_bundle

    _check_writable(args.output)
    if args.report is not None:
        _check_writable(args.report)
    model, shapes, size = _load(args)
    prune_opts = _prune_options(args, prefix="prune_", threads=_profile(None).threads)
    pruning = None
    if prune_opts is not None:
        from converters.pruning import prune_model

        pruned = prune_model(model, prune_opts, input_shapes=shapes or None)
        model, pruning = pruned.model, pruned.report
    labels = None
    if args.labels is not None:
        if not args.labels.is_file():
            raise ConfigError(f"--labels {args.labels}: no such file")
        labels = list(label_lines(args.labels.read_text()))
    profiles = [_profile(name) for name in args.profile]
    report = build_bundle(
        model,
        options=BuildOptions(
            output=args.output,
            profiles=tuple(profiles),
            sign_key=args.sign_key,
            name=args.name or args.model.stem,
            version=args.version,
            labels=tuple(labels) if labels else None,
            task=args.task,
            source=str(args.model),
        ),
        make_options=lambda fmt, profile: _options(args, fmt=fmt, profile=profile),
        input_shapes=shapes or None,
        original_size=size,
    )
    if pruning is not None:
        report["pruning"] = pruning
    if args.report is not None:
        atomic_write_bytes(
            args.report, (json.dumps(report, indent=2, default=_json) + "\n").encode()
        )
    from converters.report import build_summary

    print(build_summary(report))
    return EXIT_OK


# --- verify / inspect / keygen ----------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from edge_agent.model.bundle import verify_bundle
    from edge_agent.model.keys import load_trusted_keys

    if not args.bundle.is_file():
        raise ConfigError(f"{args.bundle}: no such file")
    keys = load_trusted_keys(args.public_key)
    verified = verify_bundle(args.bundle, trusted_keys=keys)
    m = verified.manifest
    print(f"OK  {args.bundle}: {m['name']} {m['version']}, signed by key {verified.key_id}")
    for art in m["artifacts"]:
        print(
            f"    {art['path']:<40} {art['format']:<18} {art['size']:>10} B  sha256 "
            f"{art['sha256'][:16]}…  profiles: {', '.join(art['profiles'])}"
        )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from converters.inspect import describe, render

    info = describe(args.model)
    print(json.dumps(info, indent=2, default=_json) if args.json else render(info))
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    from edge_agent.model.keys import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(args.out, overwrite=args.force)
    print(f"wrote {private} (private, mode 0600: keep it off devices)")
    print(f"wrote {public} (public: install on devices as a trusted key)")
    print(f"key id {key_id(load_public_key(public))}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
