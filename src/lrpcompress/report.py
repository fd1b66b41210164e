"""Reports: the JSON written by ``compress`` and the tables printed by ``inspect``."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .io import atomic_write_bytes


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def build_report(*, method: str, settings: Any, baseline_accuracy: float, accuracy: float, dense_bytes: int,
                 file_bytes: int, stats: Mapping[str, float], layers: Sequence[Mapping[str, Any]], seconds: float,
                 score_seconds: float, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report of one compression run (accuracy in percent, sizes in bytes)."""
    rep = {
        "method": method,
        "baseline_accuracy": round(baseline_accuracy, 4),
        "accuracy": round(accuracy, 4),
        "accuracy_drop": round(baseline_accuracy - accuracy, 4),
        "dense_bytes": int(dense_bytes),
        "file_bytes": int(file_bytes),
        "compression_ratio": round(dense_bytes / file_bytes, 4),
        "sparsity": round(stats["sparsity"], 6),
        "mean_bits": round(stats["mean_bits"], 4),
        "bits_per_weight": round(stats["bits_per_weight"], 4),
        "seconds": round(seconds, 3),
        "score_seconds": round(score_seconds, 3),
        "settings": _jsonable(settings),
        "layers": _jsonable(list(layers)),
    }
    rep.update(_jsonable(dict(extra or {})))
    return rep


def speed_fields(dense: Mapping[str, Any], compressed: Mapping[str, Any]) -> dict[str, Any]:
    """Report fields comparing two results of :func:`~lrpcompress.evaluation.speed_profiles` (one run)."""
    lat_d, lat_c = dense["latency_ms"], compressed["latency_ms"]
    big = max(lat_d, key=int)
    return {
        "speedup": round(lat_d[big] / lat_c[big], 3),
        "speedup_batch": int(big),
        "latency_ms": {"dense": dict(lat_d), "compressed": dict(lat_c)},
        "flops": {"dense": 2 * dense["macs"], "compressed": 2 * compressed["macs"]},
        "macs": {"dense": dense["macs"], "compressed": compressed["macs"]},
        "params": {"dense": dense["params"], "compressed": compressed["params"]},
        "peak_memory_bytes": {"dense": dict(dense["peak_memory_bytes"]),
                              "compressed": dict(compressed["peak_memory_bytes"])},
    }


def write_report(report: Mapping[str, Any], path: str | Path) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, title) pairs."""
    cells = [[title for _, title in columns]]
    for r in rows:
        cells.append([_fmt(r.get(k)) for k, _ in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(columns))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub-flavoured markdown table; a ``|`` inside a cell is escaped so it cannot split the cell."""
    cell = lambda v: v.replace("|", "\\|")  # noqa: E731
    head = "| " + " | ".join(cell(t) for _, t in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(_fmt(r.get(k))) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def table_sections(sections: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """A results page's body: per title, a ``## title`` heading and the rows as a markdown table whose columns are
    the first row's keys (every row of a section has the same keys)."""
    lines: list[str] = []
    for title, rows in sections.items():
        lines += ["", f"## {title}", "", markdown_table(rows, [(k, k) for k in rows[0]])]
    return lines + [""]


def write_page(path: str | Path | None, lines: Sequence[str]) -> None:
    """Write a results page (lines joined by newlines; folders created; atomic) and echo it to stdout; with no
    ``path``, only print it."""
    text = "\n".join(lines)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode())
    print(text)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        return "×".join(map(str, v)) if all(isinstance(x, int) for x in v) else ",".join(map(str, v))
    return str(v)


def layer_rows(layers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": r["name"], "shape": r["shape"], "kept": f"{100 * r['kept']:.1f}%",
             "bits": ",".join(map(str, r["bits"])), "grid": r["grid"], "mean_bits": round(r["mean_bits"], 2), "bytes": r["bytes"]}
            for r in layers]


LAYER_COLUMNS = (("name", "layer"), ("shape", "shape"), ("kept", "kept"), ("bits", "bit-widths"), ("grid", "grid"),
                 ("mean_bits", "mean bits"), ("bytes", "bytes"))
