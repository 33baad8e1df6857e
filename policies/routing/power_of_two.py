"""Power of two random choices: sample two distinct replicas, send to the less loaded.

Source: SGLang model gateway ``sgl-model-gateway/src/policies/power_of_two.rs`` (reference anchors §2), after
Mitzenmacher's "power of two choices". Sampling two instead of scanning all keeps most of least-load's
balance while spreading simultaneous decisions (several routers acting on one stale view do not all pile
onto the same minimum).

Rule, as in SGLang: ``i`` uniform over the n replicas, ``j = (i + 1 + uniform(n − 1)) mod n`` (distinct in
O(1)); compare the two token loads; ``load_i <= load_j`` keeps ``i``. SGLang's token loads come from a monitor
polling each worker's ``/get_load`` every 10 s, and it falls back to the router's in-flight request counts for
both when either worker lacks one. Here the token load is the router's own outstanding prefill + decode
tokens (``ReplicaView.inflight_tokens``), which is always known and current, so the fallback never applies.
"""

from __future__ import annotations

import random
from typing import Any

from policies.routing.base import Decision, FleetView, RequestFeatures, RoutingPolicy, require_replicas
from policies.routing.pipeline import check_int


class PowerOfTwo(RoutingPolicy):
    """Two distinct seeded-random candidates; the one with fewer outstanding tokens wins (ties: the first)."""

    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int("seed", seed)
        self._rng = random.Random(self.seed)

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        n = len(replicas)
        if n == 1:
            return Decision(replicas[0], "single", {"load": float(replicas[0].inflight_tokens)})
        i = self._rng.randrange(n)
        j = (i + 1 + self._rng.randrange(n - 1)) % n
        a, b = replicas[i], replicas[j]
        load_a, load_b = a.inflight_tokens, b.inflight_tokens
        pick = a if load_a <= load_b else b
        return Decision(
            pick, "power_of_two", {"load": float(min(load_a, load_b)), "other_load": float(max(load_a, load_b))}
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "load": "inflight_prefill_tokens + inflight_decode_tokens"}
