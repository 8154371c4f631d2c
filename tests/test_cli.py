"""The CLI contract: build / verify / inspect / keygen, and every error path (exit code, one
line naming the problem, no partial output)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FAST = ("--latency-seconds", "0.2")


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("edge-convert: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, digits: Any, keys: Any) -> dict[str, Any]:
    """One real signed bundle for two profiles, built through the CLI."""
    from converters.cli import main

    root = tmp_path_factory.mktemp("bundle")
    labels = root / "labels.txt"
    labels.write_text("".join(f"digit-{i}\n" for i in range(10)))
    out, rep = root / "digits.edgebundle", root / "build.json"
    code = main(
        [
            "build", str(digits.onnx), "--profile", "x86-64", "--profile", "raspberry-pi-4",
            "--calibration", str(digits.calibration), "--eval", str(digits.eval),
            "--max-accuracy-drop", "1.0", "--labels", str(labels), "--sign-key", str(keys[0]),
            "--name", "digits", "--version", "1.2.3", "-o", str(out), "--report", str(rep),
            *FAST,
        ]
    )  # fmt: skip
    assert code == 0
    return {"path": out, "report": json.loads(rep.read_text()), "root": root}


def test_build_bundle_holds_what_the_device_needs(bundle: dict[str, Any], keys: Any) -> None:
    from edge_agent.model.bundle import verify_bundle
    from edge_agent.model.keys import load_trusted_keys

    verified = verify_bundle(bundle["path"], trusted_keys=load_trusted_keys([keys[1]]))
    m = verified.manifest
    assert m["name"] == "digits" and m["version"] == "1.2.3" and m["schema"] == 1
    profiles = {p for a in m["artifacts"] for p in a["profiles"]}
    assert profiles == {"x86-64", "raspberry-pi-4"}
    formats = {p: a["format"] for a in m["artifacts"] for p in a["profiles"]}
    assert formats == {"x86-64": "onnx-int8", "raspberry-pi-4": "tflite-int8"}
    for art in m["artifacts"]:
        assert len(art["sha256"]) == 64 and art["size"] > 0
        assert bool(art.get("int8_scheme")) == (art["format"] == "onnx-int8")
        assert art["path"].endswith(".tflite" if art["format"] == "tflite-int8" else ".onnx")
    assert m["inputs"][0]["shape"][1:] == [1, 8, 8]
    assert m["preprocess"]["channels"] == "gray" and m["preprocess"]["width"] == 8
    assert m["postprocess"]["kind"] == "classification"
    assert m["postprocess"]["labels"][3] == "digit-3" and m["postprocess"]["softmax"] is True
    assert m["golden"]["file"] == "golden.npz" and m["golden"]["tolerance"]["min_cosine"] > 0.9
    assert set(m["golden"]["expected"]) == {a["path"] for a in m["artifacts"]}
    stats = m["calibration_stats"]
    assert len(stats["inputs"]["input"]["mean"]) == 1 and stats["samples"] > 0
    assert abs(sum(stats["class_histogram"]) - 1) < 1e-3 and len(stats["class_histogram"]) == 10
    for v in m["validation"]:
        # The budget given is accuracy: that holds for every artifact, and so does fidelity
        assert v["accuracy_original"] - v["accuracy"] <= 1.0
        assert v["cosine"] > 0.99, v
    assert not any("produce" in n for n in bundle["report"]["notes"])


def test_golden_input_reproduces_expected_outputs(
    bundle: dict[str, Any], keys: Any, tmp_path: Path
) -> None:
    import onnxruntime as ort

    from edge_agent.model.bundle import extract_bundle
    from edge_agent.model.keys import load_trusted_keys

    dest = tmp_path / "x"
    verified = extract_bundle(bundle["path"], dest, trusted_keys=load_trusted_keys([keys[1]]))
    golden = verified.manifest["golden"]
    with np.load(dest / golden["file"], allow_pickle=False) as g:
        for art in verified.manifest["artifacts"]:
            feed = {name: g[key] for name, key in golden["inputs"].items()}
            if art["path"].endswith(".tflite"):  # the arrays are in the ONNX model's NCHW
                from edge_agent.model.runtimes import model_to_nchw, nchw_to_model
                from edge_agent.model.runtimes.tflite import LiteRTRuntime

                rt = LiteRTRuntime(dest / art["path"])
                outs = rt.infer({k: nchw_to_model(v, rt.inputs[0].shape) for k, v in feed.items()})
                outs = [
                    model_to_nchw(o, g[k].shape)
                    for o, k in zip(outs, golden["expected"][art["path"]].values())
                ]
            else:
                path = str(dest / art["path"])
                outs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
                    None, feed
                )
            for (_name, key), got in zip(golden["expected"][art["path"]].items(), outs):
                np.testing.assert_allclose(got, g[key], rtol=1e-5, atol=1e-5)


def test_verify_cli_ok_and_tampered(
    cli: Any, bundle: dict[str, Any], keys: Any, tmp_path: Path
) -> None:
    r = cli("verify", bundle["path"], "--public-key", keys[1])
    assert r.code == 0 and r.out.startswith("OK")
    # Flip one byte of an artifact inside the archive, keeping the archive valid.
    src, bad = bundle["path"], tmp_path / "bad.edgebundle"
    with tarfile.open(src, "r:gz") as tin, tarfile.open(bad, "w:gz") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if data is not None and member.name.startswith("artifacts/"):
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            import io

            tout.addfile(member, io.BytesIO(data) if data is not None else None)
    r = cli("verify", bad, "--public-key", keys[1])
    assert r.code == 4
    assert "artifacts/" in _one_line(r.err)


def test_verify_with_wrong_key_exits_4(cli: Any, bundle: dict[str, Any], tmp_path: Path) -> None:
    from edge_agent.model.keys import generate_keypair

    _, other = generate_keypair(tmp_path / "other")
    r = cli("verify", bundle["path"], "--public-key", other)
    assert r.code == 4
    assert "not trusted" in _one_line(r.err)


def test_keygen_writes_private_key_0600_and_refuses_overwrite(cli: Any, tmp_path: Path) -> None:
    r = cli("keygen", "--out", tmp_path)
    assert r.code == 0, r.err
    priv = tmp_path / "edge-signing.key"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert (tmp_path / "edge-signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    r = cli("keygen", "--out", tmp_path)
    assert r.code == 2 and "edge-signing.key" in _one_line(r.err)


def test_inspect_reports_inputs_outputs_opset_ops(cli: Any, digits: Any) -> None:
    r = cli("inspect", digits.onnx11, "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["opsets"]["ai.onnx"] == 11
    assert info["inputs"][0]["name"] == "input" and info["inputs"][0]["shape"][1:] == [1, 8, 8]
    assert info["op_histogram"]["Conv"] == 3 and info["parameters"] > 1000
    r = cli("inspect", digits.onnx11)
    assert "operators:" in r.out and "Conv" in r.out


# --- error paths -----------------------------------------------------------------------------


def _cases(digits: Any, tmp: Path) -> list[tuple[list[Any], int, str]]:
    garbage = tmp / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf at all \x00\xff" * 10)
    pkl = tmp / "model.pkl"
    pkl.write_bytes(pickle.dumps({"not": "a model"}))
    wrong_shape = tmp / "wrong.npz"
    np.savez(wrong_shape, x=np.zeros((10, 3, 8, 8), np.float32))
    no_labels = tmp / "nolabels.npz"
    np.savez(no_labels, x=np.zeros((10, 1, 8, 8), np.float32))
    q = ["quantize", digits.onnx, "-o", tmp / "out" / "m.onnx", *FAST]
    ok_out = ["-o", tmp / "m.onnx"]
    return [
        (["quantize", tmp / "missing.onnx", *ok_out, "--format", "onnx-fp32"], 2, "missing.onnx"),
        (["quantize", garbage, *ok_out, "--format", "onnx-fp32"], 2, "garbage.onnx"),
        (["quantize", pkl, *ok_out, "--format", "onnx-fp32"], 2, "--trust-pickle"),
        (["quantize", digits.onnx, *ok_out, "--format", "onnx-int8"], 2, "--calibration"),
        (
            [
                "quantize",
                digits.onnx,
                *ok_out,
                "--format",
                "onnx-fp32",
                "--input-shape",
                "input=1,x",
            ],
            2,
            "input=1,x",
        ),
        (
            [
                "quantize",
                digits.onnx,
                *ok_out,
                "--format",
                "onnx-fp32",
                "--input-shape",
                "nope=1,1,8,8",
            ],
            2,
            "'nope'",
        ),
        (
            [
                "quantize",
                digits.onnx,
                *ok_out,
                "--format",
                "onnx-int8",
                "--calibration",
                tmp / "no.npz",
            ],
            2,
            "no.npz",
        ),
        (
            [
                "quantize",
                digits.onnx,
                *ok_out,
                "--format",
                "onnx-int8",
                "--calibration",
                wrong_shape,
            ],
            2,
            "shape",
        ),
        (
            [
                "quantize",
                digits.onnx,
                *ok_out,
                "--format",
                "onnx-fp32",
                "--eval",
                no_labels,
                "--max-accuracy-drop",
                "1",
            ],
            2,
            "needs labels",
        ),
        (
            ["quantize", digits.onnx, *ok_out, "--format", "onnx-fp32", "--profile", "toaster"],
            2,
            "toaster",
        ),
        (
            [
                "quantize",
                digits.onnx,
                *ok_out,
                "--format",
                "onnx-int8",
                "--scheme",
                "u9s8-qop",
                "--calibration",
                digits.calibration,
            ],
            2,
            "u9s8-qop",
        ),
        ([*q, "--format", "onnx-fp32"], 2, "does not exist"),
        (
            [
                "build",
                digits.onnx,
                "--profile",
                "x86-64",
                "--sign-key",
                tmp / "nokey",
                "-o",
                tmp / "b.edgebundle",
                "--calibration",
                digits.calibration,
            ],
            2,
            "nokey",
        ),
        (["verify", tmp / "nobundle.edgebundle", "--public-key", tmp], 2, "nobundle"),
        (["verify", garbage, "--public-key", tmp / "none.pub"], 2, "none.pub"),
    ]


def test_every_error_path_is_one_line_with_its_exit_code(
    cli: Any, digits: Any, tmp_path: Path
) -> None:
    for args, code, needle in _cases(digits, tmp_path):
        before = sorted(p.name for p in tmp_path.iterdir())
        r = cli(*args)
        line = _one_line(r.err)
        assert r.code == code, (args, r.code, line)
        assert needle in line, (needle, line)
        after = sorted(p.name for p in tmp_path.iterdir())
        assert after == before, f"partial output left by {args}: {set(after) - set(before)}"


def test_garbage_bundle_fails_verification(cli: Any, keys: Any, tmp_path: Path) -> None:
    bad = tmp_path / "junk.edgebundle"
    bad.write_bytes(os.urandom(4096))
    r = cli("verify", bad, "--public-key", keys[1])
    assert r.code == 4 and "junk.edgebundle" in _one_line(r.err)


def test_console_script_runs_as_a_user_would(digits: Any, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "edge-convert"
    assert exe.exists() or shutil.which("edge-convert"), "edge-convert console script not installed"
    cmd = [str(exe if exe.exists() else "edge-convert")]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "quantize" in r.stdout and "exit codes" in r.stdout
    r = subprocess.run(
        [
            *cmd,
            "quantize",
            str(tmp_path / "nope.onnx"),
            "-o",
            str(tmp_path / "o.onnx"),
            "--format",
            "onnx-fp32",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == f"edge-convert: error: {tmp_path / 'nope.onnx'}: no such file or directory"
    )


# --- edge-agent and edgectl as a new user meets them (real processes) -----------------------

BIN = Path(sys.executable).parent


def _agent(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "edge-agent"), *(str(a) for a in args)],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip


def _agent_error(r: subprocess.CompletedProcess[str]) -> str:
    """The one line an edge-agent error is (the log lines above it are not errors)."""
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("edge-agent: ")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("edge-agent: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare ONNX model on 1x1x8x8 gray input: its mean."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
        "gray",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("gray") / "gray.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("rpicam:0?widht=100", "unknown option(s) ['widht']"),
        ("rpicam:0?width=abc", "width = 'abc'"),
        ("rpicam:0?width=101", "even"),
        ("rpicam:0?fps=0", "fps = '0'"),
        ("rpicam:x", "expected rpicam:N"),
        ("bogus://x", "unknown source scheme 'bogus'"),
    ],
)
def test_a_malformed_source_uri_is_a_config_error_not_retried(
    gray_model: Path, uri: str, needle: str
) -> None:
    r = _agent("run", "--model", gray_model, "--source", uri, "--max-frames", "1")
    line = _agent_error(r)
    assert r.returncode == 78, (uri, r.returncode, line)
    assert uri in line and needle in line, line


def test_a_source_that_cannot_be_opened_stays_66(gray_model: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp4"
    r = _agent("run", "--model", gray_model, "--source", f"file:{missing}", "--max-frames", "1")
    line = _agent_error(r)
    assert r.returncode == 66, line
    assert str(missing) in line and "no such file" in line


#: (agent.toml, what the error says); {tmp} is a folder, {model} a real bare model
BAD_CONFIGS = [
    ('[model]\npath = "/nonexist.edgebundle"\n',
     "[model] path = '/nonexist.edgebundle': no such file"),
    ('[model]\npath = "{tmp}"\n', "[model] path = '{tmp}': not a file"),
    ('[source]\nuri = "rpicam:0?widht=3"\n', "[source] uri: rpicam:0?widht=3: unknown option"),
    ('[source]\nuri = "bogus://x"\n', "[source] uri: bogus://x: unknown source scheme 'bogus'"),
    ('[[sources]]\nname = "front"\nuri = "rpicam:0?fps=0"\n', "stream front: rpicam:0?fps=0"),
    ('[mqtt]\nbroker = "ftp://x"\n', "[mqtt] broker 'ftp://x': expected mqtt://"),
    ('[results]\nsinks = ["jsonl:/nonexist/x.jsonl"]\n',
     "'jsonl:/nonexist/x.jsonl': the directory /nonexist does not exist"),
    ('[results]\nsinks = ["jsnl:x"]\n', "[results] sinks: 'jsnl:x': expected jsonl:PATH"),
    ("[model]\nthreads = -1\n", "[model] threads = -1: must be >= 0"),
    ("[pipeline]\nmotion_gate = 300.0\n", "[pipeline] motion_gate = 300: must be 0-255"),
    ("[pipeline]\nmotion_gate = -1.0\n", "[pipeline] motion_gate = -1: must be 0-255"),
    ("[rest]\nport = 70000\n", "[rest] port = 70000: must be 0-65535"),
    ('[model]\npath = "{model}"\nlabels = "{tmp}/none.txt"\n',
     "[model] labels {tmp}/none.txt: no such file"),
    ('[model]\npath = "{tmp}/m.edgebundle"\ntrusted_keys = ["{tmp}/none.pub"]\n',
     "[model] trusted_keys: {tmp}/none.pub: no such public key file"),
    ('[mqtt]\nbroker = "mqtt://localhost"\n[fleet]\noperator_keys = ["{tmp}/op.pub"]\n',
     "[fleet] operator_keys: {tmp}/op.pub: no such public key file"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "needle"), BAD_CONFIGS)
def test_check_config_refuses_what_run_would_refuse(
    gray_model: Path, tmp_path: Path, text: str, needle: str
) -> None:
    (tmp_path / "m.edgebundle").write_bytes(b"not read before the keys are")
    path = tmp_path / "agent.toml"
    path.write_text(text.format(tmp=tmp_path, model=gray_model))
    r = _agent("check-config", "--config", path)
    line = _agent_error(r)
    assert r.returncode == 78, (text, r.returncode, line)
    assert needle.format(tmp=tmp_path) in line and f"config {path}: " in line, line
    assert "config OK" not in r.stdout


def test_check_config_opens_connects_and_writes_nothing(gray_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[model]\npath = "{gray_model}"\n[source]\nuri = "rpicam:0?width=640&height=480"\n'
        f'[results]\nsinks = ["jsonl:{out}/r.jsonl", "stdout"]\n'
        '[mqtt]\nbroker = "mqtt://127.0.0.1:9"\n[rest]\nport = 0\n'
    )
    r = _agent("check-config", "--config", path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"config OK: {path}")
    assert list(out.iterdir()) == []  # the sink's file is not created


def test_config_files_that_are_not_utf8_are_config_errors(gray_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "b.toml"
    bad.write_bytes(b"\xff\xfe[model]\n")
    r = _agent("check-config", "--config", bad)
    line = _agent_error(r)
    assert r.returncode == 78 and str(bad) in line and "not UTF-8 text" in line, line
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"cat\n\xff\xfedog\n")
    good = tmp_path / "agent.toml"
    good.write_text(f'[model]\npath = "{gray_model}"\nlabels = "{labels}"\n')
    r = _agent("check-config", "--config", good)
    line = _agent_error(r)
    assert r.returncode == 78 and str(labels) in line and "not UTF-8 text" in line, line


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--threads", "-1"], "[model] threads = -1: must be >= 0"),
        (["--motion-gate", "999"], "[pipeline] motion_gate = 999: must be 0-255"),
        (["--motion-gate", "-1"], "[pipeline] motion_gate = -1: must be 0-255"),
        (["--rest-port", "70000"], "[rest] port = 70000: must be 0-65535"),
    ],
)
def test_out_of_range_flags_are_config_errors(
    gray_model: Path, flags: list[str], needle: str
) -> None:
    r = _agent("run", "--model", gray_model, "--source", "synthetic:?frames=2", *flags)
    line = _agent_error(r)
    assert r.returncode == 78 and needle in line, line


def test_rest_port_0_in_the_config_serves_on_a_free_port(gray_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[model]\npath = "{gray_model}"\n[source]\nuri = "synthetic:?frames=3&width=8&height=8"\n'
        "[rest]\nenabled = true\nport = 0\n"
    )
    r = _agent("run", "--config", path, "--results", "stdout")
    assert r.returncode == 0, r.stderr
    served = [
        line for line in r.stderr.splitlines() if "REST endpoint on http://127.0.0.1:" in line
    ]
    assert served and ":0/" not in served[0], r.stderr


def test_bench_refuses_no_frames_and_a_source_without_one(gray_model: Path, tmp_path: Path) -> None:
    for frames in ("0", "-5"):
        r = _agent("bench", "--model", gray_model, "--frames", frames)
        line = _agent_error(r)
        assert r.returncode == 78 and f"--frames {frames}: must be >= 1" in line, line
    png = tmp_path / "corrupt.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = _agent("bench", "--model", gray_model, "--frames", "5", "--source", f"images:{png}")
    line = _agent_error(r)
    assert r.returncode == 66, line
    assert f"images:{png}: the source produced no frame: " in line and "Assertion" not in line


def test_tune_does_not_offer_the_options_it_refuses() -> None:
    r = _agent("tune", "--help")
    assert r.returncode == 0 and "--seconds" in r.stdout
    assert "--threads" not in r.stdout and "--workers" not in r.stdout
    r = _agent("bench", "--help")
    assert "--threads" in r.stdout and "--workers" in r.stdout
    r = _agent("tune", "--threads", "2")
    assert r.returncode == 2 and "unrecognized arguments: --threads" in r.stderr


def test_edgectl_deploy_help_describes_every_option() -> None:
    r = subprocess.run([str(BIN / "edgectl"), "deploy", "--help"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0
    text = " ".join(r.stdout.split("options:", 1)[1].split())
    for flag, words in [
        ("--device ID", "desired state"),
        ("--group NAME", "every device that declares"),
        ("--chunk-size BYTES", "(default: 98304)"),
        ("--public-key PUB|DIR", "default: not verified here"),
        ("--allow-downgrade", "install a version below"),
    ]:
        assert f"{flag} " in text, flag
        after = text.split(f"{flag} ", 1)[1]
        assert words in after[:200], (flag, after[:200])


def test_every_edgectl_option_says_what_it_does_and_its_default() -> None:
    import argparse

    from edgectl.cli import build_parser

    def walk(name: str, parser: argparse.ArgumentParser) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    missing += walk(f"{name} {sub}", p)
                continue
            flag = "/".join(action.option_strings) or action.dest
            if not action.help:
                missing.append(f"{name} {flag}: no help")
            elif (action.option_strings and not action.required
                  and action.default not in (None, False, [], "", 0)
                  and "default" not in action.help):  # fmt: skip
                missing.append(f"{name} {flag}: the default {action.default!r} is not said")
        return missing

    assert walk("edgectl", build_parser()) == []
