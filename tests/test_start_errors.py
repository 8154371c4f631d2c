"""What `edge-agent run` does with bad input at start and with a sink that fails at the end: the
documented exit code, one line naming the problem, nothing half-written, and a run that went
through keeps its results and its summary (docs/agent.md, exit codes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main as edge_agent
from edge_agent.errors import first_line
from tests.fleet import fleet_env_fixture  # noqa: F401  (the `fleet_env` fixture)


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = edge_agent([str(a) for a in args])
    return code, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("edge-agent: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def artifacts(fleet_env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The digits bundle installed (verified and extracted), and its manifest: its int8 ONNX
    and TFLite artifacts as bare files, with the format the converter wrote for each."""
    from edge_agent.model.keys import load_trusted_keys
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile

    state = tmp_path_factory.mktemp("state")
    model = load_model(
        fleet_env["root"] / "digits-1.0.0.edgebundle",
        profile=load_profile("x86-64"),
        state_dir=state,
        trusted_keys=load_trusted_keys([fleet_env["pub"]]),
    )
    root = model.artifact.parent
    while not (root / "manifest.json").exists():
        root = root.parent
    manifest = model.manifest
    model.close()
    return root, manifest


@pytest.mark.parametrize("model", ["/nonexistent/m.onnx", "/nonexistent/m.edgebundle", "dir"])
@pytest.mark.parametrize("command", ["run", "tune"])
def test_a_missing_model_exits_65_at_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fleet_env: dict[str, Any], model: str,
    command: str,
) -> None:  # fmt: skip
    """With no plan given the plan is looked up by the model's hash: the missing file is still
    a model error (65), not an internal one (70)."""
    path = tmp_path if model == "dir" else Path(model)
    code, err = _run(
        capsys, command, "--model", path, "--source", f"file:{fleet_env['video']}",
        "--state-dir", tmp_path / "state",
    )  # fmt: skip
    assert code == 65, err
    assert _error_line(err).endswith(f"{path}: no such model file")


def test_a_sink_that_fails_does_not_lose_the_others_or_the_summary(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fleet_env: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A results file on a full disk (/dev/full): every write fails, and so does its last flush
    at the stop. The other sink gets every result, the run exits 0 and writes its summary."""
    good, summary = tmp_path / "good.jsonl", tmp_path / "summary.json"
    with caplog.at_level(logging.WARNING):
        code, err = _run(
            capsys, "run", "--model", fleet_env["root"] / "digits-1.0.0.edgebundle",
            "--trusted-key", fleet_env["pub"], "--source", f"file:{fleet_env['video']}",
            "--results", "jsonl:/dev/full", "--results", f"jsonl:{good}",
            "--summary", summary, "--state-dir", tmp_path / "state", "--threads", "1",
        )  # fmt: skip
    assert code == 0, err
    data = json.loads(summary.read_text())
    assert data["results"] == len(good.read_text().splitlines()) > 0
    assert data["sink_errors"]["JsonlSink"] == data["results"]
    assert any("jsonl:/dev/full: its last results were not written" in r.message
               for r in caplog.records)  # fmt: skip


@pytest.mark.parametrize("where", ["missing-dir", "a-dir"])
def test_a_summary_that_cannot_be_written_is_refused_before_the_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fleet_env: dict[str, Any], where: str
) -> None:
    summary = tmp_path / "nope" / "s.json" if where == "missing-dir" else tmp_path
    results = tmp_path / "r.jsonl"
    code, err = _run(
        capsys, "run", "--model", fleet_env["root"] / "digits-1.0.0.edgebundle",
        "--trusted-key", fleet_env["pub"], "--source", f"file:{fleet_env['video']}",
        "--results", f"jsonl:{results}", "--summary", summary,
        "--state-dir", tmp_path / "state",
    )  # fmt: skip
    assert code == 78, err
    assert f"--summary {summary}:" in _error_line(err)
    assert not results.exists()  # refused before anything ran: no empty results file


def test_a_state_dir_that_is_a_file_is_a_config_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fleet_env: dict[str, Any]
) -> None:
    code, err = _run(
        capsys, "run", "--model", fleet_env["root"] / "digits-1.0.0.edgebundle",
        "--trusted-key", fleet_env["pub"], "--source", f"file:{fleet_env['video']}",
        "--state-dir", fleet_env["video"],
    )  # fmt: skip
    assert code == 78, err
    assert "[agent] state_dir" in _error_line(err) and "not a directory" in err


def test_a_source_that_fails_at_start_leaves_no_results_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fleet_env: dict[str, Any]
) -> None:
    results = tmp_path / "r.jsonl"
    code, err = _run(
        capsys, "run", "--model", fleet_env["root"] / "digits-1.0.0.edgebundle",
        "--trusted-key", fleet_env["pub"], "--source", f"file:{tmp_path / 'missing.mp4'}",
        "--results", f"jsonl:{results}", "--state-dir", tmp_path / "state",
    )  # fmt: skip
    assert code == 66, err
    assert not results.exists()


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_preprocessing_that_does_not_fit_the_model_is_refused_at_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fleet_env: dict[str, Any],
    artifacts: Any, digits: Any, suffix: str,
) -> None:  # fmt: skip
    """--channels rgb on a one-channel model: one line at start (78), not every frame failing
    in the runtime with exit 0."""
    root, _ = artifacts
    model = next(root.rglob("*.onnx"))
    if suffix == ".tflite":  # the same model as LiteRT takes it (NHWC, fp16 weights)
        from converters.standins import tflite_fp16

        model = tmp_path / "digits.tflite"
        model.write_bytes(tflite_fp16(digits.onnx.read_bytes()))
    code, err = _run(
        capsys, "run", "--model", model, "--source", f"file:{fleet_env['video']}",
        "--channels", "rgb", "--state-dir", tmp_path / "state", "--threads", "1",
    )  # fmt: skip
    assert code == 78, err
    line = _error_line(err)
    assert "takes 1 channel(s), the preprocessing gives 3 (rgb)" in line and "--channels" in line


def test_a_bare_model_reports_the_format_its_bundle_declared(
    tmp_path: Path, artifacts: Any
) -> None:
    """Each artifact of the bundle loaded as a bare file: the format found in the file itself is
    the one the converter wrote in the manifest (an int8 model is not called fp32)."""
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile

    root, manifest = artifacts
    seen = {}
    for art in manifest["artifacts"]:
        model = load_model(
            root / art["path"], profile=load_profile("x86-64"), state_dir=tmp_path, threads=1
        )
        seen[art["format"]] = model.format
        model.close()
    assert seen == {fmt: fmt for fmt in seen} and any("int8" in fmt for fmt in seen), seen


def test_labels_that_do_not_match_the_classes_are_warned_about(
    tmp_path: Path, artifacts: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile

    root, _ = artifacts
    with caplog.at_level(logging.WARNING):
        model = load_model(
            next(root.rglob("*.onnx")), profile=load_profile("x86-64"), state_dir=tmp_path,
            threads=1, labels=("a", "b"),
        )  # fmt: skip
    model.close()
    assert any("labels: 2 given for" in r.message and "10 classes" in r.message
               for r in caplog.records)  # fmt: skip


def test_a_third_party_message_is_one_line_with_all_its_lines() -> None:
    exc = RuntimeError(
        "Got invalid dimensions for input: input for the following indices\n"
        " index: 1 Got: 3 Expected: 1\n Please fix either the inputs/the model."
    )
    assert first_line(exc) == (
        "Got invalid dimensions for input: input for the following indices index: 1 Got: 3 "
        "Expected: 1 Please fix either the inputs/the model."
    )
    assert first_line(RuntimeError("")) == "RuntimeError"
    long = first_line(RuntimeError("x" * 1000))
    assert len(long) == 300 and long.endswith("…")


def test_a_summary_to_dev_stdout_follows_the_results_in_a_redirected_file(
    tmp_path: Path, fleet_env: dict[str, Any]
) -> None:
    """``--results stdout --summary /dev/stdout > out``: the results, then the summary, in the
    file (opening /dev/stdout again would truncate it, results and all)."""
    import subprocess
    import sys

    out = tmp_path / "out.jsonl"
    with out.open("wb") as fh:
        run = subprocess.run(
            [str(Path(sys.executable).parent / "edge-agent"), "run",
             "--model", str(fleet_env["root"] / "digits-1.0.0.edgebundle"),
             "--trusted-key", str(fleet_env["pub"]), "--source", f"file:{fleet_env['video']}",
             "--max-frames", "5", "--results", "stdout", "--summary", "/dev/stdout",
             "--state-dir", str(tmp_path / "state"), "--threads", "1"],
            stdout=fh, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    lines = text.splitlines()
    assert [json.loads(line)["seq"] for line in lines[:5]] == [0, 1, 2, 3, 4]
    assert json.loads("\n".join(lines[5:]))["results"] == 5
