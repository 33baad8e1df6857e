"""The router as the simulator models it: what it knows of each engine, when it knows it.

* Accounting (in-flight requests, outstanding prefill and decode tokens) is exact and current, as in
  the live router, which updates it on every streamed chunk.
* Engine metrics (running, waiting, KV usage) are scraped every ``scrape_interval_s`` (each replica at
  its own phase) and read as of the last scrape, with their age.
* The prefix index is the live router's :class:`~router.prefix_index.PrefixIndex`, fed with the same
  kind of block keys at dispatch time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from emulator.engine import DecodeSpan, EngineCore
from policies.routing.base import Decision, FleetView, ReplicaView, RequestFeatures, RoutingPolicy
from router.prefix_index import PrefixIndex
from router.residency import ResidencyModel


@dataclass(slots=True)
class Scraped:
    time: float
    num_running: int
    num_waiting: int
    kv_usage: float


@dataclass(slots=True)
class ReplicaBook:
    """The router's books on one replica."""

    replica_id: str
    index: int
    engine: EngineCore
    inflight_requests: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    kv_tokens: int = 0
    prefill_new_tokens: int = 0
    prefill_attention: float = 0.0
    tpot_sensitivity: float = 0.0
    scraped: Scraped | None = None
    next_scrape: float = 0.0
    span: DecodeSpan | None = None


class RouterModel:
    def __init__(
        self,
        engines: Sequence[EngineCore],
        policy: RoutingPolicy,
        scrape_interval_s: float,
        prefix_block_tokens: int,
        prefix_index_bytes: int,
        model_residency: bool = True,
    ) -> None:
        self.books = [
            ReplicaBook(f"replica-{i}", i, e, next_scrape=scrape_interval_s * (i + 0.5) / len(engines))
            for i, e in enumerate(engines)
        ]
        self.policy = policy
        self.scrape_interval_s = scrape_interval_s
        self.block_tokens = prefix_block_tokens
        self.index = PrefixIndex(prefix_index_bytes, block_bytes=prefix_block_tokens)
        self.residency = ResidencyModel(self.index) if model_residency else None
        for b in self.books:
            self.index.add_replica(b.replica_id)
            if self.residency is not None:
                self.residency.set_capacity(b.replica_id, b.engine.profile.kv_capacity_tokens, prefix_block_tokens)
        self.decisions = 0

    def _scrape_due(self, now: float) -> None:
        interval = self.scrape_interval_s
        for b in self.books:
            if now >= b.next_scrape:
                e = b.engine
                b.scraped = Scraped(now, e.num_running, e.num_waiting, e.kv_usage)
                b.next_scrape += interval * max(1, int((now - b.next_scrape) // interval) + 1)

    def _view(self, b: ReplicaBook, now: float, match_tokens: int) -> ReplicaView:
        decode = b.decode_tokens
        kv = b.kv_tokens
        if b.span is not None:
            # Tokens streamed so far in a span that is still running count as received.
            streamed = b.span.steps_done_by(now) * b.span.num_seqs
            decode -= streamed
            kv += streamed
        s = b.scraped
        return ReplicaView(
            replica_id=b.replica_id,
            index=b.index,
            inflight_requests=b.inflight_requests,
            inflight_prefill_tokens=b.prefill_tokens,
            inflight_decode_tokens=max(0, decode),
            inflight_kv_tokens=kv,
            inflight_prefill_new_tokens=b.prefill_new_tokens,
            inflight_prefill_attention=b.prefill_attention,
            tpot_sensitivity=b.tpot_sensitivity,
            num_running=None if s is None else s.num_running,
            num_waiting=None if s is None else s.num_waiting,
            kv_usage=None if s is None else s.kv_usage,
            scrape_age_s=None if s is None else now - s.time,
            kv_capacity_tokens=b.engine.profile.kv_capacity_tokens,
            prefix_match_tokens=match_tokens,
        )

    def choose(self, features: RequestFeatures, router_keys: Sequence[int], now: float) -> tuple[ReplicaBook, Decision]:
        self._scrape_due(now)
        matched = self.index.match(router_keys) if router_keys else {}
        bt = self.block_tokens
        view = FleetView(replicas=[self._view(b, now, matched.get(b.replica_id, 0) * bt) for b in self.books], now=now)
        decision = self.policy.choose(features, view)
        book = self.books[decision.replica.index]
        if router_keys:
            if self.residency is not None:
                self.residency.record(book.replica_id, router_keys)
            else:
                self.index.record(book.replica_id, router_keys)
        self.decisions += 1
        return book, decision
