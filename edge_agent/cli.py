"""``edge-agent``: the on-device command line.

``run`` serves a model over a source; ``check-config`` validates a config file without starting;
``bench`` compares the raw runtime with the full pipeline. Errors are one line on stderr.

Exit codes: ``edge_agent.errors.AgentExit`` (sysexits.h, so that systemd's
``RestartPreventExitStatus=78`` works), listed in ``docs/cli.md``: 0 done, 2 usage, 65 model
unusable, 66 source unavailable, 69 broker unavailable, 70 internal error, 74 bundle failed
verification, 75 update could not go ahead, 78 configuration error.

Planning (profile, threads, workers, the model for that plan) lives in ``edge_agent.model.plan``;
this module parses and dispatches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.common.argtypes import float_list
from edge_agent.errors import AgentExit, ConfigError, EdgeError, agent_exit_code
from edge_agent.model.formats import POSTPROCESS_CHOICES, RESIZE_MODES, SOFTMAX_CHOICES
from edge_agent.model.plan import resolve_profile

PROG = "edge-agent"


def build_parser() -> argparse.ArgumentParser:
    """Every option says what it does and its default; a flag left out keeps the config file's
    value (``[section] key``), and the config's own default applies when the file has none."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a model on a camera, video, image or sensor source.",
        epilog="exit codes: 0 ok, 2 usage, 65 model unusable, 66 source unavailable, 69 broker "
        "unavailable, 70 internal error, 74 bundle failed verification, 75 update failed, "
        "78 configuration error (the only one systemd does not restart)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="debug logging and the traceback of an error (default: info, one-line errors)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", type=Path, metavar="FILE",
            help="agent.toml to read (default: /etc/edge-agent/agent.toml when it exists, else "
            "built-in defaults; every key: docs/agent-config.md)",
        )  # fmt: skip

    def common(p: argparse.ArgumentParser, *, plan: bool = True) -> None:
        """The options of run, tune and bench; ``plan=False`` (tune, which measures the plan)
        leaves out --threads and --workers."""
        config_option(p)
        p.add_argument(
            "--model", metavar="PATH",
            help="a signed .edgebundle, or a bare .onnx / .tflite file (default: [model] path)",
        )  # fmt: skip
        p.add_argument(
            "--source", metavar="URI|NAME=URI", action="append",
            help="camera:N, /dev/videoN, rpicam:N (a Pi camera), rtsp://…, http(s)://…, "
            "udp://…, tcp://…, file:PATH, images:GLOB, wav:PATH, alsa:DEVICE, "
            "sensor:stdin, sensor:file:PATH, sensor:udp://HOST:PORT, synthetic:?… "
            "(default: [source] uri; the URI list: docs/agent.md). Repeat it as NAME=URI to "
            "serve several named streams with one model (default: [[sources]])",
        )  # fmt: skip
        p.add_argument(
            "--pace", choices=("none", "native"),
            help="files, images and synthetic: none = as fast as possible, native = at their "
            "own frame rate, as a camera would (default: [source] pace, none)",
        )  # fmt: skip
        p.add_argument(
            "--profile", metavar="NAME|FILE.toml",
            help="device profile (default: [agent] profile, auto = detected from the board)",
        )  # fmt: skip
        p.add_argument(
            "--state-dir", metavar="DIR",
            help="where installed models, the spool and the OTA state live "
            "(default: [agent] state_dir, /var/lib/edge-agent)",
        )  # fmt: skip
        p.add_argument(
            "--trusted-key", action="append", metavar="PUB|DIR",
            help="public key (or a directory of .pub files) a bundle's signature must match; "
            "repeatable (default: [model] trusted_keys, /etc/edge-agent/trusted-keys)",
        )  # fmt: skip
        if plan:
            p.add_argument(
                "--threads", type=int, metavar="N",
                help="runtime threads in all, >= 0 (default: [model] threads, 0 = the "
                "profile's plan)",
            )  # fmt: skip
            p.add_argument(
                "--workers", type=int, metavar="N",
                help="frames inferred at once (default: [pipeline] workers, 0 = auto: several "
                "for a file at pace none with a slow model, else 1; see docs/agent.md)",
            )  # fmt: skip
        p.add_argument(
            "--mean", type=float_list, metavar="M[,M,M]",
            help="a bare model's per-channel mean, subtracted after scaling to 0-1 "
            "(default: [preprocess] mean, none; bundles carry their own)",
        )  # fmt: skip
        p.add_argument(
            "--std", type=float_list, metavar="S[,S,S]",
            help="a bare model's per-channel std, divided by after the mean "
            "(default: [preprocess] std, none)",
        )  # fmt: skip
        p.add_argument(
            "--channels", choices=("rgb", "bgr", "gray"),
            help="a bare model's channel order (default: [preprocess] channels, from the model)",
        )  # fmt: skip
        p.add_argument(
            "--resize", choices=RESIZE_MODES,
            help="how a frame is fitted to a bare model's input: stretch, letterbox (aspect "
            "kept, padded), crop (aspect kept, the middle cut out) or pad-right (the height "
            "fitted, the width in proportion, padded on the right: PaddleOCR's text lines) "
            "(default: [preprocess] resize, stretch; letterbox for a YOLO export, crop for an "
            "Ultralytics classifier, pad-right for a PaddleOCR recognizer)",
        )  # fmt: skip
        for side in ("width", "height"):
            p.add_argument(
                f"--{side}", type=int, metavar="PX",
                help=f"a bare model's input {side} when the model leaves it dynamic (an OCR "
                f"recognizer's width) (default: [preprocess] {side}, from the model"
                + ("; 320 for a PaddleOCR recognizer)" if side == "width" else ")"),
            )  # fmt: skip
        p.add_argument(
            "--labels", metavar="FILE",
            help="class labels, one per line, for a bare model (default: [model] labels, none; "
            "bundles carry their own)",
        )  # fmt: skip
        p.add_argument(
            "--softmax", choices=SOFTMAX_CHOICES,
            help="a bare model's class scores, with --labels: a softmax over them (default: "
            "[model] softmax, auto: when they are logits, outside [0, 1])",
        )  # fmt: skip
        p.add_argument(
            "--postprocess", choices=POSTPROCESS_CHOICES,
            help="a bare model's outputs: auto, detections from a detector it recognises (an SSD "
            "or EfficientDet-Lite TFLite file, a YOLO export) and classes with labels; or raw "
            "(default: [model] postprocess, auto)",
        )  # fmt: skip
        p.add_argument(
            "--window", metavar="SIZE,HOP,CHANNELS",
            help="sensor sources: samples per window, samples between window starts, values per "
            "sample (default: [source] window_*, or the URI's ?size=&hop=&channels=)",
        )  # fmt: skip

    p = sub.add_parser("run", help="serve the model until the source ends or SIGTERM")
    common(p)
    p.add_argument(
        "--max-frames", type=int, metavar="N",
        help="stop after N results (default: [pipeline] max_frames, 0 = until the source ends)",
    )  # fmt: skip
    p.add_argument(
        "--results", action="append", metavar="jsonl:PATH|stdout",
        help="where results go; repeatable (default: [results] sinks, stdout)",
    )  # fmt: skip
    p.add_argument(
        "--device-id", metavar="NAME",
        help="this device's name in topics and results (default: [agent] device_id, the hostname)",
    )  # fmt: skip
    p.add_argument(
        "--broker", metavar="mqtt://HOST:PORT|mqtts://HOST:PORT",
        help="publish results, telemetry and events over MQTT and follow OTA updates "
        "(default: [mqtt] broker, none: no MQTT)",
    )  # fmt: skip
    p.add_argument(
        "--motion-gate", type=float, metavar="T",
        help="skip inference while the scene is static: mean absolute change of a 32x32 grey "
        "thumbnail below T, 0-255 (default: [pipeline] motion_gate, 0 = off)",
    )  # fmt: skip
    p.add_argument(
        "--summary", type=Path, metavar="FILE.json",
        help="write the run's summary (frames, results, drops, latency) here at exit "
        "(default: not written)",
    )  # fmt: skip
    p.add_argument(
        "--rest-port", type=int, metavar="PORT",
        help="also serve TF Serving-style REST predictions on 127.0.0.1:PORT, 0 = any free port "
        "(default: [rest] enabled and port, off)",
    )  # fmt: skip

    p = sub.add_parser(
        "tune",
        help="measure the fastest threads/workers plan for this model and source, and cache it",
    )
    common(p, plan=False)
    p.add_argument(
        "--seconds", type=float, default=3.0, metavar="S",
        help="time to spend measuring, over all the plans tried (default: 3)",
    )  # fmt: skip

    p = sub.add_parser("check-config", help="validate the configuration and exit")
    config_option(p)

    p = sub.add_parser("bench", help="raw runtime vs naive loop vs the pipeline, side by side")
    common(p)
    p.add_argument(
        "--frames", type=int, default=300, metavar="N",
        help="frames per measurement, >= 1 (default: 300)",
    )  # fmt: skip
    return parser


def _window(text: str | None) -> tuple[int | None, int | None, int | None]:
    if text is None:
        return None, None, None
    try:
        size, hop, channels = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--window {text}: expected SIZE,HOP,CHANNELS") from None
    return size, hop, channels


_NAMED = re.compile(r"([A-Za-z0-9_.-]{1,64})=(.+)")


def _sources(given: Sequence[str] | None) -> tuple[str | None, list[tuple[str, str]]]:
    """``--source`` as given: (one URI, no streams) or (None, [(name, URI), ...])."""
    if not given:
        return None, []
    named = [_NAMED.fullmatch(g) for g in given]
    if len(given) == 1 and named[0] is None:
        return given[0], []
    if all(m is not None for m in named):
        pairs = [(m.group(1), m.group(2)) for m in named if m is not None]
        names = [n for n, _ in pairs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"--source {dupes[0]}=…: the name is used twice")
        return None, pairs
    bad = next(g for g, m in zip(given, named) if m is None)
    raise ConfigError(
        f"--source {bad}: with several sources, name each one: --source NAME=URI "
        "(e.g. --source front=rtsp://cam1/stream --source back=rpicam:0)"
    )


def load_effective_config(args: argparse.Namespace) -> Any:
    from edge_agent.config import StreamSection, load_config, with_overrides

    config = load_config(args.config)
    size, hop, channels = _window(getattr(args, "window", None))
    uri, streams = _sources(getattr(args, "source", None))
    if streams:  # named streams from the command line replace the file's source(s)
        config = dataclasses.replace(
            config,
            source=dataclasses.replace(config.source, uri=""),
            sources=tuple(
                StreamSection(
                    name=name,
                    uri=u,
                    pace=getattr(args, "pace", None) or "none",
                    window_size=size or 0,
                    window_hop=hop or 0,
                    window_channels=channels or 0,
                )
                for name, u in streams
            ),
        )
    elif uri is not None and config.sources:  # one source from the command line: just that
        config = dataclasses.replace(config, sources=())
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
            "softmax": getattr(args, "softmax", None),
            "postprocess": getattr(args, "postprocess", None),
        },
        preprocess={
            "mean": getattr(args, "mean", None),
            "std": getattr(args, "std", None),
            "channels": getattr(args, "channels", None),
            "resize": getattr(args, "resize", None),
            "width": getattr(args, "width", None),
            "height": getattr(args, "height", None),
        },
        source={
            "uri": uri,
            "pace": getattr(args, "pace", None),
            "window_size": size,
            "window_hop": hop,
            "window_channels": channels,
        },
        results={"sinks": getattr(args, "results", None)},
        rest={"port": getattr(args, "rest_port", None)},  # checked here; the service serves it
        mqtt={"broker": getattr(args, "broker", None)},
        pipeline={
            "max_frames": getattr(args, "max_frames", None),
            "motion_gate": getattr(args, "motion_gate", None),
            "workers": getattr(args, "workers", None),
        },
    )


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
        if args.command == "tune":
            return cmd_tune(args)
        return cmd_run(args)
    except EdgeError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return agent_exit_code(exc)
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {exc} (rerun with --verbose)",
            file=sys.stderr,
        )
        return AgentExit.SOFTWARE


def cmd_check_config(args: argparse.Namespace) -> int:
    from edge_agent.config import check_without_side_effects, load_config

    config = load_config(args.config)
    profile = resolve_profile(config.agent.profile)
    check_without_side_effects(config)
    print(
        f"config OK: {config.path or '(defaults)'}; profile {profile.name}; "
        f"device {config.device_id}"
    )
    return AgentExit.OK


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.service import Service

    service = Service(load_effective_config(args), summary_path=args.summary)
    service.rest_port = getattr(args, "rest_port", None)
    return service.run()


def _one_source(config: Any, command: str) -> Any:
    """``config`` when it names one source; a ConfigError for ``command`` otherwise."""
    if config.sources:
        raise ConfigError(
            f"edge-agent {command} measures one source: pass --source URI (one stream of "
            f"{', '.join(s.name for s in config.sources)}), not NAME=URI or [[sources]]"
        )
    return config


def cmd_tune(args: argparse.Namespace) -> int:
    from edge_agent.tune import run_tune

    config = _one_source(load_effective_config(args), "tune")
    config.require_runnable()
    result = run_tune(config, resolve_profile(config.agent.profile), seconds=args.seconds)
    print(json.dumps(result, indent=2))
    return AgentExit.OK


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.bench import run_bench

    config = _one_source(load_effective_config(args), "bench")
    if not config.model.path:
        raise ConfigError("bench needs --model PATH")
    result = run_bench(config, frames=args.frames, profile=resolve_profile(config.agent.profile))
    print(json.dumps(result, indent=2))
    return AgentExit.OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
