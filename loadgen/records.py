"""The per-request record: the one thing a report is computed from.

The live client fills records from the wire; the fleet simulator fills the same records from simulated
time, so both get their summary from the same code (:mod:`loadgen.report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RequestRecord", "record_from_row", "record_to_row"]


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times are seconds; ``scheduled`` and ``start`` count from the start of
    the run, the others from ``start``."""

    request_id: str
    tenant: str = "default"
    session_id: str | None = None
    turn: int = 0
    #: When the request was due (trace arrival, or think time after the previous turn).
    scheduled: float = 0.0
    #: When it was sent (later than ``scheduled`` when ``--max-concurrency`` held it back).
    start: float = 0.0
    #: Prompt tokens sent (computed by the client with the shared tokenizer).
    input_len: int = 0
    #: Output tokens received: the usage chunk's ``completion_tokens``, else the number of content chunks.
    output_len: int = 0
    #: Time to the first chunk with content; None if none arrived.
    ttft: float | None = None
    #: Gaps between consecutive content chunks.
    itls: list[float] = field(default_factory=list)
    #: Time to the end of the stream, or to the failure.
    e2e: float = 0.0
    #: ``usage.prompt_tokens_details.cached_tokens`` (0 when not reported).
    cached_tokens: int = 0
    #: ``usage.prompt_tokens`` as the server counted them; None without a usage chunk.
    prompt_tokens: int | None = None
    #: Why the request failed; None if it completed.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def end(self) -> float:
        """When the request finished or failed, from the start of the run."""
        return self.start + self.e2e

    @property
    def tpot(self) -> float | None:
        """vLLM's time per output token, excluding the first: ``(e2e - ttft) / (output_len - 1)``; None for a
        failed request, one without a first token, or one with a single output token."""
        if self.error is not None or self.ttft is None or self.output_len < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_len - 1)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def record_to_row(record: RequestRecord) -> dict[str, Any]:
    """One JSONL row (AIPerf-like: one object per request; latencies in ms, run times in s)."""
    return {
        "request_id": record.request_id,
        "tenant": record.tenant,
        "session_id": record.session_id,
        "turn": record.turn,
        "scheduled_s": record.scheduled,
        "start_s": record.start,
        "input_len": record.input_len,
        "output_len": record.output_len,
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "ttft_ms": _ms(record.ttft),
        "tpot_ms": _ms(record.tpot),
        "e2el_ms": _ms(record.e2e),
        "itl_ms": [gap * 1000.0 for gap in record.itls],
        "error": record.error,
    }


def record_from_row(row: Mapping[str, Any]) -> RequestRecord:
    """The record a JSONL row was written from (up to float rounding of the ms conversion)."""
    ttft = row.get("ttft_ms")
    return RequestRecord(
        request_id=str(row["request_id"]),
        tenant=str(row.get("tenant", "default")),
        session_id=row.get("session_id"),
        turn=int(row.get("turn", 0)),
        scheduled=float(row.get("scheduled_s", 0.0)),
        start=float(row.get("start_s", 0.0)),
        input_len=int(row.get("input_len", 0)),
        output_len=int(row.get("output_len", 0)),
        ttft=None if ttft is None else float(ttft) / 1000.0,
        itls=[float(g) / 1000.0 for g in row.get("itl_ms", [])],
        e2e=float(row.get("e2el_ms") or 0.0) / 1000.0,
        cached_tokens=int(row.get("cached_tokens", 0)),
        prompt_tokens=row.get("prompt_tokens"),
        error=row.get("error"),
    )
