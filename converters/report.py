"""Readable summaries of conversion reports (the JSON report is the contract; this is for eyes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _fmt(value: Any, spec: str = ".4f", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def summary_table(report: Mapping[str, Any]) -> str:
    """The comparison table ``quantize`` prints at the end."""
    size, lat, fid, acc = (
        report["size_bytes"],
        report["latency_ms"],
        report["fidelity"],
        report["accuracy"],
    )
    rows = [
        [
            "original",
            _size(size["original"]),
            _fmt(lat["original"], ".3f"),
            "1.0000",
            "-",
            _fmt(acc["original"], ".2f"),
        ],
        [
            report["format"] + (f" ({report['int8_scheme']})" if report.get("int8_scheme") else ""),
            _size(size["converted"]),
            _fmt(lat["converted"], ".3f"),
            _fmt(fid.get("cosine")),
            _fmt(fid.get("top1_agreement")),
            _fmt(acc["converted"], ".2f"),
        ],
    ]
    out = [
        f"profile: {report['profile']}   validation: {report['validation']['source']}",
        table(["model", "size", "latency ms", "cosine", "top-1 agree", "accuracy %"], rows),
        f"size x{_fmt(size.get('ratio'), '.3f')}   latency x{_fmt(lat.get('ratio'), '.3f')} "
        f"(median of {lat.get('runs')} interleaved runs on this machine)",
    ]
    task = fid.get("task") or {}
    if task.get("value") is not None:
        budget = report.get("budget") or {}
        floor = budget.get("min_task_metric")
        out.append(
            f"task {task['kind']}: {task['metric']} {task['value']:.4f}"
            + (f" (floor {floor})" if floor is not None else "")
            + f"   ({task['details'].get('reason', '')})"
        )
    search = report.get("search") or []
    if len({e["scheme"] for e in search}) < len(search):  # some scheme tried more than one mix
        out.append("")
        out.append("float-fallback search (nodes kept in float -> fidelity, size, latency):")
        out.append(
            table(
                ["scheme", "float nodes", "passed", "task", "cosine", "size", "latency ms"],
                [
                    [
                        ("* " if e["chosen"] else "  ") + str(e["scheme"]),
                        str(e["float_nodes"]),
                        "yes" if e["passed"] else "no",
                        _fmt(e["task_metric"]),
                        _fmt(e["cosine"]),
                        _size(e["size_bytes"]),
                        _fmt(e["latency_ms"], ".3f"),
                    ]
                    for e in search
                ],
            )
        )
    cands = report.get("candidates") or []
    if len(cands) > 1:
        out.append("")
        out.append("int8 schemes tried:")
        out.append(
            table(
                ["scheme", "passed", "latency ms", "cosine", "float nodes", "note"],
                [
                    [
                        ("* " if c["chosen"] else "  ") + str(c["scheme"]),
                        "yes" if c["passed"] else "no",
                        _fmt(c["latency_ms"], ".3f"),
                        _fmt(c["cosine"]),
                        str(c["float_nodes"]),
                        c["reason"] or "",
                    ]
                    for c in cands
                ],
            )
        )
    if report.get("float_nodes"):
        names = ", ".join(n["node"] for n in report["float_nodes"])
        out.append(f"kept in float to meet the budget: {names}")
    for warning in report.get("warnings", []):
        out.append(f"WARNING: {warning}")
    if report.get("output"):
        out.append(f"wrote {report['output']}")
    return "\n".join(out)


def build_summary(report: Mapping[str, Any]) -> str:
    rows = []
    for art in report["artifacts"]:
        rows.append(
            [
                art["format"] + (f" ({art['int8_scheme']})" if art.get("int8_scheme") else ""),
                ", ".join(art["profiles"]),
                _size(art["size_bytes"]),
                _fmt(art["latency_ms"], ".3f"),
                _fmt(art["cosine"]),
                _fmt(art.get("accuracy"), ".2f"),
            ]
        )
    out = [
        f"bundle {report['output']}: {report['name']} {report['version']}, signed by key "
        f"{report['key_id']}, {_size(report['bundle_size_bytes'])}",
        table(["artifact", "profiles", "size", "latency ms", "cosine", "accuracy %"], rows),
        f"original: {_size(report['original']['size_bytes'])}, "
        f"{_fmt(report['original']['latency_ms'], '.3f')} ms, accuracy "
        f"{_fmt(report['original']['accuracy'], '.2f')}",
    ]
    for note in report.get("notes", []):
        out.append(f"note: {note}")
    for warning in report.get("warnings", []):
        out.append(f"WARNING: {warning}")
    return "\n".join(out)


def prune_summary(report: Mapping[str, Any]) -> str:
    """What ``prune`` prints: before/after latency, size (and gzip size), parameters, accuracy,
    and the channel groups that could not be pruned."""
    lat, size, par, acc, fid = (
        report["latency_ms"], report["size_bytes"], report["params"], report["accuracy"],
        report["fidelity"],
    )  # fmt: skip
    rows = [
        ["original", _fmt(lat["original"], ".3f"), _size(size["original"]),
         _size(size["compressed_original"]), str(par["original"]), "1.0000",
         _fmt(acc["original"], ".2f")],
        ["pruned", _fmt(lat["pruned"], ".3f"), _size(size["pruned"]),
         _size(size["compressed_pruned"]), str(par["pruned"]), _fmt(fid.get("cosine")),
         _fmt(acc["pruned"], ".2f")],
    ]  # fmt: skip
    out = [
        f"validation: {report['validation']['source']}",
        table(["model", "latency ms", "size", "gzip", "params", "cosine", "accuracy %"], rows),
        f"latency x{_fmt(lat['ratio'], '.3f')}   size x{_fmt(size['ratio'], '.3f')}   "
        f"gzip x{_fmt(size['compressed_ratio'], '.3f')}   params x{_fmt(par['ratio'], '.3f')}",
    ]
    groups = report.get("groups") or []
    if groups:
        pruned = [g for g in groups if g["kept"] < g["channels"]]
        out.append(f"channel groups pruned: {len(pruned)} of {len(groups)} prunable")
    for f in report.get("frozen") or []:
        out.append(f"not pruned ({f['channels']} channels of {', '.join(f['producers'][:2])}): "
                   f"{'; '.join(f['reasons'][:2])}")  # fmt: skip
    for warning in report.get("warnings", []):
        out.append(f"WARNING: {warning}")
    return "\n".join(out)
