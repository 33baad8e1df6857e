"""Preble's E2 (exploit / explore) global scheduler, reconstructed over the router's snapshot.

Source: Srivatsa et al., "Preble: Efficient Distributed Prompt Scheduling for LLM Serving" (ICLR'25,
arXiv 2407.00023) and WukLab/preble ``preble/global_scheduler_with_time.py`` (reference papers §6.3,
anchors §7); AIBrix's port ``pkg/plugins/gateway/algorithms/prefix_cache_preble.go`` for the cost model's
constants.

Rule. Let ``m`` be the longest cached prefix of the request on any replica (``prefix_match_tokens``) and
``new = prompt_tokens − m``.

* Exploit when ``m > new`` (Preble: the leaf's own tokens are fewer than its shared context): the replica
  holding the longest match; among several, the one with the lowest load cost ``L``.
* Explore otherwise: argmin over all replicas of ``L + M + P``.

Cost model (Preble §3 and papers §6.3), in milliseconds, rebuilt from what the router knows:

* ``L`` (load over the recent window H = 3 min): Preble sums, over the prefix nodes assigned to the GPU in
  the window, ``miss_rate · count · prefill_time`` plus ``active_refs · median_output_len · median_TPOT``.
  Here the prefill part is the sum of ``prefill_time(missed tokens)`` of every request this policy sent to
  the replica in the last ``window_s`` (the same total, counted per request instead of per node, since
  miss_rate · count over a node's requests is their missed work), kept in ``window_buckets`` time buckets
  so memory is bounded. The decode part uses the router's outstanding decode tokens of requests in flight
  (``inflight_decode_tokens`` × ``tpot_ms``) in place of active references × median output length.
* ``M`` (eviction): Preble charges the prefill time of the cached nodes the new request would evict, weighted
  by their hit counts. The router cannot see which cached blocks are idle; blocks idle in the engine's LRU
  have no observable reuse and are charged nothing, while KV that does not fit beside the requests in
  flight (``max(kv_usage · C, inflight_kv_tokens) + missed − C``, when the capacity C is known) is charged
  its recompute time.
* ``P``: ``prefill_time(prompt_tokens − prefix_match_tokens)`` on that replica.
* ``prefill_time(n) = prefill_ms_fixed + prefill_ms_per_token · n`` (0 for n = 0): the linear part of Preble's
  profiled Mistral-7B / A6000 model (0.1084 ms/token + 4.21 ms, as AIBrix ports it); the profile's attention
  terms are left out. ``tpot_ms``: Preble measures each GPU's median TPOT over its last 200 requests
  (0.15 s before the first); the snapshot has no TPOT, so it is a parameter, 30 ms by default (a 7-8B
  model's decode step at moderate batch, reference sim-traces §1.10).

Not reproduced: Preble's post-assignment rebalancing (important-node stealing) and hot-prefix replication,
which move prefix ownership between GPUs, and its per-GPU fair priority queue (an engine-level policy).
Granularity: matches are at the router prefix index's block size, not Preble's token-level radix tree. A
retry (``choose`` again after a failed attempt) records the request's prefill once more, a small over-count.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from policies.routing.base import Decision, FleetView, RequestFeatures, RoutingPolicy, require_replicas
from policies.routing.pipeline import check_float, check_int


class PrebleE2(RoutingPolicy):
    """Exploit the longest cached prefix when it outweighs the new tokens, else the least ``L + M + P``."""

    name = "preble_e2"

    def __init__(
        self,
        window_s: float = 180.0,
        window_buckets: int = 12,
        prefill_ms_per_token: float = 0.1084,
        prefill_ms_fixed: float = 4.21,
        tpot_ms: float = 30.0,
    ) -> None:
        self.window_s = check_float("window_s", window_s, minimum=0.0, min_open=True)
        self.window_buckets = check_int("window_buckets", window_buckets, minimum=1)
        self.prefill_ms_per_token = check_float("prefill_ms_per_token", prefill_ms_per_token, minimum=0.0)
        self.prefill_ms_fixed = check_float("prefill_ms_fixed", prefill_ms_fixed, minimum=0.0)
        self.tpot_ms = check_float("tpot_ms", tpot_ms, minimum=0.0)
        self._bucket_s = self.window_s / self.window_buckets
        #: (bucket number, replica id → prefill ms recorded in it), oldest first.
        self._buckets: deque[tuple[int, dict[str, float]]] = deque()
        #: replica id → prefill ms over the window (the sum of its entries in ``_buckets``).
        self._window: dict[str, float] = {}

    def prefill_ms(self, tokens: int) -> float:
        return 0.0 if tokens <= 0 else self.prefill_ms_fixed + self.prefill_ms_per_token * tokens

    def _advance(self, now: float) -> int:
        bucket = math.floor(now / self._bucket_s)
        buckets, window = self._buckets, self._window
        while buckets and buckets[0][0] <= bucket - self.window_buckets:
            _, old = buckets.popleft()
            for rid, ms in old.items():
                left = window.get(rid, 0.0) - ms
                if left > 1e-9:
                    window[rid] = left
                else:
                    window.pop(rid, None)
        return bucket

    def _record(self, bucket: int, replica_id: str, ms: float) -> None:
        if ms <= 0.0:
            return
        if not self._buckets or self._buckets[-1][0] < bucket:
            self._buckets.append((bucket, {}))
        latest = self._buckets[-1][1]  # a clock that steps back lands in the newest bucket
        latest[replica_id] = latest.get(replica_id, 0.0) + ms
        self._window[replica_id] = self._window.get(replica_id, 0.0) + ms

    def window_load_ms(self, replica_id: str) -> float:
        """Prefill milliseconds this policy sent to the replica within the window (as of the last decision)."""
        return self._window.get(replica_id, 0.0)

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        bucket = self._advance(fleet.now)
        prompt = max(0, request.prompt_tokens)
        matches = [min(max(0, r.prefix_match_tokens), prompt) for r in replicas]
        window, tpot = self._window, self.tpot_ms
        loads = [window.get(r.replica_id, 0.0) + tpot * r.inflight_decode_tokens for r in replicas]
        longest = max(matches)
        if longest > prompt - longest:
            holders = [i for i, m in enumerate(matches) if m == longest]
            pick = min(holders, key=loads.__getitem__)
            reason, scores = "exploit", {"load_ms": loads[pick], "match_tokens": float(longest)}
        else:
            published = [r.kv_capacity_tokens for r in replicas if r.kv_capacity_tokens]
            fleet_capacity = max(published) if published else None
            best_cost, pick, parts = math.inf, 0, (0.0, 0.0, 0.0)
            for i, r in enumerate(replicas):
                missed = prompt - matches[i]
                evict = 0.0
                cap = r.kv_capacity_tokens or fleet_capacity
                if cap:
                    held = max(r.kv_usage * cap if r.kv_usage is not None else 0.0, float(r.inflight_kv_tokens))
                    overflow = held + missed - cap
                    evict = self.prefill_ms(math.ceil(overflow)) if overflow > 0 else 0.0
                new = self.prefill_ms(missed)
                cost = loads[i] + evict + new
                if cost < best_cost:
                    best_cost, pick, parts = cost, i, (loads[i], evict, new)
            reason = "explore"
            scores = {"cost_ms": best_cost, "load_ms": parts[0], "eviction_ms": parts[1], "prefill_ms": parts[2]}
        chosen = replicas[pick]
        self._record(bucket, chosen.replica_id, self.prefill_ms(prompt - matches[pick]))
        return Decision(chosen, reason, scores)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "window_s": self.window_s,
            "window_buckets": self.window_buckets,
            "prefill_ms_per_token": self.prefill_ms_per_token,
            "prefill_ms_fixed": self.prefill_ms_fixed,
            "tpot_ms": self.tpot_ms,
        }
