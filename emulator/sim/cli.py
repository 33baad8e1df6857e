"""``fleetroute sim``: replay a trace through N emulated engines and a routing policy, in virtual time."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from emulator.profiles import builtin_profile_names, load_profile
from emulator.sim.fleet import FleetSimulator, SimConfig
from loadgen.arrivals import scale_arrivals
from loadgen.report import DEFAULT_SLOS, format_summary, parse_goodput
from loadgen.traces import TRACE_FORMATS, TraceError, read_trace
from policies.routing import available_routing_policies
from policies.scheduling import available_scheduling_policies


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, required=True, help="trace file (Mooncake JSONL or Azure CSV)")
    parser.add_argument("--trace-format", choices=TRACE_FORMATS, help="override format detection")
    parser.add_argument("--replicas", type=int, default=16, help="emulated engines (default 16)")
    parser.add_argument(
        "--profile", default="h100-llama3-8b", help=f"engine profile: {', '.join(builtin_profile_names())} or YAML"
    )
    parser.add_argument("--policy", default="default", help=f"routing: {', '.join(available_routing_policies())}")
    parser.add_argument("--policy-params", default="{}", help="JSON object of policy parameters")
    parser.add_argument(
        "--engine-scheduler", default="fcfs", choices=available_scheduling_policies(), help="engine-level policy"
    )
    parser.add_argument("--rate-scale", type=float, default=1.0, help="replay K times faster than recorded")
    parser.add_argument("--max-requests", type=int, help="replay only the first N rows")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="router's metrics scrape period (s)")
    parser.add_argument("--goodput", nargs="*", default=None, help="SLOs, vLLM syntax: ttft:2000 tpot:100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the summary JSON here (per-request rows in .jsonl)")


def run_sim(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.profile)
        trace = read_trace(args.trace, args.trace_format, limit=args.max_requests)
        params = json.loads(args.policy_params)
        slos = parse_goodput(args.goodput) if args.goodput else dict(DEFAULT_SLOS)
    except (ValueError, TraceError, OSError) as exc:
        print(f"fleetroute sim: {exc}", file=sys.stderr)
        return 2
    if args.rate_scale != 1.0:
        trace = scale_arrivals(trace, args.rate_scale)
    config = SimConfig(
        profile=profile,
        replicas=args.replicas,
        policy=args.policy,
        policy_params=params,
        engine_scheduler=args.engine_scheduler,
        scrape_interval_s=args.scrape_interval,
        seed=args.seed,
        slos=slos,
    )
    started = time.perf_counter()
    try:
        result = FleetSimulator(config).run(trace)
    except ValueError as exc:
        print(f"fleetroute sim: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - started
    summary = {
        **result.summary,
        "policy": args.policy,
        "replicas": args.replicas,
        "profile": profile.name,
        "rate_scale": args.rate_scale,
        "trace": str(args.trace),
        "virtual_time_s": result.virtual_time_s,
        "drain_s": result.drain_s,
        "wall_time_s": wall,
        "per_replica": result.replicas,
    }
    print(format_summary(summary, title=f"Simulation: {args.policy} on {args.replicas} x {profile.name}"))
    print(
        f"simulated {result.virtual_time_s:.0f} s in {wall:.1f} s wall ({result.events} events); "
        f"the last request finished {result.drain_s:.1f} s after the last arrival"
    )
    if args.output is not None:
        from loadgen.output import write_results

        write_results(args.output, summary, result.records, {"command": "sim"})
    return 0
