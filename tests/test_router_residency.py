"""The live router models each engine's LRU cache: what it believes a replica holds follows the engine's
evictions, whichever router sent the blocks.

The live test runs an emulated replica with a tiny KV cache (64 blocks of 16 tokens) over real HTTP and checks
the router's beliefs against the engine's own ``cached_tokens``; the state-store tests show that the other
routers' prefix records (pub/sub batches, and the reload after a reconnect) go through the same model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from emulator.profiles import load_profile
from emulator.tokenizer import synthesize_text
from router.discovery.base import ReplicaSpec
from router.fleet import Fleet, ReplicaState
from router.prefix_index import PrefixIndex, completion_prompt_bytes
from router.residency import ResidencyModel
from router.state.codec import Batch, replica_key
from router.state.redis_store import RedisStateStore
from tests.live import live_replica, live_router, redis_server

PROFILE = load_profile("h100-llama3-8b").model_copy(update={"num_gpu_blocks": 64, "max_model_len": 1024})
URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


async def complete(http: aiohttp.ClientSession, base: str, prompt: str) -> dict[str, Any]:
    body = {"model": PROFILE.model, "prompt": prompt, "max_tokens": 1}
    async with http.post(f"{base}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        reply: dict[str, Any] = await resp.json()
        return reply


def cached_tokens(reply: dict[str, Any]) -> int:
    return int(reply["usage"]["prompt_tokens_details"]["cached_tokens"])


async def test_router_forgets_prompts_the_engine_evicted_and_keeps_recent_ones() -> None:
    # 120-token prompts (~700 bytes: two 256-byte index blocks; 8 KV blocks with the reply): the engine's 64
    # blocks hold the last ~8, and the router, at 0.8 of the capacity, believes the last 6 to 8 are there.
    prompts = [synthesize_text(120, seed) for seed in range(24)]
    async with (
        live_replica(PROFILE, speed=100.0) as engine,
        live_router([f"{engine.url},kind=emulator"]) as router,
        aiohttp.ClientSession() as http,
    ):
        service = router.service
        url = engine.url
        await until(lambda: service.residency.capacity_blocks(url) is not None)
        # 1024 KV tokens x 0.8, in 256-byte blocks of 4 bytes per token (before usage reports calibrate it).
        assert service.residency.capacity_blocks(url) == 12

        hashes = [service.index.hash_prompt(completion_prompt_bytes(p)) for p in prompts]
        assert all(len(h) == 2 for h in hashes)
        first = await complete(http, router.url, prompts[0])
        assert first["usage"]["prompt_tokens"] == 120
        assert service.index.match(hashes[0]) == {url: 2}
        for prompt in prompts[1:]:
            await complete(http, router.url, prompt)

        assert service.index.match(hashes[0]) == {}, "the engine evicted the first prompt long ago"
        assert service.index.match(hashes[-1]) == {url: 2}
        assert service.index.match(hashes[-2]) == {url: 2}
        assert service.residency.evicted_blocks >= 2 * 12
        capacity = service.residency.capacity_blocks(url)
        assert capacity is not None and service.residency.tracked_blocks <= capacity
        # The engine agrees: the recent prompt is still cached, the first is not (asked directly, not routed).
        assert cached_tokens(await complete(http, url, prompts[-1])) == 112
        assert cached_tokens(await complete(http, url, prompts[0])) == 0

        async with http.get(f"{router.url}/metrics") as resp:
            exposition = await resp.text()
        line = next(x for x in exposition.splitlines() if x.startswith("fleetroute_prefix_residency_evictions_total"))
        assert float(line.split()[-1]) == service.residency.evicted_blocks

        service.fleet.update([])  # discovery drops the replica: its model goes with it
        assert service.residency.capacity_blocks(url) is None and service.residency.tracked_blocks == 0
        service.size_residency()
        assert service.residency.capacity_blocks(url) is None


# ---------------------------------------------------------------------------------------------- state store
class Router:
    """What the Redis store touches in a router: a fleet, an index, the residency model."""

    def __init__(self, redis_url: str = "redis://127.0.0.1:1/0", capacity_blocks: int | None = None) -> None:
        self.index = PrefixIndex(4 << 20)
        self.residency = ResidencyModel(self.index, cache_share=1.0)
        self.fleet = Fleet(on_added=self._added)
        self.store = RedisStateStore(redis_url, self.fleet, self.index, residency=self.residency)
        self.fleet.update([ReplicaSpec(u) for u in URLS])
        if capacity_blocks is not None:
            self.residency.set_capacity(URLS[0], kv_tokens=capacity_blocks * 64, tokens_per_block=64)

    def _added(self, replica: ReplicaState) -> None:
        self.index.add_replica(replica.id)
        self.store.replica_added(replica)


def test_remote_records_go_through_the_residency_model() -> None:
    router = Router(capacity_blocks=4)
    key = replica_key(URLS[0])
    local, remote = [1, 2, 3, 4], [11, 12, 13, 14]
    router.residency.record(URLS[0], local)  # this router's dispatch
    assert router.index.match(local) == {URLS[0]: 4}
    router.store._apply_batch(Batch(sender=replica_key("another router"), records=[(key, remote)]))
    assert router.store.applied_records == 1
    # The other router's blocks filled the replica's cache: this router's own blocks were pushed out.
    assert router.index.match(local) == {}
    assert router.index.match(remote) == {URLS[0]: 4}
    assert router.residency.evicted_blocks == 4
    # A replica whose capacity is unknown is recorded without bound, as before.
    many = list(range(100, 140))
    router.store._apply_batch(Batch(sender=replica_key("another router"), records=[(replica_key(URLS[1]), many)]))
    assert router.index.match(many) == {URLS[1]: 40}


def test_a_store_without_a_model_records_unbounded() -> None:
    index = PrefixIndex(1 << 20)
    fleet = Fleet()
    store = RedisStateStore("redis://127.0.0.1:1/0", fleet, index)
    fleet.update([ReplicaSpec(URLS[0])])
    store.replica_added(fleet.all()[0])
    blocks = list(range(1, 200))
    store._apply_batch(Batch(sender=1, records=[(replica_key(URLS[0]), blocks)]))
    assert index.match(blocks) == {URLS[0]: 199}


async def test_records_shared_through_redis_are_bounded_by_the_receivers_model() -> None:
    prompts = [[1000 * p + b for b in range(1, 5)] for p in range(10)]  # 10 prompts of 4 blocks
    with redis_server() as redis:
        sender, receiver = Router(redis.url), Router(redis.url, capacity_blocks=8)
        for r in (sender, receiver):
            await r.store.start()
        try:
            await until(lambda: sender.store.up and receiver.store.up)
            for i, blocks in enumerate(prompts):  # one batch each: later prompts get later record times
                sender.residency.record(URLS[0], blocks)
                sender.store.on_record(URLS[0], blocks)
                await until(lambda n=i + 1: receiver.store.applied_records == n)  # type: ignore[misc]
            assert sender.index.match(prompts[0]) == {URLS[0]: 4}  # no capacity known there: unbounded
            # The receiver's model of the replica holds 8 blocks: the last two prompts.
            assert [bool(receiver.index.match(p)) for p in prompts] == [False] * 8 + [True] * 2
            assert receiver.residency.evicted_blocks == 32

            # A router that connects later reloads the shared prefix set through its model as well.
            await until(lambda: sender.store.shared_prefix_entries == 40)
            late = Router(redis.url, capacity_blocks=8)
            await late.store.start()
            try:
                await until(lambda: late.index.num_entries > 0 and late.residency.evicted_blocks > 0)
                await asyncio.sleep(0.2)  # the reload is paged; let it finish
                assert late.index.num_entries == 8 and late.residency.tracked_blocks == 8
                assert [bool(late.index.match(p)) for p in prompts] == [False] * 8 + [True] * 2  # the newest
            finally:
                await late.store.stop()
        finally:
            for r in (sender, receiver):
                await r.store.stop()
