"""Session affinity: every request of a session goes to the replica that served its first one.

Multi-turn conversations resend the whole history, so the replica holding the previous turn's KV serves the
next turn from cache. Sources: SMG's ``manual`` policy (sticky routing key, LRU with a 4 h TTL;
sgl-model-gateway ``src/policies``, reference anchors §2), Dynamo's session affinity with TTL
(``X-Dynamo-Session-ID``, anchors §5), vLLM Router's ``sticky_least_loaded``.

Rule: a request with a ``session_id`` goes to the replica bound to it if that replica is still eligible;
otherwise (first request, binding expired or evicted, or the replica gone, draining or unhealthy) it goes to
the replica with the fewest outstanding tokens (``least_tokens``) and the session is (re)bound there. A
request without a session id goes least-tokens.

Memory is bounded: bindings live in an LRU map of at most ``max_sessions`` entries, each keyed by a 64-bit
hash of the session id (so a long id costs no more than a short one; about 200 bytes an entry), and
expire ``ttl_s`` after last use. Time is the snapshot's ``FleetView.now`` (simulated time in the simulator),
so the policy stays a pure function of its inputs and its own map.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from policies.routing.base import Decision, FleetView, RequestFeatures, RoutingPolicy, require_replicas
from policies.routing.least_tokens import LeastTokens
from policies.routing.pipeline import check_float, check_int, stable_hash


class SessionAffinity(RoutingPolicy):
    """Sticky per session (LRU + TTL bounded); least outstanding tokens for first binding and rebinding."""

    name = "session_affinity"

    def __init__(self, max_sessions: int = 65536, ttl_s: float = 14400.0) -> None:
        self.max_sessions = check_int("max_sessions", max_sessions, minimum=1)
        self.ttl_s = check_float("ttl_s", ttl_s, minimum=0.0, min_open=True)
        #: session hash → (replica id, last use); oldest use first.
        self._bindings: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._least = LeastTokens()

    def __len__(self) -> int:
        return len(self._bindings)

    def _expire(self, now: float) -> None:
        bindings, deadline = self._bindings, now - self.ttl_s
        while bindings:
            _, (_, last) = next(iter(bindings.items()))
            if last >= deadline:
                break
            bindings.popitem(last=False)

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        if request.session_id is None:
            d = self._least.choose(request, fleet)
            return Decision(d.replica, "no_session", d.scores)
        now = fleet.now
        self._expire(now)
        key = stable_hash(request.session_id)
        bound = self._bindings.get(key)
        reason = "bound"
        if bound is not None:
            replica_id, last = bound
            if now - last <= self.ttl_s:
                for r in replicas:
                    if r.replica_id == replica_id:
                        self._bindings[key] = (replica_id, now)
                        self._bindings.move_to_end(key)
                        return Decision(r, "sticky", {"outstanding_tokens": float(r.inflight_tokens)})
            reason = "rebound"
        d = self._least.choose(request, fleet)
        self._bindings[key] = (d.replica.replica_id, now)
        self._bindings.move_to_end(key)
        if len(self._bindings) > self.max_sessions:
            self._bindings.popitem(last=False)
        return Decision(d.replica, reason, d.scores)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "max_sessions": self.max_sessions, "ttl_s": self.ttl_s}
