"""``fleetroute bench``: capacity at SLO for a list of policies and traces, in the simulator.

For every (trace, policy): the largest rate scale at which ≥ 90 % of requests meet the SLOs (bisection),
with latency figures at that load; then every policy again at one reference load per trace (80 % of
``round_robin``'s capacity when it is in the list), where tail latencies compare like for like.
Jobs run in parallel processes. Writes ``DIR/results.json``, ``DIR/report.md`` and PNGs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emulator.profiles import load_profile
from emulator.sim.capacity import find_capacity, run_at
from emulator.sim.fleet import SimConfig
from loadgen.report import DEFAULT_SLOS
from loadgen.traces import MOONCAKE_BLOCK_TOKENS, TRACE_FORMATS, TraceRequest, read_trace
from policies.routing import available_routing_policies
from policies.routing.registry import resolve_policy_name

#: The anchors' algorithms, re-implemented for comparison (docs/policies.md).
ANCHOR_POLICIES = ("sglang_cache_aware", "llmd_scorer", "dynamo_cost", "preble_e2")
#: Policies whose source scrapes engine metrics at its own default period (llm-d: 50 ms); the rest use
#: the router's 1 s.
NATIVE_SCRAPE_INTERVAL_S = {"llmd_scorer": 0.05}


@dataclass(frozen=True)
class Job:
    trace_path: str
    trace_format: str | None
    max_requests: int | None
    policy: str
    replicas: int
    profile: str
    seed: int
    rate_scale: float | None  # None: find capacity; else one run at this scale


def ideal_hit_rate(trace: Sequence[TraceRequest]) -> float | None:
    """Token-weighted prefix hit rate of one infinite cache that has seen every earlier request."""
    if not any(r.hash_ids for r in trace):
        return None
    seen: set[int] = set()
    hit = total = 0
    for r in trace:
        ids = r.hash_ids or ()
        total += r.input_length
        for i, h in enumerate(ids):
            if h not in seen:
                break
            hit += min(MOONCAKE_BLOCK_TOKENS, r.input_length - i * MOONCAKE_BLOCK_TOKENS)
        # a request never hits its own last token (the engine recomputes at least one)
        seen.update(ids)
    return hit / total if total else None


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "prefix_cache_hit_rate")
    return {k: summary.get(k) for k in keys}


def _run_job(job: Job) -> dict[str, Any]:
    trace = read_trace(Path(job.trace_path), job.trace_format, limit=job.max_requests)
    config = SimConfig(
        profile=load_profile(job.profile),
        replicas=job.replicas,
        policy=job.policy,
        seed=job.seed,
        scrape_interval_s=NATIVE_SCRAPE_INTERVAL_S.get(job.policy, 1.0),
    )
    started = time.perf_counter()
    if job.rate_scale is None:
        found = find_capacity(trace, config)
        best = found.best_passing(0.9)
        row: dict[str, Any] = {
            "capacity_rate_scale": found.capacity_rate_scale,
            "probes": [{"rate_scale": p.rate_scale, "attainment": p.attainment} for p in found.probes],
            **(_figures(best.summary) if best else {}),
        }
        if best is not None:
            row["preemptions"] = sum(r["preemptions"] for r in best.replicas)
            row["drain_s"] = best.drain_s
    else:
        result, att = run_at(trace, config, job.rate_scale)
        row = {"rate_scale": job.rate_scale, "attainment": att, "drain_s": result.drain_s, **_figures(result.summary)}
    row.update({"trace": job.trace_path, "policy": job.policy, "wall_s": time.perf_counter() - started})
    return row


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, action="append", required=True, help="trace file; repeat for more")
    parser.add_argument("--trace-format", choices=TRACE_FORMATS)
    parser.add_argument("--max-requests", type=int, help="use only the first N rows of each trace")
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--profile", default="h100-llama3-8b")
    parser.add_argument(
        "--policies",
        default="round_robin,least_tokens,default",
        help=f"comma-separated: {', '.join(available_routing_policies())}",
    )
    parser.add_argument("--jobs", type=int, default=max(1, multiprocessing.cpu_count()), help="parallel processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="output directory")


def _map(jobs: list[Job], processes: int) -> list[dict[str, Any]]:
    if processes <= 1:
        return [_run_job(j) for j in jobs]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.map(_run_job, jobs, chunksize=1)


def run_bench(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in available_routing_policies()]
    if unknown:
        print(f"fleetroute bench: unknown policies: {', '.join(unknown)}", file=sys.stderr)
        return 2
    traces: dict[str, list[TraceRequest]] = {}
    try:
        for path in args.trace:
            traces[str(path)] = read_trace(path, args.trace_format, limit=args.max_requests)
    except (ValueError, OSError) as exc:
        print(f"fleetroute bench: {exc}", file=sys.stderr)
        return 2
    base = Job("", args.trace_format, args.max_requests, "", args.replicas, args.profile, args.seed, None)
    started = time.perf_counter()
    jobs = [replace(base, trace_path=t, policy=p) for t in traces for p in policies]
    print(f"capacity search: {len(jobs)} jobs on {args.jobs} processes ...", file=sys.stderr)
    capacity_rows = _map(jobs, args.jobs)
    reference: dict[str, float] = {}
    for t in traces:
        rr = [r for r in capacity_rows if r["trace"] == t and r["policy"] == "round_robin"]
        if rr and rr[0]["capacity_rate_scale"] > 0:
            reference[t] = 0.8 * rr[0]["capacity_rate_scale"]
    ref_jobs = [replace(base, trace_path=t, policy=p, rate_scale=reference[t]) for t in reference for p in policies]
    reference_rows = _map(ref_jobs, args.jobs) if ref_jobs else []
    rows = _assemble(capacity_rows, reference_rows, traces)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    report = _report(rows, args, time.perf_counter() - started)
    (args.output / "report.md").write_text(report)
    _plot(rows, args.output)
    print(report)
    return 0


def _assemble(
    capacity_rows: list[dict[str, Any]], reference_rows: list[dict[str, Any]], traces: dict[str, list[TraceRequest]]
) -> list[dict[str, Any]]:
    out = []
    for t, trace in traces.items():
        ideal = ideal_hit_rate(trace)
        rows_t = [r for r in capacity_rows if r["trace"] == t]
        rr = next((r["capacity_rate_scale"] for r in rows_t if r["policy"] == "round_robin"), None)
        anchors = [r["capacity_rate_scale"] for r in rows_t if resolve_policy_name(r["policy"]) in ANCHOR_POLICIES]
        best_anchor = max(anchors) if anchors else None
        for r in rows_t:
            ref = next((x for x in reference_rows if x["trace"] == t and x["policy"] == r["policy"]), None)
            row = {
                "trace": Path(t).name,
                "policy": r["policy"],
                "capacity_rate_scale": r["capacity_rate_scale"],
                "vs_round_robin": r["capacity_rate_scale"] / rr if rr else None,
                "vs_best_anchor": r["capacity_rate_scale"] / best_anchor if best_anchor else None,
                "median_ttft_ms": r.get("median_ttft_ms"),
                "p99_ttft_ms": r.get("p99_ttft_ms"),
                "median_tpot_ms": r.get("median_tpot_ms"),
                "p99_tpot_ms": r.get("p99_tpot_ms"),
                "prefix_cache_hit_rate": r.get("prefix_cache_hit_rate"),
                "ideal_prefix_hit_rate": ideal,
                "preemptions": r.get("preemptions"),
                "drain_s": r.get("drain_s"),
                "probes": r["probes"],
            }
            if ref is not None:
                row["reference_rate_scale"] = ref["rate_scale"]
                row["reference"] = {k: v for k, v in ref.items() if k not in ("trace", "policy", "wall_s")}
            out.append(row)
    return out


def _fmt(v: object, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> str:
    lines = [
        "# Capacity at SLO (simulator)",
        "",
        f"{args.replicas} × `{args.profile}` replicas; SLO: TTFT ≤ {DEFAULT_SLOS['ttft']:.0f} ms and TPOT ≤ "
        f"{DEFAULT_SLOS['tpot']:.0f} ms for ≥ 90 % of requests. Capacity = largest trace rate scale meeting it "
        f"(bisection, 4 % precision). Latencies, hit rate and drain (last arrival to last completion: work "
        f"left when the load stopped) at that capacity; `p99 TTFT @ref` at 80 % of round_robin's capacity. "
        f"Wall time {wall:.0f} s.",
        "",
        "| trace | policy | capacity (×) | vs RR | vs best anchor | median TTFT ms | p99 TTFT ms | p99 TPOT ms "
        "| prefix hit | ideal hit | drain s | p99 TTFT @ref ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = r.get("reference", {})
        lines.append(
            f"| {r['trace']} | {r['policy']} | {_fmt(r['capacity_rate_scale'], '.3f')} | "
            f"{_fmt(r['vs_round_robin'], '.2f')} | {_fmt(r['vs_best_anchor'], '.2f')} | "
            f"{_fmt(r['median_ttft_ms'], '.0f')} | {_fmt(r['p99_ttft_ms'], '.0f')} | {_fmt(r['p99_tpot_ms'], '.1f')} | "
            f"{_fmt(r['prefix_cache_hit_rate'], '.1%')} | {_fmt(r['ideal_prefix_hit_rate'], '.1%')} | "
            f"{_fmt(r.get('drain_s'), '.0f')} | {_fmt(ref.get('p99_ttft_ms'), '.0f')} |"
        )
    lines += ["", "![capacity](capacity.png)", ""]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: the report has no picture
        return
    traces = sorted({r["trace"] for r in rows})
    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for ax, t in zip(axes[0], traces, strict=True):
        sub = [r for r in rows if r["trace"] == t]
        ax.bar([r["policy"] for r in sub], [r["capacity_rate_scale"] for r in sub], color="tab:blue")
        ax.set_title(t)
        ax.set_ylabel("capacity at SLO (rate scale ×)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=110)
    plt.close(fig)
