"""``fleetroute loadgen``: replay a trace (or a synthetic workload) against an endpoint and report.

``add_loadgen_arguments`` and ``run_loadgen`` are wired into the ``fleetroute`` CLI; ``python -m loadgen.cli``
runs the same command stand-alone.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emulator.cli import loop_factory
from loadgen.arrivals import retime, scale_arrivals
from loadgen.output import write_results
from loadgen.report import DEFAULT_PERCENTILES, DEFAULT_SLOS, format_summary, parse_goodput
from loadgen.runner import LoadOptions, LoadResult, run_load
from loadgen.synthetic import SyntheticWorkload, generate_synthetic
from loadgen.traces import TRACE_FORMATS, TraceError, TraceRequest, read_trace

__all__ = ["add_loadgen_arguments", "load_requests", "main", "run_loadgen"]

_DEFAULTS = SyntheticWorkload()


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _turns(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        return (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX turns, got {text!r}") from None


def add_loadgen_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ``fleetroute loadgen`` flag (see docs/loadgen.md)."""
    target = parser.add_argument_group("target")
    target.add_argument("--url", "--base-url", dest="url", default="http://127.0.0.1:8000", help="server root")
    target.add_argument("--endpoint", choices=("completions", "chat"), default="completions", help="API to call")
    target.add_argument("--model", help="model to request (default: first id of GET /v1/models)")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (OPENAI_API_KEY)")

    work = parser.add_argument_group("workload")
    work.add_argument("--trace", type=Path, metavar="FILE", help="trace file (Mooncake JSONL or Azure 2023 CSV)")
    work.add_argument("--trace-format", choices=TRACE_FORMATS, help="override detection; synthetic needs no file")
    work.add_argument("--max-requests", type=int, metavar="N", help="send at most the first N requests")
    work.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of arrivals, filler text and synthetic workloads"
    )

    timing = parser.add_argument_group("arrivals and limits")
    timing.add_argument(
        "--rate-scale", type=float, default=1.0, metavar="K", help="replay the trace K times faster (default 1)"
    )
    timing.add_argument(
        "--rate", type=float, metavar="R", help="re-time requests as Poisson arrivals at R req/s ('inf': all at 0)"
    )
    timing.add_argument(
        "--burstiness", type=float, metavar="B", help="gamma shape of --rate arrivals (1 = Poisson, <1 burstier)"
    )
    timing.add_argument("--max-concurrency", type=int, metavar="N", help="at most N requests in flight")
    timing.add_argument("--duration", type=float, metavar="S", help="stop issuing requests after S seconds")
    timing.add_argument(
        "--drain-timeout", type=float, default=60.0, metavar="S", help="after --duration, wait S s (default 60)"
    )
    timing.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="fail a request whose stream is silent for S s (default 600)",
    )

    synth = parser.add_argument_group("synthetic workload (--trace-format synthetic)")
    synth.add_argument(
        "--sessions", type=int, default=_DEFAULTS.sessions, help=f"conversations (default {_DEFAULTS.sessions})"
    )
    synth.add_argument("--tenants", type=int, default=_DEFAULTS.tenants, help=f"tenants (default {_DEFAULTS.tenants})")
    synth.add_argument(
        "--session-rate",
        type=float,
        default=_DEFAULTS.session_rate,
        help=f"conversations/s, all tenants ({_DEFAULTS.session_rate:g})",
    )
    synth.add_argument(
        "--tenant-skew",
        type=float,
        default=_DEFAULTS.tenant_skew,
        help=f"tenant i gets 1/(i+1)^skew of the rate ({_DEFAULTS.tenant_skew:g})",
    )
    synth.add_argument("--tenant-rates", type=_floats, help="conversations/s per tenant, e.g. 1,0.5,0.25")
    synth.add_argument(
        "--turns",
        type=_turns,
        default=(_DEFAULTS.min_turns, _DEFAULTS.max_turns),
        help=f"turns per conversation, MIN:MAX ({_DEFAULTS.min_turns}:{_DEFAULTS.max_turns})",
    )
    synth.add_argument(
        "--system-prompt-tokens",
        type=int,
        default=_DEFAULTS.system_prompt_tokens,
        help=f"shared system prompt per tenant ({_DEFAULTS.system_prompt_tokens})",
    )
    synth.add_argument(
        "--user-tokens", type=int, default=_DEFAULTS.user_tokens, help=f"mean user message ({_DEFAULTS.user_tokens})"
    )
    synth.add_argument(
        "--output-tokens", type=int, default=_DEFAULTS.output_tokens, help=f"mean reply ({_DEFAULTS.output_tokens})"
    )
    synth.add_argument(
        "--range-ratio",
        type=float,
        default=_DEFAULTS.range_ratio,
        help=f"lengths uniform within +-ratio of the mean ({_DEFAULTS.range_ratio:g})",
    )
    synth.add_argument(
        "--think-time",
        type=float,
        default=_DEFAULTS.think_time,
        help=f"mean pause before a follow-up turn, s ({_DEFAULTS.think_time:g})",
    )

    report = parser.add_argument_group("report")
    default_slos = " ".join(f"{k}:{v:g}" for k, v in DEFAULT_SLOS.items())
    report.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help=f"SLOs (default {default_slos})")
    report.add_argument(
        "--metric-percentiles",
        type=_floats,
        default=DEFAULT_PERCENTILES,
        metavar="P,P",
        help="percentiles (default 90,99)",
    )
    report.add_argument(
        "--output", type=Path, metavar="FILE.json", help="summary JSON; per-request rows go to the .jsonl beside it"
    )
    report.add_argument("--detailed", action="store_true", help="add per-request arrays to the summary JSON")
    report.add_argument("--plots", type=Path, metavar="DIR", help="directory for PNG plots (default: next to --output)")
    report.add_argument("--no-plots", action="store_true", help="no plots, even with --output")
    report.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a TTY")
    report.add_argument("--request-id-prefix", help="prefix of X-Request-Id headers (default: random)")


def _synthetic(args: argparse.Namespace) -> SyntheticWorkload:
    return SyntheticWorkload(
        sessions=args.sessions,
        tenants=len(args.tenant_rates) if args.tenant_rates else args.tenants,
        session_rate=args.session_rate,
        tenant_skew=args.tenant_skew,
        tenant_rates=args.tenant_rates,
        min_turns=args.turns[0],
        max_turns=args.turns[1],
        system_prompt_tokens=args.system_prompt_tokens,
        user_tokens=args.user_tokens,
        output_tokens=args.output_tokens,
        range_ratio=args.range_ratio,
        think_time=args.think_time,
        seed=args.seed,
    )


def load_requests(args: argparse.Namespace) -> list[TraceRequest]:
    """The requests of the run, timed: the trace or synthetic workload, then ``--rate`` or ``--rate-scale``.
    Raises TraceError for a bad trace and ValueError for bad parameters."""
    if args.trace_format == "synthetic":
        requests = generate_synthetic(_synthetic(args))
    elif args.trace is None:
        raise ValueError("give --trace FILE, or --trace-format synthetic")
    else:
        requests = read_trace(args.trace, args.trace_format, args.max_requests)
    if args.rate is not None:
        if args.rate_scale != 1.0:
            raise ValueError("--rate re-times the requests; it cannot be combined with --rate-scale")
        return retime(requests, args.rate, args.burstiness or 1.0, args.seed)
    if args.burstiness is not None:
        raise ValueError("--burstiness shapes --rate arrivals; give --rate too")
    return scale_arrivals(requests, args.rate_scale)


def _options(args: argparse.Namespace) -> LoadOptions:
    slos = parse_goodput(args.goodput) if args.goodput else dict(DEFAULT_SLOS)
    return LoadOptions(
        endpoint=args.endpoint,
        model=args.model,
        max_requests=args.max_requests,
        duration=args.duration,
        drain_timeout=args.drain_timeout,
        max_concurrency=args.max_concurrency,
        request_timeout=args.request_timeout,
        seed=args.seed,
        slos=slos,
        percentiles=tuple(args.metric_percentiles),
        detailed=args.detailed,
        progress=args.progress or sys.stderr.isatty(),
        api_key=args.api_key,
        request_id_prefix=args.request_id_prefix,
    )


def _metadata(args: argparse.Namespace, options: LoadOptions, result: LoadResult, count: int) -> dict[str, Any]:
    """vLLM's run description keys, plus what a trace replay needs to be reproduced."""
    return {
        "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if options.endpoint == "chat" else "openai",
        "base_url": args.url,
        "model_id": result.model,
        "num_prompts": count,
        "request_rate": args.rate if args.rate is not None else "trace",
        "burstiness": args.burstiness or 1.0,
        "rate_scale": args.rate_scale,
        "max_concurrency": options.max_concurrency,
        "trace": str(args.trace) if args.trace else None,
        "trace_format": args.trace_format or "auto",
        "seed": options.seed,
        "goodput_slos_ms": dict(options.slos),
        "wall_time": result.wall_time,
    }


def run_loadgen(args: argparse.Namespace) -> int:
    """Run the command; 0 if every request completed, 1 if any failed, 2 for bad input."""
    try:
        requests = load_requests(args)
        options = _options(args)
        options.validate()
    except (TraceError, ValueError) as exc:
        print(f"fleetroute loadgen: error: {exc}", file=sys.stderr)
        return 2
    count = min(len(requests), options.max_requests or len(requests))
    print(f"replaying {count} requests against {args.url} ({options.endpoint}) ...", file=sys.stderr)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        result = runner.run(run_load(args.url, requests, options))
    print(format_summary(result.summary))
    if args.output is not None:
        summary_path, rows_path = write_results(
            args.output, result.summary, result.records, _metadata(args, options, result, count)
        )
        print(f"wrote {summary_path} and {rows_path}", file=sys.stderr)
    plots_dir = args.plots or (args.output.parent if args.output is not None else None)
    if plots_dir is not None and not args.no_plots:
        stem = args.output.stem if args.output is not None else "loadgen"
        for path in _plots(result, plots_dir, stem, options):
            print(f"wrote {path}", file=sys.stderr)
    summary = result.summary
    return 0 if summary["failed"] == 0 and summary["completed"] > 0 else 1


def _plots(result: LoadResult, directory: Path, stem: str, options: LoadOptions) -> list[Path]:
    from loadgen.plots import write_plots

    return write_plots(result.records, directory, stem, options.slos)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetroute loadgen", description=__doc__.splitlines()[0] if __doc__ else "")
    add_loadgen_arguments(parser)
    return run_loadgen(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
