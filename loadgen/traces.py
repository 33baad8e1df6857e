"""Trace records and the readers of the trace files we replay (Mooncake JSONL, Azure 2023 CSV).

Every reader turns one file row into one :class:`TraceRequest` and stops at the first malformed row with a
:class:`TraceError` naming the file and line, so a bad trace never surfaces as a traceback from deep inside a
run. Arrival offsets are relative to the first row, so a slice of a trace starts at once.
"""

from __future__ import annotations

import calendar
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal

__all__ = [
    "MOONCAKE_BLOCK_TOKENS",
    "TRACE_FORMATS",
    "ChatMessage",
    "TraceError",
    "TraceFormat",
    "TraceRequest",
    "detect_format",
    "read_azure",
    "read_mooncake",
    "read_trace",
]

#: Tokens per Mooncake ``hash_id`` block.
MOONCAKE_BLOCK_TOKENS: Final = 512

TraceFormat = Literal["mooncake", "azure", "synthetic"]
TRACE_FORMATS: Final[tuple[str, ...]] = ("mooncake", "azure", "synthetic")

#: One chat message as ``(role, content)``; turned into ``{"role": ..., "content": ...}`` when sent.
ChatMessage = tuple[str, str]

_AZURE_COLUMNS: Final = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_AZURE_TIME_RE: Final = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?")


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and, for a bad row, the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request to replay.

    ``arrival`` is the due time in seconds from the start of the run. A request with a ``session_id`` and
    ``turn > 0`` is a follow-up turn: it is sent ``think_time`` seconds after the previous turn of its session
    completes (its ``arrival`` is only nominal) and carries that turn's history, including the reply received.

    The prompt comes from the first of these that is set: ``messages`` (sent verbatim, appended to the session
    history), ``prompt`` (verbatim text), ``hash_ids`` (a Mooncake prompt of exactly ``input_length`` tokens),
    or else synthetic filler sized so the whole prompt is ``input_length`` tokens.
    """

    arrival: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] | None = None
    tenant: str = "default"
    session_id: str | None = None
    turn: int = 0
    think_time: float = 0.0
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None

    @property
    def is_follow_up(self) -> bool:
        """True for a turn that waits for the previous turn of its session."""
        return self.session_id is not None and self.turn > 0


# ---------------------------------------------------------------------------------------------------------
# Mooncake JSONL
# ---------------------------------------------------------------------------------------------------------


def _int_field(obj: Mapping[str, object], key: str, path: Path, line: int, minimum: int) -> int:
    if key not in obj:
        raise TraceError(path, f"missing field {key!r}", line)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(path, f"field {key!r} must be an integer, got {value!r}", line)
    if value < minimum:
        raise TraceError(path, f"field {key!r} must be at least {minimum}, got {value}", line)
    return value


def _mooncake_row(text: str, path: Path, line: int) -> tuple[float, int, int, tuple[int, ...]]:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise TraceError(path, f"not valid JSON ({exc})", line) from None
    if not isinstance(obj, dict):
        raise TraceError(path, "a Mooncake row must be a JSON object", line)
    if "timestamp" not in obj:
        raise TraceError(path, "missing field 'timestamp'", line)
    stamp = obj["timestamp"]
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp) or stamp < 0:
        raise TraceError(path, f"field 'timestamp' must be a number of milliseconds >= 0, got {stamp!r}", line)
    input_length = _int_field(obj, "input_length", path, line, 1)
    output_length = _int_field(obj, "output_length", path, line, 1)
    if "hash_ids" not in obj:
        raise TraceError(path, "missing field 'hash_ids'", line)
    ids = obj["hash_ids"]
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
        raise TraceError(path, "field 'hash_ids' must be a list of integers", line)
    expected = -(-input_length // MOONCAKE_BLOCK_TOKENS)
    if len(ids) != expected:
        raise TraceError(
            path,
            f"{len(ids)} hash_ids for input_length={input_length}: "
            f"{MOONCAKE_BLOCK_TOKENS}-token blocks need exactly {expected}",
            line,
        )
    return float(stamp) / 1000.0, input_length, output_length, tuple(ids)


def read_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Rows of a Mooncake JSONL trace (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``);
    blank lines are skipped; at most ``limit`` rows."""
    path = Path(path)
    rows: list[TraceRequest] = []
    for line, text in _lines(path):
        if limit is not None and len(rows) >= limit:
            break
        if not text.strip():
            continue
        stamp, input_length, output_length, ids = _mooncake_row(text, path, line)
        rows.append(TraceRequest(stamp, input_length, output_length, hash_ids=ids))
    if not rows:
        raise TraceError(path, "the trace has no requests")
    return _from_earliest(rows)


# ---------------------------------------------------------------------------------------------------------
# Azure 2023 CSV
# ---------------------------------------------------------------------------------------------------------


def _azure_time(text: str, path: Path, line: int) -> float:
    match = _AZURE_TIME_RE.fullmatch(text.strip())
    if match is None:
        raise TraceError(path, f"bad TIMESTAMP {text!r}: expected 'YYYY-MM-DD HH:MM:SS.fffffff'", line)
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise TraceError(path, f"bad TIMESTAMP {text!r}: a field is out of range", line)
    fraction = match.group(7) or ""
    whole = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    return whole + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def read_azure(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Rows of an Azure LLM inference 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``); at most
    ``limit`` rows. The timestamp's seven fractional digits are kept (``strptime`` takes only six)."""
    path = Path(path)
    lines = _lines(path)
    header_line, header = next(((n, t) for n, t in lines if t.strip()), (0, ""))
    if not header:
        raise TraceError(path, "the trace is empty")
    names = [c.strip() for c in header.split(",")]
    try:
        where = [names.index(column) for column in _AZURE_COLUMNS]
    except ValueError:
        raise TraceError(path, f"header must name the columns {','.join(_AZURE_COLUMNS)}", header_line) from None
    rows: list[TraceRequest] = []
    for line, text in lines:
        if limit is not None and len(rows) >= limit:
            break
        if not text.strip():
            continue
        cells = text.split(",")
        if len(cells) != len(names):
            raise TraceError(path, f"expected {len(names)} columns, found {len(cells)}", line)
        stamp = _azure_time(cells[where[0]], path, line)
        counts: list[int] = []
        for column, index in zip(_AZURE_COLUMNS[1:], where[1:], strict=True):
            cell = cells[index].strip()
            if not cell.isdigit() or int(cell) < 1:
                raise TraceError(path, f"{column} must be a positive integer, got {cell!r}", line)
            counts.append(int(cell))
        rows.append(TraceRequest(stamp, counts[0], counts[1]))
    if not rows:
        raise TraceError(path, "the trace has no requests")
    return _from_earliest(rows)


# ---------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------


def detect_format(path: str | Path) -> Literal["mooncake", "azure"]:
    """The format of a trace file, from its first non-empty line: a JSON object with ``hash_ids`` is
    Mooncake, the Azure header is Azure. Anything else is a TraceError asking for ``--trace-format``."""
    path = Path(path)
    for line, text in _lines(path):
        stripped = text.strip()
        if not stripped:
            continue
        if stripped.startswith("{"):
            try:
                obj = json.loads(stripped)
            except ValueError:
                raise TraceError(path, "the first row looks like JSON but does not parse", line) from None
            if isinstance(obj, dict) and "hash_ids" in obj:
                return "mooncake"
        elif [c.strip() for c in stripped.split(",")][:3] == list(_AZURE_COLUMNS):
            return "azure"
        raise TraceError(
            path, "unknown trace format (neither Mooncake JSONL nor Azure 2023 CSV); pass --trace-format", line
        )
    raise TraceError(path, "the trace is empty")


def read_trace(path: str | Path, trace_format: str | None = None, limit: int | None = None) -> list[TraceRequest]:
    """Rows of a Mooncake or Azure trace, detecting the format unless it is given."""
    fmt = trace_format or detect_format(path)
    if fmt == "mooncake":
        return read_mooncake(path, limit)
    if fmt == "azure":
        return read_azure(path, limit)
    raise TraceError(path, f"cannot read a trace file as {fmt!r}; file formats are mooncake and azure")


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines (1-based) without their line ends; unreadable files and bad bytes become TraceErrors."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise TraceError(path, f"cannot open the trace: {exc.strerror or exc}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise TraceError(path, "not UTF-8 text", number) from None


def _from_earliest(rows: Sequence[TraceRequest]) -> list[TraceRequest]:
    """Rows in arrival order (stable), timed from the earliest row (the first one of a sorted trace), so a
    slice of a trace starts at once and an unsorted one gets no negative offset."""
    earliest = min(r.arrival for r in rows)
    ordered = sorted(rows, key=lambda r: r.arrival)
    if earliest == 0.0:
        return ordered
    return [replace(r, arrival=r.arrival - earliest) for r in ordered]
