"""The state-store contract: what routers share, and the rule that the hot path never waits for it.

A router decides from local state only: its own accounting, its :class:`~router.prefix_index.PrefixIndex`,
the engine signals on each :class:`~router.fleet.ReplicaState`. A store keeps that local state in step with
the other routers of the same fleet in the background, and the request path only ever calls the ``on_*``
hooks, which queue work and return (no I/O, no awaiting, no exceptions). Two backends:
:class:`~router.state.memory.InMemoryStateStore` (one router; the hooks keep local session and tenant
state) and :class:`~router.state.redis_store.RedisStateStore` (active-active routers). The consistency
model is in docs/state.md.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar

from router.fleet import ReplicaState


class SessionMap:
    """Session id -> replica, bounded (LRU) and expiring ``ttl_s`` after last use.

    Fed by this router's dispatches and, with Redis, by the other routers' bindings; nothing routes on it
    yet (see docs/state.md), so it is kept small and exact rather than clever.
    """

    def __init__(self, ttl_s: float, max_sessions: int = 65536, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._map: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (replica, last use)

    def __len__(self) -> int:
        return len(self._map)

    def bind(self, session_id: str, replica_id: str) -> bool:
        """Record that ``session_id`` went to ``replica_id``; True if the binding is new or changed."""
        now = self._clock()
        previous = self._map.get(session_id)
        self._map[session_id] = (replica_id, now)
        self._map.move_to_end(session_id)
        if len(self._map) > self.max_sessions:
            self._map.popitem(last=False)
        return previous is None or previous[0] != replica_id or now - previous[1] > self.ttl_s / 2

    def get(self, session_id: str) -> str | None:
        entry = self._map.get(session_id)
        if entry is None:
            return None
        if self._clock() - entry[1] > self.ttl_s:
            del self._map[session_id]
            return None
        return entry[0]


class TenantCounters:
    """Tokens served per tenant in fixed wall-clock windows, aligned on the epoch so routers agree on them."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self.window = self.current_window()
        self.local: dict[str, int] = {}

    def current_window(self) -> int:
        return int(self._clock() // self.window_s)

    def add(self, tenant: str, tokens: int) -> None:
        window = self.current_window()
        if window != self.window:
            self.window, self.local = window, {}
        self.local[tenant] = self.local.get(tenant, 0) + tokens


class StateStore(ABC):
    """Shared router state; every method but ``start``/``stop`` is synchronous and cheap."""

    #: ``memory`` or ``redis`` (exported as ``fleetroute_state_store_info``).
    backend: ClassVar[str]

    def __init__(self, session_ttl_s: float = 3600.0, tenant_window_s: float = 60.0) -> None:
        self.sessions = SessionMap(session_ttl_s)
        self.tenants = TenantCounters(tenant_window_s)

    async def start(self) -> None:
        """Begin background synchronisation (never fails: an unreachable backend just reads ``up`` = False)."""

    async def stop(self) -> None:
        """Stop background work and withdraw this router's share where the backend allows."""

    @property
    @abstractmethod
    def up(self) -> bool:
        """Whether the store is reachable (always true for the in-memory store)."""

    @property
    @abstractmethod
    def staleness_s(self) -> float:
        """Age of the shared state this router holds: time since the last successful synchronisation."""

    @property
    def remote_routers(self) -> int:
        """Other live routers of the fleet."""
        return 0

    @property
    def shared_prefix_entries(self) -> int | None:
        """Entries of the shared prefix index (None: no shared index)."""
        return None

    # -- replicas (discovery callbacks) --------------------------------------------------------------------
    def replica_added(self, replica: ReplicaState) -> None:
        """A replica joined the local fleet."""

    def replica_removed(self, replica: ReplicaState) -> None:
        """A replica left the local fleet."""

    # -- hot-path hooks: queue and return ------------------------------------------------------------------
    def on_load(self, replica: ReplicaState, urgent: bool = True) -> None:
        """This router's accounting on ``replica`` changed by a request: dispatched or ended (``urgent``), or
        its first token came back (not urgent: it may wait for the next message or sync)."""

    def on_record(self, replica_id: str, hashes: Sequence[int]) -> None:
        """The router recorded ``hashes`` against ``replica_id`` in its local prefix index."""

    def on_session(self, session_id: str, replica_id: str) -> None:
        """A request of ``session_id`` was dispatched to ``replica_id``."""
        self.sessions.bind(session_id, replica_id)

    def on_served(self, tenant: str, tokens: int) -> None:
        """``tenant`` was served ``tokens`` (prompt plus generated)."""
        self.tenants.add(tenant, tokens)

    # -- scraping ------------------------------------------------------------------------------------------
    def should_scrape(self, replica_id: str) -> bool:
        """Whether this router should scrape the replica itself (False: another router does and shares)."""
        return True

    def on_scraped(self, replica: ReplicaState) -> None:
        """This router scraped ``replica`` (its ``signals`` and ``signals_time`` are fresh)."""

    # -- reads ---------------------------------------------------------------------------------------------
    def session_replica(self, session_id: str) -> str | None:
        """The replica ``session_id`` was last sent to by any router, if known and not expired."""
        return self.sessions.get(session_id)

    def tenant_tokens(self, tenant: str) -> int:
        """Tokens served to ``tenant`` in the current window, fleet-wide as far as this store knows."""
        counters = self.tenants
        if counters.current_window() != counters.window:
            return 0
        return counters.local.get(tenant, 0)
