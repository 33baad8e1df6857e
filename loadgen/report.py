"""The benchmark summary, computed from per-request records only.

A pure function of :class:`RequestRecord` lists (no clocks, no I/O), so a live run and the fleet simulator
report identically. Keys, units and definitions follow vLLM's ``bench serve`` result JSON; the few
additions (``slo_attainment``, ``prefix_cache_hit_rate``) are documented in ``docs/loadgen.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from loadgen.records import RequestRecord

__all__ = [
    "DEFAULT_PERCENTILES",
    "DEFAULT_SLOS",
    "METRICS",
    "Timeline",
    "format_summary",
    "parse_goodput",
    "percentile",
    "summarize",
    "throughput_timeline",
]

#: Latency metrics reported, in vLLM's order and naming.
METRICS: Final = ("ttft", "tpot", "itl", "e2el")
#: The project's SLO defaults (ms): TTFT <= 2 s and TPOT <= 100 ms.
DEFAULT_SLOS: Final[Mapping[str, float]] = MappingProxyType({"ttft": 2000.0, "tpot": 100.0})
DEFAULT_PERCENTILES: Final = (90.0, 99.0)
_SLO_METRICS: Final = ("ttft", "tpot", "e2el")
_TITLES: Final = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def parse_goodput(specs: Iterable[str]) -> dict[str, float]:
    """SLOs in vLLM's ``--goodput`` syntax: ``ttft:2000 tpot:100 e2el:5000`` (milliseconds; items may also
    come as one space-separated string). ValueError names the bad item."""
    slos: dict[str, float] = {}
    for item in (part for spec in specs for part in spec.split()):
        name, sep, value = item.partition(":")
        if not sep or name not in _SLO_METRICS:
            raise ValueError(f"bad goodput item {item!r}: expected <metric>:<ms> with metric one of ttft, tpot, e2el")
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"bad goodput item {item!r}: {value!r} is not a number of milliseconds") from None
        if not limit >= 0 or math.isinf(limit):
            raise ValueError(f"bad goodput item {item!r}: the SLO must be a finite number >= 0")
        slos[name] = limit
    return slos


def percentile(ordered: Sequence[float], p: float) -> float:
    """The ``p``-th percentile of sorted values with linear interpolation (NumPy's default, as vLLM uses);
    0.0 for no values, as vLLM reports empty metrics."""
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats_ms(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    ordered = sorted(v * 1000.0 for v in values_s)
    n = len(ordered)
    mean = math.fsum(ordered) / n if n else 0.0
    variance = math.fsum((v - mean) ** 2 for v in ordered) / n if n else 0.0
    out = {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": percentile(ordered, 50.0),
        f"std_{name}_ms": math.sqrt(variance),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = percentile(ordered, p)
    return out


def _meets(record: RequestRecord, slos: Mapping[str, float]) -> bool:
    """Whether a completed request meets every SLO; like vLLM, a one-token reply counts as TPOT 0."""
    values = {"ttft": record.ttft or 0.0, "tpot": record.tpot or 0.0, "e2el": record.e2e}
    return all(values[name] * 1000.0 <= limit for name, limit in slos.items())


def _max_concurrency(records: Sequence[RequestRecord]) -> int:
    """Peak number of requests in flight at once (half-open ``[start, end)`` intervals)."""
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    peak = level = 0
    for _, step in events:  # at equal times -1 sorts first: a request ending frees its slot first
        level += step
        peak = max(peak, level)
    return peak


@dataclass(frozen=True, slots=True)
class Timeline:
    """Throughput in fixed bins from the start of the run: bin ``i`` covers ``[i*width, (i+1)*width)``."""

    bin_seconds: float
    completed_per_s: list[float]
    output_tokens_per_s: list[float]


def throughput_timeline(records: Sequence[RequestRecord], bin_seconds: float = 1.0) -> Timeline:
    """Completed requests/s (by end time) and output tokens/s (by chunk arrival) of completed requests.
    A request's output tokens are spread evenly over its content chunks (exact at one token per chunk)."""
    done = [(r, r.ttft) for r in records if r.ok and r.ttft is not None]
    if not done:
        return Timeline(bin_seconds, [], [])
    origin = min(r.start for r in records)
    bins = int((max(r.end for r, _ in done) - origin) // bin_seconds) + 1
    completed = [0.0] * bins
    tokens = [0.0] * bins
    for r, ttft in done:
        completed[min(bins - 1, int((r.end - origin) // bin_seconds))] += 1.0 / bin_seconds
        per_chunk = r.output_len / (len(r.itls) + 1) / bin_seconds
        t = r.start + ttft - origin
        tokens[min(bins - 1, int(t // bin_seconds))] += per_chunk
        for gap in r.itls:
            t += gap
            tokens[min(bins - 1, int(t // bin_seconds))] += per_chunk
    return Timeline(bin_seconds, completed, tokens)


def summarize(
    records: Sequence[RequestRecord],
    slos: Mapping[str, float] = DEFAULT_SLOS,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    detailed: bool = False,
) -> dict[str, Any]:
    """The result dict of a run, with vLLM ``bench serve``'s keys.

    ``duration`` spans the first request's start to the last one's end. Token totals, throughputs and latency
    distributions count completed requests only; ``itl`` pools every chunk gap of every completed request;
    ``tpot`` leaves out one-token replies. ``request_goodput`` is the rate of completed requests meeting all
    ``slos`` (ms, keys ttft/tpot/e2el), ``slo_attainment`` their share of completed requests.
    """
    done = [r for r in records if r.ok]
    duration = max(r.end for r in records) - min(r.start for r in records) if records else 0.0
    rate = 1.0 / duration if duration > 0 else 0.0
    total_in = sum(r.input_len for r in done)
    total_out = sum(r.output_len for r in done)
    good = sum(1 for r in done if _meets(r, slos))
    timeline = throughput_timeline(records, 1.0)
    summary: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) * rate,
        "request_goodput": good * rate,
        "output_throughput": total_out * rate,
        "total_token_throughput": (total_in + total_out) * rate,
        "max_output_tokens_per_s": max(timeline.output_tokens_per_s, default=0.0),
        "max_concurrent_requests": _max_concurrency(records),
        "slo_attainment": good / len(done) if done else 0.0,
        "prefix_cache_hit_rate": sum(r.cached_tokens for r in done) / total_in if total_in else 0.0,
    }
    samples: dict[str, list[float]] = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for t in (r.tpot for r in done) if t is not None],
        "itl": [gap for r in done for gap in r.itls],
        "e2el": [r.e2e for r in done],
    }
    for name in METRICS:
        summary.update(_stats_ms(name, samples[name], percentiles))
    if detailed:
        summary.update(
            {
                "input_lens": [r.input_len for r in records],
                "output_lens": [r.output_len if r.ok else 0 for r in records],
                "ttfts": [r.ttft or 0.0 for r in records],
                "itls": [list(r.itls) for r in records],
                "latencies": [r.e2e if r.ok else 0.0 for r in records],
                "start_times": [r.start for r in records],
                "errors": [r.error or "" for r in records],
            }
        )
    return summary


def format_summary(summary: Mapping[str, Any], title: str = "Serving Benchmark Result") -> str:
    """The summary as a text table laid out like vLLM's ``bench serve`` printout."""

    def row(label: str, value: object) -> str:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{label:<40} {text}"

    lines = [
        f"{' ' + title + ' ':=^50}",
        row("Successful requests:", summary["completed"]),
        row("Failed requests:", summary["failed"]),
        row("Benchmark duration (s):", summary["duration"]),
        row("Total input tokens:", summary["total_input_tokens"]),
        row("Total generated tokens:", summary["total_output_tokens"]),
        row("Request throughput (req/s):", summary["request_throughput"]),
        row("Request goodput (req/s):", summary["request_goodput"]),
        row("SLO attainment (%):", 100.0 * summary["slo_attainment"]),
        row("Output token throughput (tok/s):", summary["output_throughput"]),
        row("Peak output token throughput (tok/s):", summary["max_output_tokens_per_s"]),
        row("Peak concurrent requests:", summary["max_concurrent_requests"]),
        row("Total token throughput (tok/s):", summary["total_token_throughput"]),
        row("Prefix cache hit rate (%):", 100.0 * summary["prefix_cache_hit_rate"]),
    ]
    for name in METRICS:
        heading, short = _TITLES[name]
        lines.append(f"{heading:-^50}")
        prefix = f"_{name}_ms"
        for key in summary:
            if key.endswith(prefix) and not key.startswith("std_"):
                stat = key[: -len(prefix)]
                label = {"mean": "Mean", "median": "Median"}.get(stat, stat.upper())
                lines.append(row(f"{label} {short} (ms):", float(summary[key])))
    lines.append("=" * 50)
    return "\n".join(lines)
