"""Active-active routers through Redis: every router sees the others' load, prefix records and scrapes.

Three background tasks per router while Redis answers, none of them on the request path:

* **publish** (event-driven): what the hot path queued — the new accounting of the replicas where a request
  was dispatched or ended (a first token rides along when there is something else to send), prefix records,
  session bindings — goes out in one PUBLISH for the other routers, at most one batch per ``publish_gap_s``
  (the first change after a quiet spell at once), so under load batches grow instead of the message rate.
* **subscribe**: applies the other routers' batches: their load entries to :attr:`ReplicaState.remote`
  (the sum over routers), their prefix records to the local prefix index through the residency model (the
  engine's cache turns over with every router's traffic, not only this one's), their session bindings.
* **sync** (every ``sync_interval_s``, one pipelined transaction): writes this router's whole accounting
  (``router:{id}``, with a TTL, so a dead router's share expires on its own) and heartbeat; reads every other
  router's (authoritative: it corrects a lost message, carries first tokens and decode progress, which are not
  pushed, and tells which routers died); adds the prefix records published since the last sync to the shared
  prefix set with a ZADD and, in the same transaction, a ZREMRANGEBYRANK that trims it back to
  ``prefix_max_entries``, so Redis memory is bounded at any load; writes session keys, the engine signals this
  router scraped, and tenant counters; reads the others' signals and the prefix set's size. Every
  ``ttl_s / 3`` it takes or renews the scrape leases (one Lua call for all replicas).

Load updates carry a per-router sequence number, so a snapshot read never overwrites a newer update from
pub/sub. A supervisor runs the tasks; on any Redis error it marks the store down (routing goes on from local
state; the others' load is dropped once it would have expired), reconnects with exponential backoff and full
jitter, and resynchronises: resubscribe, republish its load, re-take leases, and reload the most recent prefix
entries into the local index (they cover what pub/sub missed). docs/state.md has the consistency model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from router.fleet import Fleet, RemoteLoad, ReplicaState
from router.prefix_index import PrefixIndex
from router.residency import ResidencyModel
from router.state.base import StateStore
from router.state.codec import (
    Batch,
    decode_batch,
    decode_prefix_member,
    decode_signals,
    decode_snapshot,
    encode_batch,
    encode_signals,
    encode_snapshot,
    prefix_member,
    replica_key,
)
from router.state.connect import RedisClient, client_from_url, redact_url

if TYPE_CHECKING:
    from router.metrics import RouterMetrics

__all__ = ["Keys", "RedisStateStore"]

log = logging.getLogger(__name__)

#: Errors that mean "Redis is not answering properly": the store goes down and reconnects.
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_MAX_PENDING_RECORDS = 4096  # records queued while a batch is in flight or Redis is down
_MAX_PENDING_KEYS = 10_000  # session bindings, tenants
_MAX_PENDING_MEMBERS = 200_000  # prefix-set entries waiting for the next sync (~10 MB)
_RESYNC_PAGE = 8192
_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 5.0
_TENANT_READ_S = 1.0

# Take (SET NX) or renew the scrape lease of every replica in KEYS for ARGV[1] (router id), ARGV[2] ms; one
# result per key: 1 if this router holds it now, else 0.
_LEASE_LUA = """
local held = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[i] = 1
  elseif not owner then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
"""
# Release this router's leases (on a clean stop), leaving others' alone.
_RELEASE_LUA = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""


class Keys:
    """Key names of one fleet. The ``{fleet}`` hash tag puts them all in one Cluster slot.

    =====================  ======  =============================================  ===============================
    key                    type    holds                                          lifetime
    =====================  ======  =============================================  ===============================
    ``routers``            zset    router id -> last heartbeat (wall clock)       members pruned after 60 s
    ``router:{id}``        string  that router's accounting on every replica      PX ``ttl_s``, every sync
    ``records``            pubsub  load changes, prefix records, sessions         -
    ``prefix``             zset    block hash + replica key -> record time        trimmed to the budget
    ``lease:scrape:{url}`` string  id of the router scraping the replica          PX ``ttl_s``, renewed
    ``signals:{url}``      string  the lease holder's last scrape of the replica  PX max(3 scrapes, ``ttl_s``)
    ``session:{id}``       string  replica the session was last sent to           PX ``session_ttl_s``
    ``tenants:{window}``   hash    tenant -> tokens served in the window          PX 2 windows
    =====================  ======  =============================================  ===============================
    """

    def __init__(self, fleet: str) -> None:
        self.base = f"fleetroute:{{{fleet}}}:"
        self.routers = self.base + "routers"
        self.prefix = self.base + "prefix"
        self.channel = self.base + "records"

    def router(self, router_id: str) -> str:
        return f"{self.base}router:{router_id}"

    def lease(self, replica_id: str) -> str:
        return f"{self.base}lease:scrape:{replica_id}"

    def signals(self, replica_id: str) -> str:
        return f"{self.base}signals:{replica_id}"

    def session(self, session_id: str) -> str:
        return f"{self.base}session:{session_id}"

    def tenants(self, window: int) -> str:
        return f"{self.base}tenants:{window}"


class _Peer:
    """Another router's accounting as last received: the newest sequence number wins."""

    __slots__ = ("loads", "seq")

    def __init__(self) -> None:
        self.seq = -1
        self.loads: dict[int, RemoteLoad] = {}


class RedisStateStore(StateStore):
    """See the module docstring. Construct, then ``await start()``; all I/O happens in its tasks."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        fleet: Fleet,
        index: PrefixIndex,
        *,
        namespace: str = "default",
        sync_interval_s: float = 0.1,
        ttl_s: float = 3.0,
        prefix_max_entries: int = 262_144,
        publish_gap_s: float = 0.005,
        scrape_interval_s: float = 1.0,
        session_ttl_s: float = 3600.0,
        tenant_window_s: float = 60.0,
        metrics: RouterMetrics | None = None,
        router_id: str | None = None,
        client_factory: Callable[[], RedisClient] | None = None,
        residency: ResidencyModel | None = None,
    ) -> None:
        super().__init__(session_ttl_s, tenant_window_s)
        self.router_id = router_id or uuid.uuid4().hex
        self.keys = Keys(namespace)
        self._url = url
        #: Bound of every Redis operation: past it Redis counts as down (a stalled server, a lost network).
        self.op_timeout_s = max(1.0, ttl_s / 2)
        self._client_factory = client_factory or (lambda: client_from_url(url, connect_timeout_s=self.op_timeout_s))
        self._client: RedisClient | None = None
        self._fleet = fleet
        self._index = index
        #: Where the others' prefix records go: the router's model of each replica's cache (one without
        #: capacities records exactly like the bare index).
        self._residency = residency if residency is not None else ResidencyModel(index)
        self._metrics = metrics
        self.sync_interval_s = sync_interval_s
        self.ttl_s = ttl_s
        self.prefix_max_entries = prefix_max_entries
        self.publish_gap_s = publish_gap_s
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._signals_ttl_ms = max(self._ttl_ms, round(3000 * scrape_interval_s))
        self._session_ttl_ms = max(1, round(session_ttl_s * 1000))
        self._me = replica_key(self.router_id)  # sender id in pub/sub batches
        self._task: asyncio.Task[None] | None = None
        self._cluster = False  # Redis Cluster pipelines refuse MGET (and PUBLISH, sent on its own anyway)
        self._up = False
        self._started = time.monotonic()
        self._last_ok: float | None = None
        self._expire_handle: asyncio.TimerHandle | None = None
        # Replicas by their 64-bit key, and back.
        self._url_of: dict[int, str] = {}
        self._key_of: dict[str, int] = {}
        # Queued by the hot path for the publisher.
        self._wake = asyncio.Event()
        self._dirty: dict[str, ReplicaState] = {}
        self._records: deque[tuple[str, Sequence[int]]] = deque(maxlen=_MAX_PENDING_RECORDS)
        self._session_binds: dict[str, str] = {}  # for the next publication
        self._session_writes: dict[str, str] = {}  # for the next sync (session keys)
        self._members: dict[bytes, float] = {}  # prefix-set entries for the next sync
        self._tenant_pending: dict[str, int] = {}
        self._scraped: dict[str, bytes] = {}
        self._seq = 0
        # The others.
        self._peer_ids: list[str] = []
        self._peers: dict[int, _Peer] = {}  # by sender key
        self._remote_routers = 0
        self._prefix_entries: int | None = None
        self._held: set[str] = set()  # scrape leases this router holds
        self._others_hold: set[str] = set()
        self._signals_seen: dict[str, float] = {}
        self._lease_due = 0.0
        self._tenant_fleet: dict[str, int] = {}
        self._tenant_fleet_window = -1
        self._tenant_read_due = 0.0
        self.published_records = 0
        self.applied_records = 0

    # ------------------------------------------------------------------ contract
    @property
    def up(self) -> bool:
        return self._up

    @property
    def staleness_s(self) -> float:
        return time.monotonic() - (self._last_ok if self._last_ok is not None else self._started)

    @property
    def remote_routers(self) -> int:
        return self._remote_routers if self._up else 0

    @property
    def shared_prefix_entries(self) -> int | None:
        return self._prefix_entries

    def replica_added(self, replica: ReplicaState) -> None:
        key = replica_key(replica.id)
        self._url_of[key] = replica.id
        self._key_of[replica.id] = key
        self._lease_due = 0.0  # take its lease at the next sync
        self._refresh_remote([key])

    def replica_removed(self, replica: ReplicaState) -> None:
        key = self._key_of.pop(replica.id, None)
        if key is not None:
            self._url_of.pop(key, None)
        self._held.discard(replica.id)
        self._others_hold.discard(replica.id)
        self._signals_seen.pop(replica.id, None)

    def _poke(self) -> None:
        if not self._wake.is_set():
            self._wake.set()

    def on_load(self, replica: ReplicaState, urgent: bool = True) -> None:
        self._dirty[replica.id] = replica
        if urgent:
            self._poke()

    def on_record(self, replica_id: str, hashes: Sequence[int]) -> None:
        self._records.append((replica_id, hashes))
        self._poke()

    def on_session(self, session_id: str, replica_id: str) -> None:
        if self.sessions.bind(session_id, replica_id) and (
            session_id in self._session_binds or len(self._session_binds) < _MAX_PENDING_KEYS
        ):
            self._session_binds[session_id] = replica_id
            self._poke()

    def on_served(self, tenant: str, tokens: int) -> None:
        super().on_served(tenant, tokens)
        pending = self._tenant_pending
        if tenant in pending or len(pending) < _MAX_PENDING_KEYS:
            pending[tenant] = pending.get(tenant, 0) + tokens

    def should_scrape(self, replica_id: str) -> bool:
        return not (self._up and replica_id in self._others_hold)

    def on_scraped(self, replica: ReplicaState) -> None:
        if self._up and replica.signals is not None and replica.signals_time is not None:
            wall = time.time() - (time.monotonic() - replica.signals_time)
            self._scraped[replica.id] = encode_signals(replica.signals, wall)

    def tenant_tokens(self, tenant: str) -> int:
        if not self._up or self._tenant_fleet_window != self.tenants.current_window():
            return super().tenant_tokens(tenant)
        return self._tenant_fleet.get(tenant, 0) + self._tenant_pending.get(tenant, 0)

    async def fetch_session(self, session_id: str) -> str | None:
        """The binding as Redis holds it (any router's), for callers off the hot path; None when unknown."""
        if not self._up or self._client is None:
            return self.session_replica(session_id)
        try:
            async with asyncio.timeout(self.op_timeout_s):
                value = await self._client.get(self.keys.session(session_id))
        except _REDIS_ERRORS:
            return self.session_replica(session_id)
        return value.decode() if isinstance(value, bytes) else value

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._client = self._client_factory()
            self._cluster = isinstance(self._client, RedisCluster)
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name="state-store")

    async def stop(self, clean: bool = True) -> None:
        """Stop syncing; with ``clean``, withdraw this router's share and leases at once (else they expire)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5.0)  # never hang a shutdown on a library that ignores cancel
        client, self._client = self._client, None
        if client is None:
            return
        if clean and self._up:
            with contextlib.suppress(*_REDIS_ERRORS):
                async with asyncio.timeout(1.0):
                    pipe = client.pipeline(transaction=False)
                    pipe.delete(self.keys.router(self.router_id))
                    pipe.zrem(self.keys.routers, self.router_id)
                    await pipe.execute()
                    if self._held:
                        release = client.register_script(_RELEASE_LUA)
                        await release(keys=[self.keys.lease(r) for r in self._held], args=[self.router_id])
        self._set_down()
        if self._expire_handle is not None:
            self._expire_handle.cancel()
            self._expire_handle = None
        with contextlib.suppress(*_REDIS_ERRORS):
            async with asyncio.timeout(self.op_timeout_s):
                await client.aclose()

    # ------------------------------------------------------------------ supervisor
    async def _supervise(self) -> None:
        failures = 0
        while True:
            try:
                await self._connected_session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # anything: the store must never stop retrying, nor reach a request
                expected = isinstance(exc, _REDIS_ERRORS)
                if self._up or failures == 0 or not expected:
                    log.warning(
                        "state store unreachable; routing from local state",
                        extra={"redis": redact_url(self._url), "error": f"{type(exc).__name__}: {exc}"},
                        exc_info=not expected,
                    )
                self._count_error("connection" if expected else "unexpected")
            if self._up:
                failures = 0
            self._set_down()
            failures += 1
            delay = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** min(failures - 1, 16))
            await asyncio.sleep(random.uniform(0, delay))  # full jitter: routers do not reconnect in step

    async def _connected_session(self) -> None:
        client = self._client
        assert client is not None
        async with asyncio.timeout(self.op_timeout_s):
            await client.ping()
        pubsub: Any = client.pubsub()  # redis-py's PubSub is untyped
        try:
            async with asyncio.timeout(self.op_timeout_s):
                await pubsub.subscribe(self.keys.channel)
            await self._sync_once(client)  # republish own load, read the others'
            await self._leases(client)
            self._up = True
            if self._expire_handle is not None:
                self._expire_handle.cancel()
                self._expire_handle = None
            log.info("state store connected", extra={"redis": redact_url(self._url), "router_id": self.router_id})
            loop = asyncio.get_running_loop()
            tasks = [
                loop.create_task(self._subscribe_loop(pubsub), name="state-subscribe"),
                loop.create_task(self._reload_prefixes(client), name="state-resync"),
                loop.create_task(self._sync_loop(client), name="state-sync"),
                loop.create_task(self._publish_loop(client), name="state-publish"),
            ]
            try:
                await _first_failure(tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks, timeout=5.0)
        finally:
            with contextlib.suppress(*_REDIS_ERRORS):
                async with asyncio.timeout(self.op_timeout_s):
                    await pubsub.aclose()

    def _set_down(self) -> None:
        if self._up:
            self._up = False
            # Keep the others' load until it would have expired in Redis anyway, then forget it.
            left = self.ttl_s - self.staleness_s
            self._expire_handle = asyncio.get_running_loop().call_later(max(0.0, left), self._forget_remote)
        self._held.clear()
        self._others_hold.clear()  # every router scrapes everything itself while Redis is down

    def _forget_remote(self) -> None:
        self._expire_handle = None
        if not self._up:
            self._peers.clear()
            self._refresh_remote(None)
            self._remote_routers = 0

    def _count_error(self, op: str) -> None:
        if self._metrics is not None:
            self._metrics.state_errors.labels(op).inc()

    def _observe(self, kind: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.state_sync.labels(kind).observe(seconds)

    # ------------------------------------------------------------------ the others' load
    def _apply_loads(self, sender: int, seq: int, loads: Iterable[tuple[int, RemoteLoad]], whole: bool) -> None:
        """Merge one router's update (``whole``: a full snapshot) unless a newer one was applied already."""
        peer = self._peers.get(sender)
        if peer is None:
            peer = self._peers[sender] = _Peer()
        if seq <= peer.seq:
            return
        peer.seq = seq
        touched = set(peer.loads) if whole else set()
        if whole:
            peer.loads = {}
        for key, load in loads:
            touched.add(key)
            if load.requests > 0:
                peer.loads[key] = load
            else:
                peer.loads.pop(key, None)
        self._refresh_remote(touched)

    def _refresh_remote(self, keys: Iterable[int] | None) -> None:
        """Recompute :attr:`ReplicaState.remote` of the replicas with these keys (None: all)."""
        peers = list(self._peers.values())
        if keys is None:
            keys = list(self._url_of)
        for key in keys:
            url = self._url_of.get(key)
            replica = None if url is None else self._fleet.get(url)
            if replica is None:
                continue
            total: RemoteLoad | None = None
            for peer in peers:
                load = peer.loads.get(key)
                if load is not None:
                    total = load if total is None else total + load
            replica.remote = total

    # ------------------------------------------------------------------ sync: snapshots, signals, tenants
    async def _sync_loop(self, client: RedisClient) -> None:
        while True:
            await asyncio.sleep(self.sync_interval_s)
            await self._sync_once(client)
            if time.monotonic() >= self._lease_due:
                await self._leases(client)

    async def _sync_once(self, client: RedisClient) -> None:
        started = time.perf_counter()
        mono = time.monotonic()
        wall = time.time()
        keys = self.keys
        peer_ids = self._peer_ids
        scraped, self._scraped = self._scraped, {}
        tenant_pending, self._tenant_pending = self._tenant_pending, {}
        watched = sorted(self._others_hold)
        window = self.tenants.current_window()
        read_tenants = bool(tenant_pending) or mono >= self._tenant_read_due

        members, self._members = self._members, {}
        sessions, self._session_writes = self._session_writes, {}
        # One transaction: the ZADD and the trim that keeps the prefix set in its budget are never seen apart.
        pipe = client.pipeline(transaction=True)
        pipe.set(keys.router(self.router_id), self._snapshot(), px=self._ttl_ms)
        pipe.zadd(keys.routers, {self.router_id: wall})
        pipe.zremrangebyscore(keys.routers, "-inf", wall - max(60.0, 20 * self.ttl_s))
        pipe.zrange(keys.routers, 0, -1)
        if members:
            pipe.zadd(keys.prefix, members)
            pipe.zremrangebyrank(keys.prefix, 0, -self.prefix_max_entries - 1)
        for session_id, replica_id in sessions.items():
            pipe.set(keys.session(session_id), replica_id, px=self._session_ttl_ms)
        pipe.zcard(keys.prefix)
        if peer_ids:
            self._mget(pipe, [keys.router(p) for p in peer_ids])
        for replica_id, data in scraped.items():
            pipe.set(keys.signals(replica_id), data, px=self._signals_ttl_ms)
        if watched:
            self._mget(pipe, [keys.signals(r) for r in watched])
        if read_tenants:
            tenant_key = keys.tenants(window)
            for tenant, tokens in tenant_pending.items():
                pipe.hincrby(tenant_key, tenant, tokens)
            if tenant_pending:
                pipe.pexpire(tenant_key, max(1, round(2000 * self.tenants.window_s)))
            pipe.hgetall(tenant_key)
        try:
            async with asyncio.timeout(self.op_timeout_s):
                results: list[Any] = await pipe.execute()
        except BaseException:
            # Sent again at the next sync (after a reconnect, too): counters, prefix entries, sessions.
            for tenant, tokens in tenant_pending.items():
                self._tenant_pending[tenant] = self._tenant_pending.get(tenant, 0) + tokens
            if len(self._members) < _MAX_PENDING_MEMBERS:
                self._members = members | self._members
            self._session_writes = sessions | self._session_writes
            raise
        self._observe("sync", time.perf_counter() - started)
        self._last_ok = mono

        at = 4 + (2 if members else 0) + len(sessions)
        self._prefix_entries = int(results[at])
        at += 1
        if peer_ids:
            live = 0
            snapshots, at = self._mget_result(results, at, len(peer_ids))
            for peer_id, snapshot in zip(peer_ids, snapshots, strict=True):
                sender = replica_key(peer_id)
                if snapshot is None:  # expired: a dead router's share is gone
                    if self._peers.pop(sender, None) is not None:
                        self._refresh_remote(None)
                    continue
                live += 1
                try:
                    seq, loads = decode_snapshot(snapshot)
                except ValueError:
                    self._count_error("decode")
                    continue
                self._apply_loads(sender, seq, loads, whole=True)
            self._remote_routers = live
        directory = [m.decode() if isinstance(m, bytes) else str(m) for m in results[3]]
        self._peer_ids = [p for p in directory if p != self.router_id]
        listed = {replica_key(p) for p in self._peer_ids}
        if any(sender not in listed for sender in self._peers):
            self._peers = {s: p for s, p in self._peers.items() if s in listed}
            self._refresh_remote(None)
        at += len(scraped)
        if watched:
            values, at = self._mget_result(results, at, len(watched))
            self._apply_signals(watched, values, mono, wall)
        if read_tenants:
            self._tenant_fleet = {
                (k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in results[-1].items()
            }
            self._tenant_fleet_window = window
            self._tenant_read_due = mono + _TENANT_READ_S

    def _mget(self, pipe: Any, keys: list[str]) -> None:
        if self._cluster:
            for key in keys:
                pipe.get(key)
        else:
            pipe.mget(keys)

    def _mget_result(self, results: list[Any], at: int, count: int) -> tuple[list[Any], int]:
        """The values an :meth:`_mget` of ``count`` keys put at ``results[at]``, and the next position."""
        if self._cluster:
            return results[at : at + count], at + count
        return results[at], at + 1

    def _apply_signals(self, watched: list[str], values: list[bytes | None], mono: float, wall: float) -> None:
        for replica_id, data in zip(watched, values, strict=True):
            replica = self._fleet.get(replica_id)
            if data is None or replica is None:
                continue
            try:
                signals, scraped_at = decode_signals(data)
            except ValueError:
                self._count_error("decode")
                continue
            if scraped_at <= self._signals_seen.get(replica_id, 0.0):
                continue
            self._signals_seen[replica_id] = scraped_at
            replica.signals = signals
            replica.signals_time = mono - min(max(0.0, wall - scraped_at), self._signals_ttl_ms / 1000)

    async def _leases(self, client: RedisClient) -> None:
        """Take or renew the scrape lease of every known replica (one Lua call)."""
        self._lease_due = time.monotonic() + self.ttl_s / 3
        replicas = [r.id for r in self._fleet.all()]
        if not replicas:
            return
        script = client.register_script(_LEASE_LUA)
        async with asyncio.timeout(self.op_timeout_s):
            held = await script(keys=[self.keys.lease(r) for r in replicas], args=[self.router_id, self._ttl_ms])
        self._held = {r for r, h in zip(replicas, held, strict=True) if h}
        self._others_hold = set(replicas) - self._held

    # ------------------------------------------------------------------ publish
    async def _publish_loop(self, client: RedisClient) -> None:
        gap = self.publish_gap_s
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = time.monotonic()
            await self._publish_once(client)
            # The first change after a quiet spell goes out at once; later ones gather for up to `gap`, so a
            # busy router sends at most 1/gap messages a second, each carrying more changes.
            await asyncio.sleep(max(0.0, gap - (time.monotonic() - started)))

    async def _publish_once(self, client: RedisClient) -> None:
        """Publish what the hot path queued (one PUBLISH, no transaction: this runs several times per request
        under load); the prefix set and session keys are written with the next sync."""
        started = time.perf_counter()
        key_of = self._key_of
        batch = Batch(self._me)
        dirty, self._dirty = self._dirty, {}
        for replica in dirty.values():
            key = key_of.get(replica.id)
            if key is not None:
                batch.loads.append((key, replica.local_load()))
        if batch.loads:
            self._seq += 1
            batch.seq = self._seq
        members = self._members
        now = time.time()
        records = self._records
        while records:
            replica_id, hashes = records.popleft()
            key = key_of.get(replica_id)
            if key is None:
                continue  # replica already gone
            batch.records.append((key, hashes))
            if len(members) < _MAX_PENDING_MEMBERS:
                for h in hashes:
                    members[prefix_member(h, key)] = now
        bindings, self._session_binds = self._session_binds, {}
        for session_id, replica_id in bindings.items():
            key = key_of.get(replica_id)
            if key is not None:
                batch.sessions.append((session_id, key))
                self._session_writes[session_id] = replica_id
        if not (batch.loads or batch.records or batch.sessions):
            return
        async with asyncio.timeout(self.op_timeout_s):
            await client.publish(self.keys.channel, encode_batch(batch))
        if batch.records:
            self.published_records += len(batch.records)
            if self._metrics is not None:
                self._metrics.state_records.labels("published").inc(len(batch.records))
        self._observe("publish", time.perf_counter() - started)

    def _snapshot(self) -> bytes:
        """This router's whole accounting, numbered in the same sequence as the published changes."""
        self._seq += 1
        key_of = self._key_of
        return encode_snapshot(
            self._seq,
            ((key_of.get(r.id) or replica_key(r.id), r.local_load()) for r in self._fleet.all() if r.inflight_requests),
        )

    # ------------------------------------------------------------------ subscribe
    async def _subscribe_loop(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None or message.get("type") != "message":
                continue
            try:
                batch = decode_batch(message["data"])
            except ValueError:
                self._count_error("decode")
                continue
            if batch.sender != self._me:
                self._apply_batch(batch)

    def _apply_batch(self, batch: Batch) -> None:
        if batch.loads:
            self._apply_loads(batch.sender, batch.seq, batch.loads, whole=False)
        url_of, record = self._url_of, self._residency.record
        applied = 0
        for key, hashes in batch.records:
            url = url_of.get(key)
            if url is not None:
                record(url, hashes)
                applied += 1
        for session_id, key in batch.sessions:
            url = url_of.get(key)
            if url is not None:
                self.sessions.bind(session_id, url)
        if applied:
            self.applied_records += applied
            if self._metrics is not None:
                self._metrics.state_records.labels("applied").inc(applied)

    async def _reload_prefixes(self, client: RedisClient) -> None:
        """Load the newest shared prefix entries into the local index, oldest first, a page at a time."""
        total = min(self.prefix_max_entries, self._index.capacity_entries)
        loaded = 0
        start = -total
        while start < 0:
            stop = min(start + _RESYNC_PAGE - 1, -1)
            async with asyncio.timeout(self.op_timeout_s):
                page: list[Any] = await client.zrange(self.keys.prefix, start, stop)
            start = stop + 1
            by_replica: dict[int, list[int]] = {}
            for member in page:
                block, key = decode_prefix_member(member)
                by_replica.setdefault(key, []).append(block)
            for key, blocks in by_replica.items():
                url = self._url_of.get(key)
                if url is not None:
                    blocks.reverse()  # newest first: record() makes the head the most recent
                    self._residency.record(url, blocks)
                    loaded += len(blocks)
            await asyncio.sleep(0)  # let requests through between pages
        log.info("prefix index resynchronised", extra={"entries": loaded})


async def _first_failure(tasks: list[asyncio.Task[None]]) -> None:
    """Wait until any of ``tasks`` fails and re-raise its error; tasks that finish cleanly are fine."""
    pending: set[asyncio.Task[None]] = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
    await asyncio.Event().wait()  # every task returned: nothing left to supervise until cancelled
