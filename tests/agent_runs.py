"""``edge-agent run`` as a new user runs it on a bare model, for the tests of bare files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_agent.cli import main as edge_agent


def run_bare(model: Path, labels: Path | None, source: str, tmp_path: Path) -> list[dict[str, Any]]:
    """``edge-agent run --model MODEL [--labels LABELS] --source SOURCE`` with one thread, to
    a JSONL file; asserts it exits 0 and returns its results."""
    out = tmp_path / "results.jsonl"
    given = [] if labels is None else ["--labels", str(labels)]
    code = edge_agent(
        ["run", "--model", str(model), *given, "--source", source,
         "--results", f"jsonl:{out}", "--state-dir", str(tmp_path / "state"), "--threads", "1"]
    )  # fmt: skip
    assert code == 0
    return [json.loads(line) for line in out.read_text().splitlines()]
