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
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.common.argtypes import float_list
from edge_agent.errors import AgentExit, ConfigError, EdgeError, agent_exit_code
from edge_agent.model.plan import resolve_profile

PROG = "edge-agent"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a model on a camera, video, image or sensor source.",
        epilog="exit codes: 0 ok, 2 usage, 65 model unusable, 66 source unavailable, 69 broker "
        "unavailable, 70 internal error, 74 bundle failed verification, 75 update failed, "
        "78 configuration error (the only one systemd does not restart)",
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
    from edge_agent.config import load_config

    config = load_config(args.config)
    profile = resolve_profile(config.agent.profile)
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


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.bench import run_bench

    config = load_effective_config(args)
    if not config.model.path:
        raise ConfigError("bench needs --model PATH")
    result = run_bench(config, frames=args.frames, profile=resolve_profile(config.agent.profile))
    print(json.dumps(result, indent=2))
    return AgentExit.OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
