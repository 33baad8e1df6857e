"""Result files: the summary JSON (vLLM ``bench serve`` keys) and the per-request JSONL next to it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loadgen.records import RequestRecord, record_from_row, record_to_row

__all__ = ["jsonl_path", "read_records", "write_results"]


def jsonl_path(summary_path: Path) -> Path:
    """``run.json`` -> ``run.jsonl``: the per-request rows live next to the summary."""
    return summary_path.with_suffix(".jsonl")


def write_results(
    path: Path, summary: Mapping[str, Any], records: Iterable[RequestRecord], metadata: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write ``{metadata, summary}`` to ``path`` and one row per request to the ``.jsonl`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    detailed = "itls" in summary  # per-request arrays make indentation useless
    with path.open("w", encoding="utf-8") as out:
        json.dump({**metadata, **summary}, out, indent=None if detailed else 2)
        out.write("\n")
    rows = jsonl_path(path)
    with rows.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record_to_row(record), separators=(",", ":")))
            out.write("\n")
    return path, rows


def read_records(path: Path) -> list[RequestRecord]:
    """Records back from a JSONL file written by :func:`write_results` (to re-summarise a run)."""
    with path.open(encoding="utf-8") as rows:
        return [record_from_row(json.loads(line)) for line in rows if line.strip()]
