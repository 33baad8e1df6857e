"""Fault handling on live processes: replicas that die, refuse, fail, stall, and clients that leave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from emulator.tokenizer import synthesize_text
from router.fleet import Health
from tests.live import EngineProcess, live_replica, live_router, start_engine_process
from tests.live import openai_client as client

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
def two_engines() -> Iterator[tuple[EngineProcess, EngineProcess]]:
    a = start_engine_process(speed=5)
    b = start_engine_process(speed=5)
    try:
        yield a, b
    finally:
        for e in (a, b):
            if e.proc.poll() is None:
                e.kill()


def accounting(router_service: object) -> list[tuple[int, int, int]]:
    return [
        (r.inflight_requests, r.inflight_prefill_tokens, r.inflight_decode_tokens)
        for r in router_service.fleet.all()  # type: ignore[attr-defined]
    ]


async def test_replica_killed_mid_stream_ends_the_stream_with_an_error(
    two_engines: tuple[EngineProcess, EngineProcess],
) -> None:
    a, b = two_engines
    async with live_router([a.url, b.url], policy="round_robin") as router, aiohttp.ClientSession() as s:
        body = {"prompt": synthesize_text(50, 1), "max_tokens": 2000, "ignore_eos": True, "stream": True}
        async with s.post(router.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            victim = a if r.headers["X-Fleetroute-Replica"] == a.url else b
            for _ in range(3):
                await r.content.readline()
            victim.kill()
            killed_at = time.monotonic()
            rest = await asyncio.wait_for(r.content.read(), timeout=10)
            ended_after = time.monotonic() - killed_at
        assert b'"error"' in rest and rest.rstrip().endswith(b"data: [DONE]")
        assert ended_after < 2.0
        assert accounting(router.service) == [(0, 0, 0), (0, 0, 0)]
        # the survivor still serves
        done = await client(router.api).completions.create(model=MODEL, prompt="again", max_tokens=2)
        assert done.choices


async def test_replica_down_before_first_byte_is_retried_elsewhere(
    two_engines: tuple[EngineProcess, EngineProcess],
) -> None:
    a, b = two_engines
    # slow health checks: the router only learns of the death from traffic
    async with live_router([a.url, b.url], policy="round_robin", health={"interval_s": 60}) as router:
        a.kill()
        c = client(router.api)
        for i in range(6):
            done = await c.completions.create(model=MODEL, prompt=synthesize_text(10, i), max_tokens=2)
            assert done.choices[0].text
        retries = router.service.metrics.retries.labels("connect")._value.get()
        assert retries >= 1
        dead = router.service.fleet.get(a.url)
        assert dead is not None and dead.is_ejected(time.monotonic())
        assert accounting(router.service) == [(0, 0, 0), (0, 0, 0)]


async def test_replica_answering_503_is_retried_and_ejected() -> None:
    async with live_replica() as a, live_replica() as b:
        a.replica.faults.update({"error_status": 503, "error_rate": 1.0})
        async with live_router([a.url, b.url], policy="round_robin") as router:
            c = client(router.api)
            for i in range(6):
                raw = await c.completions.with_raw_response.create(model=MODEL, prompt=f"p{i}", max_tokens=1)
                assert raw.headers["x-fleetroute-replica"] == b.url
            assert router.service.metrics.retries.labels("http_503")._value.get() >= 1
            state = router.service.fleet.get(a.url)
            assert state is not None and state.ejections >= 1
            # with every replica failing, the client gets the engine's error, not a hang
            b.replica.faults.update({"error_status": 503, "error_rate": 1.0})
            state.ejected_until = 0.0
            with pytest.raises(openai.APIStatusError) as err:
                await c.completions.create(model=MODEL, prompt="x", max_tokens=1)
            assert err.value.status_code in (502, 503)


async def test_slow_replica_is_ejected_then_readmitted() -> None:
    async with (
        live_replica(speed=0.02) as slow,
        live_replica() as fast,
        live_router(
            [slow.url, fast.url],
            policy="round_robin",
            timeouts={"first_byte_s": 0.3},
            health={"interval_s": 0.1, "eject_after_failures": 2, "ejection_s": 1.0},
        ) as router,
    ):
        c = client(router.api)
        for i in range(6):
            raw = await c.completions.with_raw_response.create(
                model=MODEL, prompt=f"q{i}", max_tokens=2, extra_body={"ignore_eos": True}
            )
            assert raw.headers["x-fleetroute-replica"] == fast.url
        state = router.service.fleet.get(slow.url)
        assert state is not None and state.ejections >= 1 and state.is_ejected(time.monotonic())
        assert state.health is Health.HEALTHY  # active checks still pass: it is slow, not dead
        # the replica recovers; after the ejection window it takes traffic again
        slow.replica.runner.speed = 50.0
        await asyncio.sleep(max(0.0, state.ejected_until - time.monotonic()) + 0.05)
        seen = set()
        for i in range(4):
            raw = await c.completions.with_raw_response.create(model=MODEL, prompt=f"r{i}", max_tokens=1)
            seen.add(raw.headers["x-fleetroute-replica"])
        assert slow.url in seen


async def test_unhealthy_replica_leaves_rotation_and_returns() -> None:
    async with (
        live_replica() as a,
        live_replica() as b,
        live_router([a.url, b.url], policy="round_robin") as router,
    ):
        a.replica.faults.update({"unhealthy": True})
        state = router.service.fleet.get(a.url)
        assert state is not None
        for _ in range(100):
            if state.health is Health.UNHEALTHY:
                break
            await asyncio.sleep(0.02)
        assert state.health is Health.UNHEALTHY
        c = client(router.api)
        for _ in range(3):
            raw = await c.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=1)
            assert raw.headers["x-fleetroute-replica"] == b.url
        a.replica.faults.update({"unhealthy": False})
        for _ in range(100):
            if state.health is Health.HEALTHY:
                break
            await asyncio.sleep(0.02)
        assert state.health is Health.HEALTHY


async def test_client_disconnect_cancels_upstream_and_releases_accounting() -> None:
    async with live_replica(speed=2) as a, live_router([a.url]) as router, aiohttp.ClientSession() as s:
        body = {"prompt": synthesize_text(500, 3), "max_tokens": 5000, "ignore_eos": True, "stream": True}
        async with s.post(router.url + "/v1/completions", json=body) as r:
            await r.content.readline()
            assert a.replica.engine.num_unfinished == 1
            assert router.service.fleet.all()[0].inflight_requests == 1
        left_at = time.monotonic()
        while a.replica.engine.num_unfinished and time.monotonic() - left_at < 2:
            await asyncio.sleep(0.005)
        cancelled_after = time.monotonic() - left_at
        assert a.replica.engine.num_unfinished == 0
        assert cancelled_after < 0.5  # the requirement is 100 ms; generous for a loaded CI machine
        await asyncio.sleep(0.05)
        assert accounting(router.service) == [(0, 0, 0)]
        assert router.service.metrics.client_disconnects._value.get() == 1


async def test_stalls_before_and_after_the_first_token() -> None:
    """A stream whose first token is late is retried elsewhere; one that stalls after it ends in-band."""
    async with (
        live_replica(speed=0.05) as slow,
        live_replica(speed=50) as fast,
        live_router(
            [slow.url, fast.url],
            policy="round_robin",
            timeouts={"first_byte_s": 0.1, "inter_chunk_s": 0.08},
            health={"interval_s": 0.1, "eject_after_failures": 100},
        ) as router,
        aiohttp.ClientSession() as s,
    ):
        body = {"prompt": synthesize_text(20, 5), "max_tokens": 20, "ignore_eos": True, "stream": True}
        for _ in range(2):  # round robin: one of the two lands on the slow replica first
            async with s.post(router.url + "/v1/completions", json=body) as r:
                assert r.status == 200 and r.headers["X-Fleetroute-Replica"] == fast.url
                text = await r.read()
            assert text.count(b'data: {"id"') == 20 and text.endswith(b"data: [DONE]\n\n")
        retries = router.service.metrics.retries
        late = retries.labels("first_byte_timeout")._value.get() + retries.labels("first_token_timeout")._value.get()
        assert late >= 1

        router.service.settings.timeouts.first_byte_s = 5.0  # the slow replica's first token now makes it
        router.service.fleet.get(fast.url).draining = True  # type: ignore[union-attr]
        started = time.monotonic()
        async with s.post(router.url + "/v1/completions", json=body) as r:
            assert r.status == 200 and r.headers["X-Fleetroute-Replica"] == slow.url
            text = await r.read()
        assert b"inter_chunk_timeout" in text and text.endswith(b"data: [DONE]\n\n")
        assert time.monotonic() - started < 3.0
        assert text.count(b'data: {"id"') >= 1
        errors = router.service.metrics.upstream_errors.labels(slow.url, "inter_chunk_timeout")._value.get()
        assert errors == 1
        await asyncio.sleep(0.05)
        assert accounting(router.service) == [(0, 0, 0), (0, 0, 0)]
