"""Load generation: trace readers, an open-loop OpenAI client that times every token, reports.

The programmatic API in one place::

    from loadgen import LoadOptions, read_trace, scale_arrivals, run_load
    requests = scale_arrivals(read_trace("trace.jsonl", limit=100), 10.0)
    result = await run_load("http://127.0.0.1:8000", requests, LoadOptions(endpoint="chat"))
    result.summary["p99_ttft_ms"], result.records[0].ttft
"""

from loadgen.arrivals import gamma_intervals, retime, scale_arrivals
from loadgen.records import RequestRecord
from loadgen.report import DEFAULT_SLOS, format_summary, parse_goodput, summarize, throughput_timeline
from loadgen.runner import LoadOptions, LoadResult, run_load
from loadgen.synthetic import SyntheticWorkload, generate_synthetic
from loadgen.traces import TraceError, TraceRequest, detect_format, read_azure, read_mooncake, read_trace

__all__ = [
    "DEFAULT_SLOS",
    "LoadOptions",
    "LoadResult",
    "RequestRecord",
    "SyntheticWorkload",
    "TraceError",
    "TraceRequest",
    "detect_format",
    "format_summary",
    "gamma_intervals",
    "generate_synthetic",
    "parse_goodput",
    "read_azure",
    "read_mooncake",
    "read_trace",
    "retime",
    "run_load",
    "scale_arrivals",
    "summarize",
    "throughput_timeline",
]
