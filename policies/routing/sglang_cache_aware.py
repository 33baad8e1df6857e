"""SGLang router's ``cache_aware`` policy: prefix affinity, switching to least-loaded when load is imbalanced.

Source: sgl-project/sglang ``sgl-model-gateway/src/policies/cache_aware.rs`` (reference anchors §2, §10.3),
with the Python launcher's CLI defaults (``router_args.py``; SMG docs ``getting-started/load-balancing.md``):
``cache_threshold`` 0.3, ``balance_abs_threshold`` 64, ``balance_rel_threshold`` 1.5. (The library's
``CacheAwareConfig::default()`` differs: 0.5 / 32 / 1.1.)

Rule, per request, with ``load`` = router-tracked in-flight requests per worker:

1. ``imbalanced = (max_load − min_load) > balance_abs_threshold and max_load > balance_rel_threshold · min_load``;
   if so, the least-loaded worker.
2. Otherwise ``match_rate = matched / prompt`` for the worker with the longest prefix match; if
   ``match_rate > cache_threshold`` (strictly), that worker; else the least-loaded worker. That is the newer
   rule: older sgl-router chose the worker with the *smallest tree* on a miss, which piled misses onto an
   overloaded worker (sglang PR #14305).

Ties: the least-loaded worker is the first minimum in fleet order (Rust's ``min_by_key``). Among workers with
equal longest matches SGLang takes whichever tenant its tree node lists first; here the least-loaded of them,
then fleet order.

Substitution: SGLang matches the request's raw *characters* against a per-router approximate radix tree;
``match_rate`` is matched characters / text characters. Here ``prefix_match_tokens / prompt_tokens`` from the
router's prefix index, which matches whole blocks (256 bytes live, ``prefix_block_tokens`` in the simulator),
so a trailing partial block never counts and the rate is at most one block low. Both record the chosen
replica for every request, including load-balanced ones.
"""

from __future__ import annotations

from typing import Any

from policies.routing.base import Decision, FleetView, RequestFeatures, RoutingPolicy, require_replicas
from policies.routing.pipeline import check_float, check_int, prefix_ratio


class SglangCacheAware(RoutingPolicy):
    """SGLang's cache-aware rule with its CLI defaults (0.3 / 64 / 1.5)."""

    name = "sglang_cache_aware"

    def __init__(
        self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5
    ) -> None:
        self.cache_threshold = check_float("cache_threshold", cache_threshold, minimum=0.0, maximum=1.0)
        self.balance_abs_threshold = check_int("balance_abs_threshold", balance_abs_threshold, minimum=0)
        self.balance_rel_threshold = check_float("balance_rel_threshold", balance_rel_threshold, minimum=0.0)

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        loads = [r.inflight_requests for r in replicas]
        lo, hi = min(loads), max(loads)
        least = loads.index(lo)
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            return Decision(replicas[least], "imbalanced", {"load": float(lo), "max_load": float(hi)})
        best_match = max(r.prefix_match_tokens for r in replicas)
        rate = prefix_ratio(request.prompt_tokens, best_match)
        if rate > self.cache_threshold:
            holders = [i for i, r in enumerate(replicas) if r.prefix_match_tokens == best_match]
            pick = min(holders, key=loads.__getitem__)
            return Decision(replicas[pick], "cache_hit", {"match_rate": rate, "load": float(loads[pick])})
        return Decision(replicas[least], "cache_miss", {"match_rate": rate, "load": float(lo)})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cache_threshold": self.cache_threshold,
            "balance_abs_threshold": self.balance_abs_threshold,
            "balance_rel_threshold": self.balance_rel_threshold,
            "load": "inflight_requests",
        }
