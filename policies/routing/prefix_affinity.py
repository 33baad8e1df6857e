"""Ours: send each request where its first token is expected soonest.

For every eligible replica the policy estimates the request's time to first token from what the router
knows, in the engine's own cost terms (the emulator's step-time model, sim-traces.md §1.10):

* **own prefill**: only the tokens the replica does not already hold (the prefix index's match) must be
  computed, at ``a`` ms per token plus causal attention ``c·n·(m + n/2)``;
* **queued prefill**: the uncached tokens and attention work of requests the router sent there that
  have not produced a first token yet: chunked prefill serves them first;
* **decode drag**: every step that carries that prefill also carries the replica's running decodes,
  which read their whole context (``b`` ms per KV token) — a replica full of long contexts prefills
  slowly;
* **KV pressure**: a replica whose in-flight KV would pass ``kv_headroom`` of its capacity will preempt
  (recompute) someone; the estimate adds the recompute of the tokens over the line
  (``kv_overflow_weight · a`` per token), so a long cached prefix can still outweigh a little overflow.

The request goes to the replica with the lowest
``estimate + (fleet_work_weight + tpot_harm_weight · tpot_sensitivity) · own prefill``. The first part of
the second term values the compute a cache hit saves the whole fleet (at high load, capacity *is*
compute), beyond this one request's latency. The second prices the harm the prefill does to the requests
decoding there: every step that carries a chunk of it is slower for all of them, and a request streaming
five tokens misses a 100 ms TPOT after a single 8k-token chunk where a 500-token one barely notices
(``tpot_sensitivity`` sums ``1/(max_tokens − 1)`` over the replica's requests in flight). Cache affinity
and load balance are thereby one trade-off in one unit (milliseconds): a hot prefix stays on its replica
while the saved prefill outweighs the queue there, and spills to a second replica (which then caches it
too) as soon as it does not.

A request that cannot meet the TTFT SLO anywhere (a 100k-token prompt with nothing cached takes longer
than 2 s to prefill on an idle H100) is sent where it disturbs fewest others instead of where it would
finish first, which would stall the requests that can still meet their SLO behind it
(``unreachable="isolate"``, the default): among the replicas where its own prefill costs at most
``isolation_slack_ms`` more than on the cheapest (a replica holding its prefix saves seconds of compute
that everyone there would otherwise wait through), the one with the fewest requests in flight. Such
requests then tend to share the replicas already busy with one: the fleet meets the SLO for far more
requests, at the price of a long tail for the requests that could not meet it anyway.
``unreachable="soonest"`` trades the other way. Simulator results behind these choices: docs/policies.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from policies.routing.base import Decision, FleetView, ReplicaView, RequestFeatures, RoutingPolicy, require_replicas


class PrefixAffinity(RoutingPolicy):
    name = "prefix_affinity"

    def __init__(
        self,
        prefill_ms_per_token: float = 0.0208,
        attention_ms_per_unit: float = 1.0e-6,
        decode_ms_per_kv_token: float = 4.9e-5,
        step_ms: float = 7.3,
        token_budget: int = 8192,
        kv_headroom: float = 0.9,
        kv_overflow_weight: float = 1.0,
        fleet_work_weight: float = 3.0,
        slo_ttft_ms: float = 2000.0,
        unreachable: str = "isolate",
        tpot_harm_weight: float = 10.0,
        isolation_slack_ms: float = 1000.0,
    ) -> None:
        for name, value in (
            ("prefill_ms_per_token", prefill_ms_per_token),
            ("attention_ms_per_unit", attention_ms_per_unit),
            ("decode_ms_per_kv_token", decode_ms_per_kv_token),
            ("step_ms", step_ms),
            ("kv_overflow_weight", kv_overflow_weight),
            ("fleet_work_weight", fleet_work_weight),
            ("tpot_harm_weight", tpot_harm_weight),
            ("isolation_slack_ms", isolation_slack_ms),
        ):
            if value < 0:
                raise ValueError(f"{name} must be non-negative")
        if token_budget < 1:
            raise ValueError("token_budget must be at least 1")
        if not 0 < kv_headroom <= 1:
            raise ValueError("kv_headroom must be in (0, 1]")
        self.a = prefill_ms_per_token
        self.c = attention_ms_per_unit
        self.b = decode_ms_per_kv_token
        self.step_ms = step_ms
        self.budget = token_budget
        self.kv_headroom = kv_headroom
        self.kv_overflow_weight = kv_overflow_weight
        self.fleet_work_weight = fleet_work_weight
        if slo_ttft_ms <= 0:
            raise ValueError("slo_ttft_ms must be positive")
        self.slo_ttft_ms = slo_ttft_ms
        if unreachable not in ("isolate", "soonest"):
            raise ValueError("unreachable must be 'isolate' or 'soonest'")
        self.unreachable = unreachable
        self.tpot_harm_weight = tpot_harm_weight
        self.isolation_slack_ms = isolation_slack_ms
        self._tiebreak = 0

    def own_prefill_ms(self, request: RequestFeatures, r: ReplicaView) -> tuple[float, int]:
        """Compute time of this request's uncached prompt on ``r``, and its uncached token count."""
        p = max(request.prompt_tokens, 1)
        m = max(0, min(r.prefix_match_tokens, p - 1))
        n = p - m
        return self.a * n + self.c * n * (m + n / 2), n

    def estimate_ttft_ms(self, request: RequestFeatures, r: ReplicaView) -> float:
        return self._estimate_ms(*self.own_prefill_ms(request, r), r)

    def _estimate_ms(self, own: float, n: int, r: ReplicaView) -> float:
        """The TTFT estimate given this request's own prefill time and uncached tokens on ``r``."""
        queued = self.a * r.inflight_prefill_new_tokens + self.c * r.inflight_prefill_attention
        steps = math.ceil((r.inflight_prefill_new_tokens + n) / self.budget)
        drag = steps * (self.step_ms + self.b * r.inflight_kv_tokens)
        return own + queued + drag

    def _kv_pressure_ms(self, request: RequestFeatures, r: ReplicaView) -> float:
        """Recompute expected from preemption: the tokens by which in-flight KV would pass the headroom."""
        capacity = r.kv_capacity_tokens
        if not capacity:
            return 0.0
        over = r.inflight_kv_tokens + request.prompt_tokens + request.max_tokens - self.kv_headroom * capacity
        return self.kv_overflow_weight * self.a * over if over > 0 else 0.0

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        self._tiebreak += 1
        n = len(replicas)
        best_i, best_cost, best_ttft = 0, math.inf, 0.0
        soonest = math.inf
        ttfts = [0.0] * n
        owns = [0.0] * n
        for i in range(n):
            j = (i + self._tiebreak) % n  # rotate the scan so exact ties spread
            r = replicas[j]
            own, new = self.own_prefill_ms(request, r)
            ttft = self._estimate_ms(own, new, r) + self._kv_pressure_ms(request, r)
            ttfts[j] = ttft
            owns[j] = own
            soonest = min(soonest, ttft)
            cost = ttft + (self.fleet_work_weight + self.tpot_harm_weight * r.tpot_sensitivity) * own
            if cost < best_cost:
                best_i, best_cost, best_ttft = j, cost, ttft
        if soonest > self.slo_ttft_ms and self.unreachable == "isolate":
            j = self._isolate(replicas, owns, ttfts)
            return Decision(replicas[j], "slo_unreachable", {"estimated_ttft_ms": ttfts[j]})
        return Decision(replicas[best_i], "min_cost", {"estimated_ttft_ms": best_ttft, "cost_ms": best_cost})

    def _isolate(self, replicas: Sequence[ReplicaView], owns: list[float], ttfts: list[float]) -> int:
        """Where a request that misses its TTFT SLO anyway delays fewest others: fewest requests in flight
        among the replicas where its own prefill is within the slack of the cheapest (its cache)."""
        limit = min(owns) + self.isolation_slack_ms
        candidates = [k for k in range(len(replicas)) if owns[k] <= limit]
        return min(candidates, key=lambda k: (replicas[k].inflight_requests, owns[k], ttfts[k]))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prefill_ms_per_token": self.a,
            "attention_ms_per_unit": self.c,
            "decode_ms_per_kv_token": self.b,
            "step_ms": self.step_ms,
            "token_budget": self.budget,
            "kv_headroom": self.kv_headroom,
            "kv_overflow_weight": self.kv_overflow_weight,
            "fleet_work_weight": self.fleet_work_weight,
            "slo_ttft_ms": self.slo_ttft_ms,
            "unreachable": self.unreachable,
            "tpot_harm_weight": self.tpot_harm_weight,
            "isolation_slack_ms": self.isolation_slack_ms,
        }
