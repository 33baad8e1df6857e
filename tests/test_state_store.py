"""The state store: encodings, configuration, the in-memory default, and the Redis backend against a real
``redis-server`` (started per test on a free port, never 6379), without HTTP in the way.

Router-level behaviour (conversations across routers, in-flight accuracy, Redis and router kills) is in
tests/test_state_routers.py.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from router.config import ConfigError, load_settings
from router.discovery.base import ReplicaSpec
from router.engine_metrics import EngineSignals
from router.fleet import Fleet, Lease, RemoteLoad, ReplicaState
from router.metrics import RouterMetrics
from router.prefix_index import PrefixIndex
from router.serve_cli import add_serve_arguments, settings_overrides
from router.state import InMemoryStateStore, SessionMap, TenantCounters, make_state_store
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
from router.state.connect import _parse_sentinel, client_from_url, redact_url, validate_redis_url
from router.state.redis_store import RedisStateStore
from tests.live import RedisServer, free_port, redis_server

URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]


# ---------------------------------------------------------------------------------------------- encodings
def test_snapshot_round_trip() -> None:
    loads = [(replica_key(URLS[0]), RemoteLoad(2, 300, 40, 350, 120, 1.5e4, 0.25)), (7, RemoteLoad(1, 0, 5, 9, 0, 0.0))]
    seq, decoded = decode_snapshot(encode_snapshot(42, loads))
    assert seq == 42 and decoded == loads
    assert decode_snapshot(encode_snapshot(1, [])) == (1, [])
    with pytest.raises(ValueError):
        decode_snapshot(b"\x01")


def test_batch_round_trip_and_malformed_batches() -> None:
    batch = Batch(
        sender=2**64 - 1,
        seq=9,
        loads=[(5, RemoteLoad(1, 2, 3, 4, 5, 6.5))],
        records=[(11, [1, 2**64 - 1, 3]), (12, [])],
        sessions=[("conv-é", 11), ("", 12)],
    )
    decoded = decode_batch(encode_batch(batch))
    assert decoded.sender == batch.sender and decoded.seq == 9
    assert decoded.loads == batch.loads
    assert [(k, list(h)) for k, h in decoded.records] == [(11, [1, 2**64 - 1, 3]), (12, [])]
    assert decoded.sessions == batch.sessions
    data = encode_batch(batch)
    for cut in (3, len(data) - 1, 30):
        with pytest.raises(ValueError):
            decode_batch(data[:cut])


def test_prefix_members_and_signals() -> None:
    assert decode_prefix_member(prefix_member(2**63 + 5, 17)) == (2**63 + 5, 17)
    assert len(prefix_member(1, 2)) == 16
    signals = EngineSignals(num_running=3.0, num_waiting=None, kv_usage=0.25, kv_capacity_tokens=450000)
    decoded, at = decode_signals(encode_signals(signals, 1234.5))
    assert decoded == signals and at == 1234.5
    for bad in (b"[]", b'{"a": 1}', b'["x", 1, 2, 3, 4, 5, 6, 7]'):
        with pytest.raises(ValueError):
            decode_signals(bad)


def test_replica_keys_are_stable_across_processes() -> None:
    # xxh3-64 of the URL: the same in every router process and version, or routers could not share records
    assert replica_key("http://10.0.0.1:8000") == 0xF6BCAF4E2B6877E3


# ---------------------------------------------------------------------------------------------- configuration
def test_redis_urls_of_every_supported_deployment() -> None:
    for url in (
        "redis://localhost:6380/0",
        "rediss://:s3cret@redis.example:6380/2",
        "unix:///run/redis.sock?db=1",
        "redis+sentinel://:pw@s1:26379,s2,[fd00::1]:26380/mymaster/3?sentinel_password=x",
        "rediss+cluster://user:pw@node-0:7000",
    ):
        validate_redis_url(url)
    sentinels, userinfo, service, db, params = _parse_sentinel(":pw@s1:26379,s2,[fd00::1]:26380/mymaster/3?x=1")
    assert sentinels == [("s1", 26379), ("s2", 26379), ("fd00::1", 26380)]
    assert (userinfo, service, db, params) == (":pw", "mymaster", "3", {"x": ["1"]})
    for bad in ("localhost:6379", "http://redis", "redis+sentinel://s1:26379", "redis+sentinel://s1/m/db"):
        with pytest.raises(ValueError):
            validate_redis_url(bad)
    assert redact_url("rediss://:s3cret@redis.example:6380/0") == "rediss://:***@redis.example:6380/0"
    assert redact_url("redis://redis:6379") == "redis://redis:6379"
    assert type(client_from_url("redis+cluster://127.0.0.1:7000")).__name__ == "RedisCluster"


def test_settings_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        ["--redis-url", "redis://r:6379/1", "--fleet", "llama", "--state-sync-interval", "0.05", "--state-ttl", "2",
         "--redis-prefix-max-entries", "1000", "--state-publish-interval", "0.02"]
    )  # fmt: skip
    settings = load_settings(settings_overrides(args))
    assert settings.redis_url is not None and settings.redis_url.get_secret_value() == "redis://r:6379/1"
    assert (settings.fleet, settings.state_sync_interval_s, settings.state_ttl_s) == ("llama", 0.05, 2.0)
    assert settings.redis_prefix_max_entries == 1000 and settings.state_publish_interval_s == 0.02
    monkeypatch.setenv("FLEETROUTE_REDIS_URL", "rediss://:pw@redis:6380/0")
    monkeypatch.setenv("FLEETROUTE_FLEET", "prod-a")
    settings = load_settings()
    assert settings.redis_url is not None and settings.fleet == "prod-a"
    assert "pw" not in repr(settings)
    with pytest.raises(ConfigError, match="redis_url"):
        load_settings({"redis_url": "http://redis"})
    with pytest.raises(ConfigError, match="fleet"):
        load_settings({"fleet": "a}b"})
    with pytest.raises(ConfigError, match="state_ttl_s"):
        load_settings({"state_ttl_s": 0.2, "state_sync_interval_s": 0.1})


def test_yaml_config_sets_the_state_store(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("fleet: blue\nstate_sync_interval_s: 0.2\nredis_prefix_max_entries: 5000\n")
    settings = load_settings(None, path)
    assert (settings.fleet, settings.state_sync_interval_s, settings.redis_prefix_max_entries) == ("blue", 0.2, 5000)


# ---------------------------------------------------------------------------------------------- in-memory and fleet
def test_memory_store_is_the_default_and_keeps_local_state() -> None:
    settings = load_settings({"replicas": URLS})
    store = make_state_store(settings, Fleet(), PrefixIndex(1 << 20))
    assert isinstance(store, InMemoryStateStore)
    assert store.up and store.staleness_s == 0.0 and store.remote_routers == 0
    assert store.shared_prefix_entries is None and store.should_scrape(URLS[0])
    store.on_session("s1", URLS[0])
    assert store.session_replica("s1") == URLS[0]
    store.on_served("acme", 100)
    store.on_served("acme", 20)
    assert store.tenant_tokens("acme") == 120 and store.tenant_tokens("other") == 0


def test_session_map_is_bounded_and_expires() -> None:
    now = [0.0]
    sessions = SessionMap(ttl_s=10.0, max_sessions=2, clock=lambda: now[0])
    assert sessions.bind("a", "r1") and not sessions.bind("a", "r1")
    assert sessions.bind("a", "r2")  # rebound
    sessions.bind("b", "r1")
    sessions.bind("c", "r1")
    assert len(sessions) == 2 and sessions.get("a") is None  # evicted, least recently used
    now[0] = 11.0
    assert sessions.get("b") is None


def test_tenant_windows_are_aligned_on_the_epoch() -> None:
    now = [119.0]
    counters = TenantCounters(60.0, clock=lambda: now[0])
    counters.add("t", 5)
    assert counters.window == 1 and counters.local == {"t": 5}
    now[0] = 120.0
    counters.add("t", 7)
    assert counters.window == 2 and counters.local == {"t": 7}


def test_replica_view_adds_the_other_routers_load() -> None:
    replica = ReplicaState(spec=ReplicaSpec(URLS[0]), index=0)
    lease = Lease(replica, 100, 50, 80, 10.0)
    lease.tokens_generated(3)
    replica.remote = RemoteLoad(2, 300, 60, 400, 200, 5.0)
    view = replica.view(0.0)
    assert (view.inflight_requests, view.inflight_prefill_tokens, view.inflight_decode_tokens) == (3, 400, 107)
    assert (view.inflight_kv_tokens, view.inflight_prefill_new_tokens) == (503, 280)
    assert view.inflight_prefill_attention == 15.0
    assert lease.generated == 3
    lease.release()
    replica.remote = None
    assert replica.view(0.0).inflight_requests == 0


# ---------------------------------------------------------------------------------------------- Redis backend
class Router:
    """The parts of a router the store touches: a fleet, a prefix index, metrics."""

    def __init__(self, redis_url: str, *, urls: list[str] = URLS, **options: Any) -> None:
        self.index = PrefixIndex(4 << 20)
        self.metrics = RouterMetrics()
        self.fleet = Fleet(on_added=self._added)
        self.store = RedisStateStore(redis_url, self.fleet, self.index, metrics=self.metrics, **options)
        self.fleet.update([ReplicaSpec(u) for u in urls])

    def _added(self, replica: ReplicaState) -> None:
        self.index.add_replica(replica.id)
        self.store.replica_added(replica)

    def replica(self, url: str) -> ReplicaState:
        r = self.fleet.get(url)
        assert r is not None
        return r


@asynccontextmanager
async def routers(redis_url: str, count: int = 2, **options: Any) -> AsyncIterator[list[Router]]:
    made = [Router(redis_url, **options) for _ in range(count)]
    for r in made:
        await r.store.start()
    try:
        await until(lambda: all(r.store.up for r in made))
        yield made
    finally:
        for r in made:
            await r.store.stop()


async def until(condition: Callable[[], bool], within: float = 10.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


async def test_prefix_records_reach_the_other_routers_index(redis: RedisServer) -> None:
    async with routers(redis.url, count=3) as (a, b, c):
        hashes = a.index.hash_prompt(b"x" * 256 * 8)
        a.index.record(URLS[1], hashes)
        a.store.on_record(URLS[1], hashes)
        for other in (b, c):
            await until(lambda o=other: o.index.match(hashes) == {URLS[1]: 8})  # type: ignore[misc]
        assert a.index.match(hashes) == {URLS[1]: 8}
        assert a.store.published_records == 1 and b.store.applied_records == 1
        await until(lambda: a.store.shared_prefix_entries == 8)
        assert int(redis.command("ZCARD", "fleetroute:{default}:prefix").split()[-1]) == 8


async def test_load_is_shared_at_once_and_expires_with_its_router(redis: RedisServer) -> None:
    async with routers(redis.url, ttl_s=1.0) as (a, b):
        ra = a.replica(URLS[0])
        lease = Lease(ra, 1000, 200, 600, 5.0)
        a.store.on_load(ra)
        took = await until(lambda: b.replica(URLS[0]).remote == RemoteLoad(1, 1000, 200, 1000, 600, 5.0, 1 / 199))
        assert took < 0.1  # published on change, not at the next sync
        lease.first_token()
        lease.tokens_generated(10)
        a.store.on_load(ra)
        await until(lambda: b.replica(URLS[0]).remote == RemoteLoad(1, 0, 190, 1010, 0, 0.0, 1 / 199))
        assert b.replica(URLS[1]).remote is None
        await until(lambda: a.store.remote_routers == 1 and b.store.remote_routers == 1)
        lease.release()
        a.store.on_load(ra)
        await until(lambda: b.replica(URLS[0]).remote is None)
        # A router that dies without cleanup: its share leaves the others' view within the TTL.
        lease = Lease(ra, 50, 50)
        a.store.on_load(ra)
        await until(lambda: b.replica(URLS[0]).remote is not None)
        task = a.store._task
        assert task is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gone = await until(lambda: b.replica(URLS[0]).remote is None, within=3.0)
        assert gone <= 1.0 + 0.3
        await until(lambda: b.store.remote_routers == 0, within=1.0)


async def test_fleets_are_isolated_by_namespace(redis: RedisServer) -> None:
    async with routers(redis.url, namespace="blue") as (a, _), routers(redis.url, namespace="green") as (g, _g2):
        lease = Lease(a.replica(URLS[2]), 10, 10)
        a.store.on_load(a.replica(URLS[2]))
        hashes = a.index.hash_prompt(b"y" * 512)
        a.store.on_record(URLS[2], hashes)
        await asyncio.sleep(0.4)
        assert g.replica(URLS[2]).remote is None and g.index.match(hashes) == {}
        assert g.store.remote_routers == 1  # only its own fleet's other router
        keys = redis.command("KEYS", "*")
        assert "fleetroute:{blue}:prefix" in keys and "fleetroute:{green}:prefix" not in keys
        lease.release()


async def test_one_router_scrapes_each_replica_and_shares_the_signals(redis: RedisServer) -> None:
    async with routers(redis.url, count=2, scrape_interval_s=0.2) as (a, b):
        await until(lambda: len(a.store._held) + len(b.store._held) == len(URLS))
        assert not (a.store._held & b.store._held)
        for url in URLS:
            assert a.store.should_scrape(url) != b.store.should_scrape(url)
        url = sorted(a.store._held | b.store._held)[0]
        holder, reader = (a, b) if url in a.store._held else (b, a)
        replica = holder.replica(url)
        replica.signals = EngineSignals(num_running=4.0, num_waiting=2.0, kv_usage=0.5, kv_capacity_tokens=1000)
        replica.signals_time = time.monotonic() - 0.3  # scraped 300 ms ago
        holder.store.on_scraped(replica)
        await until(lambda: reader.replica(url).signals == replica.signals)
        age = time.monotonic() - (reader.replica(url).signals_time or 0.0)
        assert 0.3 <= age < 0.3 + 0.5  # the scrape's age is preserved, plus transit
        # Redis down: every router scrapes everything itself.
        redis.kill()
        await until(lambda: not a.store.up and not b.store.up)
        assert all(a.store.should_scrape(u) and b.store.should_scrape(u) for u in URLS)


async def test_sessions_and_tenant_counters_are_fleet_wide(redis: RedisServer) -> None:
    # Counters live in epoch-aligned windows; a day-long window keeps the run from straddling a boundary,
    # where the two routers' tokens would rightly land in different windows (a CI run once did, at 60 s).
    async with routers(redis.url, count=2, tenant_window_s=86_400.0) as (a, b):
        a.store.on_session("conv-1", URLS[2])
        await until(lambda: b.store.session_replica("conv-1") == URLS[2])
        for _ in range(100):  # the key itself is written with the next sync
            if await b.store.fetch_session("conv-1") == URLS[2]:
                break
            await asyncio.sleep(0.02)
        assert await b.store.fetch_session("conv-1") == URLS[2]
        assert redis.command("PTTL", "fleetroute:{default}:session:conv-1").split()[-1] != "-1"
        a.store.on_served("acme", 300)
        b.store.on_served("acme", 200)
        b.store.on_served("beta", 7)
        await until(lambda: a.store.tenant_tokens("acme") == 500 and b.store.tenant_tokens("acme") == 500)
        assert a.store.tenant_tokens("beta") == 7


async def test_a_new_router_loads_the_shared_prefix_index(redis: RedisServer) -> None:
    async with routers(redis.url, count=1) as (a,):
        prompts = [a.index.hash_prompt(bytes([65 + i]) * 256 * 4) for i in range(20)]
        for i, hashes in enumerate(prompts):
            a.store.on_record(URLS[i % 3], hashes)
        await until(lambda: a.store.shared_prefix_entries == 80)
        async with routers(redis.url, count=1) as (late,):
            await until(lambda: all(late.index.match(h) == {URLS[i % 3]: 4} for i, h in enumerate(prompts)))


async def test_prefix_budget_holds_over_a_long_run(redis: RedisServer) -> None:
    budget = 10_000
    async with routers(redis.url, count=2, prefix_max_entries=budget) as (a, b):
        key = "fleetroute:{default}:prefix"
        peak = 0
        blocks = 0
        for batch in range(400):
            for router in (a, b):
                for j in range(5):
                    seed = (batch * 10 + j) * 2 + (router is b)
                    hashes = [(seed << 16) + k for k in range(60)]
                    router.store.on_record(URLS[seed % 3], hashes)
                    blocks += len(hashes)
            await asyncio.sleep(0.002)
            if batch % 20 == 0:
                peak = max(peak, int(redis.command("ZCARD", key).split()[-1]))
        await until(lambda: not a.store._records and not b.store._records)
        await asyncio.sleep(0.2)
        final = int(redis.command("ZCARD", key).split()[-1])
        memory = int(redis.command("MEMORY", "USAGE", key, "SAMPLES", "0").split()[-1])
    print(
        f"\n[state] prefix budget: {blocks} blocks recorded by 2 routers; ZCARD peak {max(peak, final)}, final "
        f"{final} (budget {budget}); MEMORY USAGE {memory / 1e6:.2f} MB ({memory / final:.0f} B/entry)"
    )
    assert blocks >= 20 * budget
    assert peak <= budget and final == budget
    assert memory < 150 * budget


async def test_unreachable_redis_never_blocks_and_reads_down() -> None:
    router = Router(f"redis://127.0.0.1:{free_port()}/0")
    await router.store.start()  # nothing listens there
    try:
        await asyncio.sleep(0.3)
        assert not router.store.up and router.store.staleness_s >= 0.3
        router.store.on_record(URLS[0], [1, 2, 3])  # hooks still return at once
        router.store.on_load(router.replica(URLS[0]))
        assert router.store.should_scrape(URLS[0])
        errors = router.metrics.state_errors.labels("connection")._value.get()
        assert errors >= 1
    finally:
        await router.store.stop()


async def test_clean_stop_withdraws_the_routers_share_and_leases(redis: RedisServer) -> None:
    async with routers(redis.url, count=1) as (a,):
        await until(lambda: len(a.store._held) == len(URLS))
        router_key = f"fleetroute:{{default}}:router:{a.store.router_id}"
        assert redis.command("EXISTS", router_key).endswith("1")
    assert redis.command("EXISTS", router_key).endswith("0")
    for url in URLS:
        assert redis.command("EXISTS", f"fleetroute:{{default}}:lease:scrape:{url}").endswith("0")


async def test_state_store_metrics(redis: RedisServer) -> None:
    from prometheus_client import generate_latest

    async with routers(redis.url, count=2) as (a, _b):
        a.metrics.attach_state(a.store)
        await until(lambda: a.store.remote_routers == 1)
        await asyncio.sleep(0.25)
        text = generate_latest(a.metrics.registry).decode()
    for line in (
        'fleetroute_state_store_info{backend="redis"} 1.0',
        "fleetroute_state_store_up 1.0",
        "fleetroute_state_store_remote_routers 1.0",
        "fleetroute_state_store_prefix_entries 0.0",
        'fleetroute_state_store_sync_seconds_count{kind="sync"}',
    ):
        assert line in text, line
    staleness = next(x for x in text.splitlines() if x.startswith("fleetroute_state_store_staleness_seconds "))
    assert float(staleness.split()[-1]) < 1.0


# ---------------------------------------------------------------------------------------------- topologies
async def test_through_redis_sentinel(tmp_path: Path, redis: RedisServer) -> None:
    """``redis+sentinel://`` finds the master through a real sentinel."""
    sentinel = start_sentinel(tmp_path, redis.port)
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
        await until(lambda: _reachable(sentinel.port))
        async with routers(url, count=2) as (a, b):
            hashes = a.index.hash_prompt(b"s" * 1024)
            a.store.on_record(URLS[0], hashes)
            await until(lambda: b.index.match(hashes) == {URLS[0]: 4})
    finally:
        sentinel.kill()


def start_sentinel(workdir: Path, master_port: int) -> RedisServer:
    port = free_port()
    conf = workdir / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master_port} 1\n")
    binary = shutil.which("redis-server")
    assert binary is not None
    sentinel = RedisServer(port, str(workdir))
    sentinel.proc = subprocess.Popen(
        [binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return sentinel


async def test_through_redis_cluster(redis_cluster: RedisServer) -> None:
    """``redis+cluster://``: every key of a fleet shares one hash slot, so MULTI, MGET and Lua work."""
    url = f"redis+cluster://127.0.0.1:{redis_cluster.port}"
    async with routers(url, count=2) as (a, b):
        hashes = a.index.hash_prompt(b"c" * 1024)
        a.store.on_record(URLS[0], hashes)
        lease = Lease(a.replica(URLS[1]), 10, 10)
        a.store.on_load(a.replica(URLS[1]))
        await until(lambda: b.index.match(hashes) == {URLS[0]: 4})
        await until(lambda: b.replica(URLS[1]).remote is not None)
        await until(lambda: len(a.store._held) + len(b.store._held) == len(URLS))
        lease.release()


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
def redis_cluster() -> Iterator[RedisServer]:
    """A one-node Redis Cluster owning all 16384 slots."""
    # the cluster bus port defaults to port + 10000, which may not exist: give it a free one
    bus = ("--cluster-port", str(free_port()))
    with redis_server("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", *bus) as server:
        server.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        deadline = time.monotonic() + 10
        while "cluster_state:ok" not in server.command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not come up")
            time.sleep(0.05)
        yield server
