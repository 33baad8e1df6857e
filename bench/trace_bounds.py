"""What no router can beat on a trace: prefix-hit ceilings and a floor under tail TTFT.

A router only chooses where each request goes; it cannot make a prompt cheaper than its uncached part on an
idle engine, nor cache more than the fleet's KV holds. For a Mooncake-format trace this prints:

* the token-weighted prefix hit rate of one infinite cache that has seen every earlier request (what
  ``fleetroute bench`` reports as "ideal"), and of one LRU cache as large as the whole fleet's KV (a
  tighter ceiling: 16 engines cannot cache more than that, and running requests need some of it);
* percentiles of each request's TTFT on an idle replica with that infinite cache, estimated with the default
  policy's cost model (prefill, causal attention, step overhead): a floor under any policy's TTFT percentiles.

Usage: ``python bench/trace_bounds.py TRACE [--max-requests N] [--replicas N] [--profile NAME]``.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from emulator.profiles import load_profile
from loadgen.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest, read_trace
from policies.routing.base import ReplicaView, RequestFeatures
from policies.routing.prefix_affinity import PrefixAffinity


def cached_tokens(request: TraceRequest, i: int) -> int:
    """Tokens of ``request`` covered by its first ``i`` blocks."""
    return min(i * MOONCAKE_BLOCK_TOKENS, request.input_length)


def lru_hit_rate(trace: Sequence[TraceRequest], capacity_blocks: int | None) -> tuple[float, list[int]]:
    """Hit rate of one LRU block cache (None: unbounded), and each request's cached tokens."""
    lru: OrderedDict[int, None] = OrderedDict()
    hit = total = 0
    per_request: list[int] = []
    for r in trace:
        ids = r.hash_ids or ()
        run = 0
        while run < len(ids) and ids[run] in lru:
            run += 1
        cached = min(cached_tokens(r, run), r.input_length - 1) if run else 0
        per_request.append(cached)
        hit += cached
        total += r.input_length
        for h in ids:
            lru[h] = None
            lru.move_to_end(h)
        if capacity_blocks is not None:
            while len(lru) > capacity_blocks:
                lru.popitem(last=False)
    return (hit / total if total else 0.0), per_request


def percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q / 100.0 * len(sorted_values)))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--max-requests", type=int, default=3000)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--profile", default="h100-llama3-8b")
    args = parser.parse_args(argv)
    trace = read_trace(args.trace, limit=args.max_requests)
    if not any(r.hash_ids for r in trace):
        raise SystemExit(f"{args.trace}: no hash_ids, so no prefix structure to bound")
    kv_tokens = load_profile(args.profile).kv_capacity_tokens
    infinite, cached = lru_hit_rate(trace, None)
    fleet, _ = lru_hit_rate(trace, args.replicas * kv_tokens // MOONCAKE_BLOCK_TOKENS)
    model = PrefixAffinity()
    floors = sorted(
        model.estimate_ttft_ms(
            RequestFeatures(request_id="", prompt_tokens=r.input_length, max_tokens=r.output_length),
            ReplicaView(replica_id="idle", index=0, prefix_match_tokens=m),
        )
        for r, m in zip(trace, cached, strict=True)
    )
    print(f"{args.trace.name}: {len(trace)} requests")
    print(f"  prefix hit, one infinite cache:                 {infinite:.1%}")
    print(f"  prefix hit, one LRU of {args.replicas} x {kv_tokens:,} KV tokens: {fleet:.1%}")
    print(
        "  TTFT floor (idle replica, infinite cache): "
        f"p50 {percentile(floors, 50):.0f} ms, p90 {percentile(floors, 90):.0f} ms, "
        f"p99 {percentile(floors, 99):.0f} ms; {sum(f > 2000 for f in floors) / len(floors):.1%} over 2 s"
    )


if __name__ == "__main__":
    main()
