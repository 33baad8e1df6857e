"""``fleetroute demo``: an emulated fleet, the router, a short trace replay per policy, a result table.

For each policy: fresh emulated replicas (cold caches, so runs compare fairly), a router in front of
them, and the same slice of the Mooncake conversation trace replayed open-loop through it. Latencies
are reported in emulated model time (wall time × the emulator's speed-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from emulator.profiles import load_profile
from emulator.server import Replica, ReplicaConfig
from loadgen.arrivals import scale_arrivals
from loadgen.report import DEFAULT_SLOS
from loadgen.runner import LoadOptions, run_load
from loadgen.traces import read_trace
from policies.routing.registry import resolve_policy_name
from router.app import RouterService
from router.config import load_settings

DEFAULT_TRACE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mooncake_conversation_head500.jsonl"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=4, help="emulated replicas (default 4)")
    parser.add_argument("--requests", type=int, default=200, help="trace rows to replay (default 200)")
    parser.add_argument("--speed", type=float, default=5.0, help="emulator speed-up (default 5)")
    parser.add_argument("--rate-scale", type=float, default=2.0, help="replay the trace K times faster (default 2)")
    parser.add_argument(
        "--policies", default="round_robin,least_tokens,default", help="comma-separated routing policies"
    )
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake JSONL trace")


@contextlib.asynccontextmanager
async def _fleet(count: int, speed: float) -> AsyncIterator[list[str]]:
    profile = load_profile("h100-llama3-8b")
    runners: list[web.AppRunner] = []
    urls: list[str] = []
    try:
        for i in range(count):
            replica = Replica(ReplicaConfig(profile=profile, speed=speed, seed=i, replica_index=i))
            runner = web.AppRunner(replica.app, handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


async def _run_policy(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    trace = read_trace(args.trace, limit=args.requests)
    # The trace's own clock is model time; the emulator runs `speed` times faster.
    arrivals = scale_arrivals(trace, args.rate_scale * args.speed)
    slos = {k: v / args.speed for k, v in DEFAULT_SLOS.items()}
    async with _fleet(args.replicas, args.speed) as urls:
        settings = load_settings(
            {
                "host": "127.0.0.1",
                "port": 0,
                "admin_port": None,
                "replicas": [f"{u},kind=emulator" for u in urls],
                "policy": policy,
                "log_level": "WARNING",
                "health": {"interval_s": 0.2},
                "scrape_interval_s": 0.2,
            }
        )
        service = RouterService(settings)
        await service.start()
        try:
            deadline = time.monotonic() + 10
            while not service.fleet.has_healthy() or len(service.fleet.models()) == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("emulated replicas did not become healthy")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # let every replica pass its first check
            started = time.perf_counter()
            result = await run_load(f"http://127.0.0.1:{service.port}", arrivals, LoadOptions(slos=slos))
            wall = time.perf_counter() - started
        finally:
            await service.stop()
    s = result.summary
    k = args.speed
    return {
        "policy": policy,
        "resolved": resolve_policy_name(policy),
        "completed": s["completed"],
        "failed": s["failed"],
        "median_ttft_ms": s["median_ttft_ms"] * k,
        "p99_ttft_ms": s["p99_ttft_ms"] * k,
        "median_tpot_ms": s["median_tpot_ms"] * k,
        "prefix_cache_hit_rate": s["prefix_cache_hit_rate"],
        "slo_attainment": s["slo_attainment"],
        "wall_s": wall,
    }


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    header = (
        f"{'policy':<28} {'done':>5} {'fail':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
        f"{'cache hit':>9} {'SLO met':>8}"
    )
    lines = [
        f"{args.requests} Mooncake conversation requests at {args.rate_scale:g}x their recorded rate, "
        f"{args.replicas} emulated H100 replicas (Llama-3-8B); latencies in model time",
        f"SLO: TTFT <= {DEFAULT_SLOS['ttft']:.0f} ms and TPOT <= {DEFAULT_SLOS['tpot']:.0f} ms",
        "",
        header,
        "-" * len(header),
    ]
    for r in rows:
        name = r["policy"] if r["policy"] == r["resolved"] else f"{r['policy']} ({r['resolved']})"
        lines.append(
            f"{name:<28} {r['completed']:>5} {r['failed']:>4} {r['median_ttft_ms']:>7.0f}ms "
            f"{r['p99_ttft_ms']:>7.0f}ms {r['median_tpot_ms']:>7.1f}ms {r['prefix_cache_hit_rate']:>9.1%} "
            f"{r['slo_attainment']:>8.1%}"
        )
    return "\n".join(lines)


async def _demo(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    rows = []
    for policy in policies:
        print(f"running {policy} ...", flush=True)
        rows.append(await _run_policy(policy, args))
    print()
    print(format_table(rows, args))
    return 1 if any(r["failed"] for r in rows) else 0


def run_demo(args: argparse.Namespace) -> int:
    from emulator.cli import loop_factory

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_demo(args))
