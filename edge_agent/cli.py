"""``edge-agent``: the on-device command line.

``run`` serves a model over a source; ``check-config`` validates a config file without starting;
``bench`` compares the raw runtime with the full pipeline. Errors are one line on stderr.

Exit codes (sysexits.h, so systemd's ``RestartPreventExitStatus=78`` works):

==== ============================================================================
0    done: a finite source ended, ``--max-frames`` reached, or SIGTERM/SIGINT
2    usage: bad command-line syntax (argparse)
65   EX_DATAERR: the model is unusable (unreadable, golden test failed, does not fit)
66   EX_NOINPUT: the source cannot be opened
70   EX_SOFTWARE: internal error (a bug)
74   EX_IOERR: a bundle failed verification
78   EX_CONFIG: configuration error (bad file, key, value, profile or missing keys)
==== ============================================================================
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.errors import BundleError, ConfigError, EdgeError, ModelError, SourceError

PROG = "edge-agent"
EX_OK, EX_DATAERR, EX_NOINPUT, EX_SOFTWARE, EX_IOERR, EX_CONFIG = 0, 65, 66, 70, 74, 78


def exit_code_for(exc: EdgeError) -> int:
    if isinstance(exc, ConfigError):
        return EX_CONFIG
    if isinstance(exc, BundleError):
        return EX_IOERR
    if isinstance(exc, SourceError):
        return EX_NOINPUT
    if isinstance(exc, ModelError):
        return EX_DATAERR
    return EX_CONFIG


def float_list(text: str) -> tuple[float, ...]:
    """argparse type for ``--mean 0.485,0.456,0.406`` (both command lines use it)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a model on a camera, video, image or sensor source.",
        epilog="exit codes: 0 ok, 2 usage, 65 model unusable, 66 source unavailable, 70 internal "
        "error, 74 bundle failed verification, 78 configuration error",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", type=Path, help="agent.toml (default /etc/edge-agent/agent.toml)"
        )
        p.add_argument("--model", help=".edgebundle, .onnx or .tflite")
        p.add_argument(
            "--source",
            help="camera:0, /dev/video0, rtsp://…, file:PATH, images:GLOB, sensor:stdin, "
            "synthetic:",
        )
        p.add_argument("--pace", choices=("none", "native"))
        p.add_argument("--profile", help="device profile name or .toml (default: detected)")
        p.add_argument(
            "--state-dir", help="installed models live here (default /var/lib/edge-agent)"
        )
        p.add_argument(
            "--trusted-key", action="append", help="public key or directory (repeatable)"
        )
        p.add_argument("--threads", type=int, help="runtime threads (default: the profile's plan)")
        p.add_argument(
            "--workers",
            type=int,
            metavar="N",
            help="frames inferred at once (default: auto, see docs/agent.md)",
        )
        p.add_argument("--mean", type=float_list, metavar="M[,M,M]")
        p.add_argument("--std", type=float_list, metavar="S[,S,S]")
        p.add_argument("--channels", choices=("rgb", "bgr", "gray"))
        p.add_argument("--resize", choices=("stretch", "letterbox"))
        p.add_argument("--labels", help="class labels file for a bare model")
        p.add_argument("--window", metavar="SIZE,HOP,CHANNELS", help="sensor windows")

    p = sub.add_parser("run", help="serve the model until the source ends or SIGTERM")
    common(p)
    p.add_argument("--max-frames", type=int, metavar="N")
    p.add_argument("--results", action="append", metavar="jsonl:PATH|stdout")
    p.add_argument("--device-id", help="this device's name in topics (default: the hostname)")
    p.add_argument(
        "--broker",
        metavar="mqtt://HOST:PORT|mqtts://HOST:PORT",
        help="publish results, telemetry and events over MQTT and follow OTA updates",
    )
    p.add_argument("--motion-gate", type=float, metavar="T", help="skip static frames (0 = off)")
    p.add_argument("--summary", type=Path, metavar="FILE.json", help="write the run summary here")
    p.add_argument(
        "--rest-port",
        type=int,
        metavar="PORT",
        help="serve TF Serving-style REST predictions on 127.0.0.1:PORT (0 = any free port)",
    )

    p = sub.add_parser("check-config", help="validate the configuration and exit")
    p.add_argument("--config", type=Path)

    p = sub.add_parser("bench", help="raw runtime vs full pipeline throughput, side by side")
    common(p)
    p.add_argument("--frames", type=int, default=300)
    return parser


def _window(text: str | None) -> tuple[int | None, int | None, int | None]:
    if text is None:
        return None, None, None
    try:
        size, hop, channels = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--window {text}: expected SIZE,HOP,CHANNELS") from None
    return size, hop, channels


def load_effective_config(args: argparse.Namespace) -> Any:
    from edge_agent.config import load_config, with_overrides

    config = load_config(args.config)
    size, hop, channels = _window(getattr(args, "window", None))
    keys = [str(k) for k in args.trusted_key] if getattr(args, "trusted_key", None) else None
    return with_overrides(
        config,
        agent={
            "device_id": getattr(args, "device_id", None),
            "profile": getattr(args, "profile", None),
            "state_dir": getattr(args, "state_dir", None),
        },
        model={
            "path": getattr(args, "model", None),
            "trusted_keys": keys,
            "threads": getattr(args, "threads", None),
            "labels": getattr(args, "labels", None),
        },
        preprocess={
            "mean": getattr(args, "mean", None),
            "std": getattr(args, "std", None),
            "channels": getattr(args, "channels", None),
            "resize": getattr(args, "resize", None),
        },
        source={
            "uri": getattr(args, "source", None),
            "pace": getattr(args, "pace", None),
            "window_size": size,
            "window_hop": hop,
            "window_channels": channels,
        },
        results={"sinks": getattr(args, "results", None)},
        mqtt={"broker": getattr(args, "broker", None)},
        pipeline={
            "max_frames": getattr(args, "max_frames", None),
            "motion_gate": getattr(args, "motion_gate", None),
            "workers": getattr(args, "workers", None),
        },
    )


def resolve_profile(name: str) -> Any:
    from edge_agent.model.profiles import detect_device_profile, load_profile

    return detect_device_profile() if name == "auto" else load_profile(name)


def thread_plan(profile: Any, *, requested: int, source_kind: str) -> int:
    """Runtime threads: what was asked for, else all cores on 1-2 core boards (decoding then
    shares them, which measured best here) and all but one core on bigger ones, leaving that
    core to the capture thread's decoding and preprocessing."""
    if requested:
        return requested
    cores = int(profile.cores)
    if source_kind != "image" or cores <= 2:
        return max(1, min(profile.threads, cores))
    return max(1, min(profile.threads, cores - 1))


#: Throughput mode runs at most this many frames at once (memory: one set of activations each).
MAX_WORKERS = 4
#: Throughput mode only pays for a model whose warm inference takes at least this long: decoding
#: and preprocessing a 640x480 frame costs about 0.7 ms of CPU, and with a faster model a second
#: worker starves the capture thread instead (the measurements: docs/agent.md, "Workers").
THROUGHPUT_MIN_MS = 5.0


def worker_plan(*, requested: int, threads: int, source: Any, pace: str) -> int:
    """Inference workers: what was asked for, else one per runtime thread (each inferring its own
    frame with one intra-op thread) when the source is throughput-bound (a video file, images or
    a synthetic source at pace none: nobody waits on a frame's latency), else one worker with
    every thread (live and paced sources: the newest frame as fast as possible)."""
    if requested:
        return requested
    if getattr(source, "live", True) or getattr(source, "kind", "") != "image" or pace != "none":
        return 1  # sensor stdin / tailed files are finite but arrive in real time
    return max(1, min(threads, MAX_WORKERS))


def open_planned_model(config: Any, profile: Any, *, threads: int, source: Any) -> tuple[Any, int]:
    """The model, loaded for the worker plan: configured workers as asked; in auto mode one
    worker, reloaded for throughput mode when the source is throughput-bound and a warm
    inference takes at least ``THROUGHPUT_MIN_MS``. Returns (model, planned workers)."""
    requested = int(config.pipeline.workers)
    workers = worker_plan(
        requested=requested, threads=threads, source=source, pace=config.source.pace
    )
    if requested or workers == 1:
        return open_model(config, profile, threads=threads, workers=workers), workers
    model = open_model(config, profile, threads=threads)
    if model.warm_ms < THROUGHPUT_MIN_MS or not getattr(model.runtime, "concurrent", False):
        return model, 1
    model.close()
    return open_model(config, profile, threads=threads, workers=workers), workers


def open_model(config: Any, profile: Any, *, threads: int, workers: int = 1) -> Any:
    from edge_agent.model.keys import load_trusted_keys
    from edge_agent.model.loader import load_model

    model_path = Path(config.model.path)
    keys = None
    if model_path.suffix == ".edgebundle":
        keys = load_trusted_keys([Path(k) for k in config.model.trusted_keys])
    labels = None
    if config.model.labels:
        label_path = Path(config.model.labels)
        if not label_path.is_file():
            raise ConfigError(f"config: [model] labels = {config.model.labels!r}: no such file")
        labels = tuple(line.strip() for line in label_path.read_text().splitlines() if line.strip())
    return load_model(
        model_path,
        profile=profile,
        state_dir=Path(config.agent.state_dir),
        trusted_keys=keys,
        threads=threads,
        preprocess_overrides=config.preprocess.overrides(),
        labels=labels,
        workers=workers,
    )


def open_source_from(config: Any) -> Any:
    from edge_agent.io import WindowSpec, open_source

    s = config.source
    window = None
    if s.window_size:
        window = WindowSpec(
            size=s.window_size, hop=s.window_hop or s.window_size, channels=s.window_channels or 1
        )
    return open_source(s.uri, pace=s.pace, window=window)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "bench":
            return cmd_bench(args)
        return cmd_run(args)
    except EdgeError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {exc} (rerun with --verbose)",
            file=sys.stderr,
        )
        return EX_SOFTWARE


def cmd_check_config(args: argparse.Namespace) -> int:
    from edge_agent.config import load_config

    config = load_config(args.config)
    profile = resolve_profile(config.agent.profile)
    print(
        f"config OK: {config.path or '(defaults)'}; profile {profile.name}; "
        f"device {config.device_id}"
    )
    return EX_OK


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.service import Service

    service = Service(load_effective_config(args), summary_path=args.summary)
    service.rest_port = getattr(args, "rest_port", None)
    return service.run()


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.bench import run_bench

    config = load_effective_config(args)
    if not config.model.path:
        raise ConfigError("bench needs --model PATH")
    result = run_bench(config, frames=args.frames, profile=resolve_profile(config.agent.profile))
    print(json.dumps(result, indent=2))
    return EX_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
