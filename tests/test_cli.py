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
