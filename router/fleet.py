"""The router's live view of its replicas: health, draining, scraped signals and its own accounting.

Accounting is the primary load signal: every dispatched request holds a :class:`Lease` on its replica
that counts the request, its outstanding prompt tokens (until the first token comes back) and its
outstanding decode tokens (until the stream ends). Leases are released exactly once, whatever happens
to the request, so the counters cannot leak.

With a shared state store (several routers in front of one fleet), each replica also carries the summed
accounting of the *other* routers (:class:`RemoteLoad`, kept current in the background); a policy
sees local + remote, so every router balances on fleet-wide load while its own changes stay instant.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from policies.routing.base import FleetView, ReplicaView, tpot_sensitivity
from router.discovery.base import ReplicaSpec
from router.engine_metrics import EngineSignals


class Health(enum.Enum):
    UNKNOWN = "unknown"  # discovered, not yet checked
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class RemoteLoad:
    """The other routers' in-flight accounting on one replica, summed (same units as ReplicaState's)."""

    requests: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    kv_tokens: int = 0
    prefill_new_tokens: int = 0
    prefill_attention: float = 0.0
    tpot_sensitivity: float = 0.0

    def __add__(self, other: RemoteLoad) -> RemoteLoad:
        return RemoteLoad(
            self.requests + other.requests,
            self.prefill_tokens + other.prefill_tokens,
            self.decode_tokens + other.decode_tokens,
            self.kv_tokens + other.kv_tokens,
            self.prefill_new_tokens + other.prefill_new_tokens,
            self.prefill_attention + other.prefill_attention,
            self.tpot_sensitivity + other.tpot_sensitivity,
        )


@dataclass
class ReplicaState:
    """One replica. Mutated only from the router's event loop."""

    spec: ReplicaSpec
    index: int
    health: Health = Health.UNKNOWN
    draining: bool = False
    removed: bool = False
    models: frozenset[str] = frozenset()
    check_failures: int = 0
    check_successes: int = 0
    last_check_time: float | None = None
    request_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    inflight_decode_tokens: int = 0
    inflight_kv_tokens: int = 0
    inflight_prefill_new_tokens: int = 0
    inflight_prefill_attention: float = 0.0
    inflight_tpot_sensitivity: float = 0.0
    signals: EngineSignals | None = None
    signals_time: float | None = None
    #: Other routers' accounting here (shared state store); None when there is none or it expired.
    remote: RemoteLoad | None = None
    #: Engine scheduling policy last applied to the replica (emulator admin API), if any.
    applied_scheduler: str | None = None

    @property
    def id(self) -> str:
        return self.spec.url

    def is_ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def eligible(self, now: float, model: str | None) -> bool:
        """Whether new requests may go here: healthy, not draining or ejected, and serving ``model``."""
        if self.removed or self.draining or self.health is not Health.HEALTHY or now < self.ejected_until:
            return False
        return model is None or model in self.models

    def local_load(self) -> RemoteLoad:
        """This router's own accounting here, in the form other routers receive it."""
        return RemoteLoad(
            self.inflight_requests,
            self.inflight_prefill_tokens,
            self.inflight_decode_tokens,
            self.inflight_kv_tokens,
            self.inflight_prefill_new_tokens,
            self.inflight_prefill_attention,
            self.inflight_tpot_sensitivity,
        )

    def view(self, now: float, prefix_match_tokens: int = 0) -> ReplicaView:
        s = self.signals
        o = self.remote or _NO_LOAD
        return ReplicaView(
            replica_id=self.id,
            index=self.index,
            inflight_requests=self.inflight_requests + o.requests,
            inflight_prefill_tokens=self.inflight_prefill_tokens + o.prefill_tokens,
            inflight_decode_tokens=self.inflight_decode_tokens + o.decode_tokens,
            inflight_kv_tokens=self.inflight_kv_tokens + o.kv_tokens,
            inflight_prefill_new_tokens=self.inflight_prefill_new_tokens + o.prefill_new_tokens,
            inflight_prefill_attention=self.inflight_prefill_attention + o.prefill_attention,
            tpot_sensitivity=self.inflight_tpot_sensitivity + o.tpot_sensitivity,
            num_running=None if s is None or s.num_running is None else int(s.num_running),
            num_waiting=None if s is None or s.num_waiting is None else int(s.num_waiting),
            kv_usage=None if s is None else s.kv_usage,
            scrape_age_s=None if self.signals_time is None else now - self.signals_time,
            kv_capacity_tokens=None if s is None else s.kv_capacity_tokens,
            prefix_match_tokens=prefix_match_tokens,
        )


_NO_LOAD = RemoteLoad()


class Lease:
    """A request's share of its replica's load; see the module docstring."""

    __slots__ = (
        "_attention",
        "_decode",
        "_kv",
        "_new",
        "_prefill",
        "_released",
        "_sensitivity",
        "generated",
        "replica",
    )

    def __init__(
        self,
        replica: ReplicaState,
        prefill_tokens: int,
        decode_tokens: int,
        new_prefill_tokens: int | None = None,
        prefill_attention: float = 0.0,
    ) -> None:
        self.replica = replica
        self._prefill = prefill_tokens
        self._decode = decode_tokens
        self._kv = prefill_tokens
        self._new = prefill_tokens if new_prefill_tokens is None else new_prefill_tokens
        self._attention = prefill_attention
        self._sensitivity = tpot_sensitivity(decode_tokens)
        self._released = False
        #: Tokens generated so far (counted SSE events): what the request was served, for tenant counters.
        self.generated = 0
        replica.inflight_requests += 1
        replica.inflight_prefill_tokens += prefill_tokens
        replica.inflight_decode_tokens += decode_tokens
        replica.inflight_kv_tokens += prefill_tokens
        replica.inflight_prefill_new_tokens += self._new
        replica.inflight_prefill_attention += prefill_attention
        replica.inflight_tpot_sensitivity += self._sensitivity

    @property
    def released(self) -> bool:
        return self._released

    def first_token(self) -> None:
        """The prompt has been processed: its tokens no longer load the replica's prefill queue."""
        if not self._released and self._prefill:
            r = self.replica
            r.inflight_prefill_tokens -= self._prefill
            r.inflight_prefill_new_tokens -= self._new
            r.inflight_prefill_attention -= self._attention
            self._prefill = self._new = 0
            self._attention = 0.0

    def tokens_generated(self, count: int) -> None:
        if self._released or count <= 0:
            return
        self.generated += count
        done = min(count, self._decode)
        self._decode -= done
        self.replica.inflight_decode_tokens -= done
        self._kv += count
        self.replica.inflight_kv_tokens += count

    def release(self) -> None:
        """Return everything still held; idempotent."""
        if self._released:
            return
        self._released = True
        r = self.replica
        r.inflight_requests -= 1
        r.inflight_prefill_tokens -= self._prefill
        r.inflight_decode_tokens -= self._decode
        r.inflight_kv_tokens -= self._kv
        r.inflight_prefill_new_tokens -= self._new
        r.inflight_prefill_attention -= self._attention
        r.inflight_tpot_sensitivity -= self._sensitivity
        if r.inflight_requests == 0:
            # float sums drift; an idle replica owes nothing
            r.inflight_prefill_attention = r.inflight_tpot_sensitivity = 0.0
        self._prefill = self._decode = self._kv = self._new = 0
        self._attention = self._sensitivity = 0.0


class Fleet:
    """The set of known replicas, kept in step with discovery."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_added: Callable[[ReplicaState], None] | None = None,
        on_removed: Callable[[ReplicaState], None] | None = None,
    ) -> None:
        self._clock = clock
        self._replicas: dict[str, ReplicaState] = {}
        self._next_index = 0
        self._on_added = on_added
        self._on_removed = on_removed

    def __len__(self) -> int:
        return len(self._replicas)

    def all(self) -> list[ReplicaState]:
        return list(self._replicas.values())

    def get(self, replica_id: str) -> ReplicaState | None:
        return self._replicas.get(replica_id)

    def update(self, specs: Sequence[ReplicaSpec]) -> None:
        """Apply a complete set from discovery: add new replicas, retire vanished ones."""
        wanted = {spec.url: spec for spec in specs}
        for url, spec in wanted.items():
            if url not in self._replicas:
                state = ReplicaState(spec=spec, index=self._next_index)
                self._next_index += 1
                self._replicas[url] = state
                if self._on_added is not None:
                    self._on_added(state)
        for url in [u for u in self._replicas if u not in wanted]:
            state = self._replicas.pop(url)
            state.removed = True  # in-flight requests finish; their leases still release correctly
            if self._on_removed is not None:
                self._on_removed(state)

    def eligible(self, model: str | None, exclude: frozenset[str] = frozenset()) -> list[ReplicaState]:
        now = self._clock()
        return [r for r in self._replicas.values() if r.id not in exclude and r.eligible(now, model)]

    def serves(self, model: str) -> bool:
        """Whether any known replica (healthy or not) has ever reported serving ``model``."""
        return any(model in r.models for r in self._replicas.values())

    def models(self) -> list[str]:
        names: set[str] = set()
        for r in self._replicas.values():
            if r.health is Health.HEALTHY and not r.removed:
                names |= r.models
        return sorted(names)

    def has_healthy(self) -> bool:
        now = self._clock()
        return any(r.eligible(now, None) for r in self._replicas.values())

    def snapshot(self, candidates: Sequence[ReplicaState], match: dict[str, int] | None = None) -> FleetView:
        now = self._clock()
        m = match or {}
        return FleetView(replicas=[r.view(now, m.get(r.id, 0)) for r in candidates], now=now)
