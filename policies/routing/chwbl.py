"""Consistent hashing with bounded loads (CHWBL): prefix affinity with a hard cap on any replica's share.

Sources: Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads" (SODA'18); KubeAI's
``PrefixHash`` balancer (``internal/loadbalancer/balance_chwbl.go``) and SGLang's ``prefix_hash`` policy
(reference anchors §2, §7, §10.5). Requests with the same key land on the same replica while it is not
overloaded, with no shared state: every router replica builds the same ring from the same replica ids, so
affinity survives scaling the router out. That makes it the natural stateless baseline for a multi-router
deployment.

Rule: each replica id owns ``virtual_nodes`` points on a 64-bit ring (KubeAI: xxhash of ``id + str(i)``, 256
points). A request's key hashes to a point; walk clockwise to the first replica whose in-flight requests,
counting this one, stay within ``ceil(load_factor · (total + 1) / n)`` (``total`` = in-flight requests over
the n eligible replicas, ``load_factor`` 1.25). Counting the new request is Mirrokni et al.'s acceptance
test and KubeAI's ``load + 1 <= threshold``; it guarantees that no replica ever exceeds the cap as a result
of a placement, and that some replica always qualifies when ``load_factor >= 1``. KubeAI compares against
the real-valued threshold; the ceiling is the paper's integer capacity.

Key: the session id when the request has one (a conversation stays together even after its prompt
outgrows the key), else the prompt's first ``key_blocks`` router prefix blocks. The router's block hashes
are chained, so the K-th hash alone stands for the whole K-block prefix: O(1), no per-token work. The
default of 4 blocks covers about 256 tokens (4 × 256 bytes at ~4 bytes per token live; 4 × 64 tokens in
the simulator), SGLang ``prefix_hash``'s 256 tokens. KubeAI keys on the first 100 characters of the first
user message instead. A prompt shorter than one block has no block hash; it is keyed by its request id,
so unrelated short prompts spread (the router does not keep their text).

The ring is cached and rebuilt only when an unseen replica id appears (or, to bound memory under churn,
when remembered ids outnumber the eligible ones 2:1). Ids not eligible right now are skipped during the
walk, so a retry that excludes one replica, or a replica briefly unhealthy, does not move other keys.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any

import xxhash

from policies.routing.base import Decision, FleetView, ReplicaView, RequestFeatures, RoutingPolicy, require_replicas
from policies.routing.pipeline import check_float, check_int, stable_hash

_MASK64 = (1 << 64) - 1


def ring_point(replica_id: str, vnode: int) -> int:
    """Position of a replica's ``vnode``-th virtual node: xxh64 of ``id + str(vnode)``, as KubeAI hashes it."""
    return xxhash.xxh64_intdigest(f"{replica_id}{vnode}".encode())


class Chwbl(RoutingPolicy):
    """Ring walk to the first replica under the bounded-load cap."""

    name = "chwbl"

    def __init__(
        self, load_factor: float = 1.25, virtual_nodes: int = 256, key_blocks: int = 4, use_session: bool = True
    ) -> None:
        self.load_factor = check_float("load_factor", load_factor, minimum=1.0)
        self.virtual_nodes = check_int("virtual_nodes", virtual_nodes, minimum=1)
        self.key_blocks = check_int("key_blocks", key_blocks, minimum=1)
        if not isinstance(use_session, bool):
            raise ValueError(f"use_session must be a bool, got {use_session!r}")
        self.use_session = use_session
        self._members: set[str] = set()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _rebuild(self, ids: set[str]) -> None:
        ring = sorted((ring_point(rid, v), rid) for rid in ids for v in range(self.virtual_nodes))
        self._points = [p for p, _ in ring]
        self._owners = [rid for _, rid in ring]
        self._members = set(ids)

    def key(self, request: RequestFeatures) -> int:
        """The request's ring position (see the module docstring for what is hashed)."""
        if self.use_session and request.session_id is not None:
            return stable_hash("session:" + request.session_id)
        blocks = request.block_hashes
        if blocks:
            chained = blocks[min(self.key_blocks, len(blocks)) - 1] & _MASK64
            return xxhash.xxh64_intdigest(chained.to_bytes(8, "little"))
        return stable_hash("request:" + request.request_id)

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        members = self._members
        if len(members) > 2 * len(replicas) or any(r.replica_id not in members for r in replicas):
            current = {r.replica_id for r in replicas}
            union = members | current
            self._rebuild(union if len(union) <= 2 * len(current) else current)
        by_id: dict[str, ReplicaView] = {r.replica_id: r for r in replicas}
        n = len(by_id)
        total = sum(r.inflight_requests for r in by_id.values())
        cap = math.ceil(self.load_factor * (total + 1) / n)
        points, owners = self._points, self._owners
        size = len(points)
        start = bisect_left(points, self.key(request)) % size
        seen: set[str] = set()
        first: ReplicaView | None = None
        for step in range(size):
            rid = owners[(start + step) % size]
            r = by_id.get(rid)
            if r is None or rid in seen:
                continue
            if first is None:
                first = r
            if r.inflight_requests + 1 <= cap:
                reason = "home" if not seen else "spill"
                return Decision(
                    r,
                    reason,
                    {"cap": float(cap), "inflight_requests": float(r.inflight_requests), "walked": float(len(seen))},
                )
            seen.add(rid)
            if len(seen) == n:
                break
        # Unreachable for load_factor >= 1 (some replica is below the cap); kept as KubeAI's default endpoint.
        assert first is not None
        return Decision(first, "overloaded", {"cap": float(cap), "inflight_requests": float(first.inflight_requests)})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "load_factor": self.load_factor,
            "virtual_nodes": self.virtual_nodes,
            "key_blocks": self.key_blocks,
            "use_session": self.use_session,
        }
