"""Token-aware least load: the replica with the fewest outstanding tokens.

Kossmann et al. ("Is the GPU Half-Empty or Half-Full?", arXiv 2410.17840) route with SAL, "token-aware
load balancing"; its exact formula is not published, so this is the reconstruction documented in
docs/policies.md: ``argmin(outstanding prefill tokens + decode_weight · outstanding decode tokens)``, both
from the router's own accounting, so the signal is current at every decision rather than a scrape old.
"""

from __future__ import annotations

from typing import Any

from policies.routing.base import Decision, FleetView, RequestFeatures, RoutingPolicy, require_replicas


class LeastTokens(RoutingPolicy):
    """Fewest outstanding prefill + weighted decode tokens; ties rotate."""

    name = "least_tokens"

    def __init__(self, decode_weight: float = 1.0) -> None:
        if decode_weight < 0:
            raise ValueError("decode_weight must be non-negative")
        self.decode_weight = decode_weight
        self._tiebreak = 0

    def load(self, prefill_tokens: int, decode_tokens: int) -> float:
        return prefill_tokens + self.decode_weight * decode_tokens

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        self._tiebreak += 1
        n = len(replicas)
        loads = [self.load(r.inflight_prefill_tokens, r.inflight_decode_tokens) for r in replicas]
        best = min(range(n), key=lambda i: (loads[i], (i - self._tiebreak) % n))
        return Decision(replicas[best], "least_tokens", {"outstanding_tokens": loads[best]})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "decode_weight": self.decode_weight}
