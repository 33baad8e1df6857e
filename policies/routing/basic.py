"""Load-oblivious and request-count policies: round robin, random, least requests."""

from __future__ import annotations

import random

from policies.routing.base import Decision, FleetView, RequestFeatures, RoutingPolicy, require_replicas


class RoundRobin(RoutingPolicy):
    """Cycle through the eligible replicas in order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        pick = replicas[self._next % len(replicas)]
        self._next += 1
        return Decision(pick, "rotation")


class RandomChoice(RoutingPolicy):
    """Uniformly random replica (seeded, so simulations are reproducible)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        return Decision(self._rng.choice(require_replicas(fleet)), "random")


class LeastRequests(RoutingPolicy):
    """Fewest requests in flight (router accounting); ties rotate so equal replicas share load."""

    name = "least_requests"

    def __init__(self) -> None:
        self._tiebreak = 0

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        self._tiebreak += 1
        n = len(replicas)
        best = min(range(n), key=lambda i: (replicas[i].inflight_requests, (i - self._tiebreak) % n))
        pick = replicas[best]
        return Decision(pick, "least_requests", {"inflight_requests": float(pick.inflight_requests)})
