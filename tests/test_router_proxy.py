"""The router over real loopback HTTP, in front of emulated replicas, used with the official openai client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.request import EngineRequest
from emulator.tokenizer import synthesize_text
from policies.scheduling import make_scheduling_policy
from router.engine_config import body_with_priority
from tests.live import live_replica, live_router
from tests.live import openai_client as client

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


async def test_streaming_and_non_streaming_through_the_router() -> None:
    async with live_replica() as a, live_replica() as b, live_router([a.url, b.url]) as router:
        c = client(router.api)
        raw = await c.completions.with_raw_response.create(
            model=MODEL, prompt=synthesize_text(64, 1), max_tokens=5, extra_body={"ignore_eos": True}
        )
        done = raw.parse()
        assert raw.headers["x-fleetroute-replica"] in (a.url, b.url)
        assert done.usage and done.usage.completion_tokens == 5 and done.usage.prompt_tokens == 64
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": synthesize_text(30, 2)}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) == 6
        assert chunks[-1].usage and chunks[-1].usage.completion_tokens == 6
        models = await c.models.list()
        assert [m.id for m in models.data] == [MODEL]
        # accounting returns to zero once everything finished
        for r in router.service.fleet.all():
            assert (r.inflight_requests, r.inflight_prefill_tokens, r.inflight_decode_tokens) == (0, 0, 0)


async def test_requests_spread_over_several_replicas() -> None:
    async with (
        live_replica() as a,
        live_replica() as b,
        live_replica() as c3,
        live_router([a.url, b.url, c3.url], policy="round_robin") as router,
    ):
        c = client(router.api)
        seen: Counter[str] = Counter()
        for i in range(9):
            raw = await c.completions.with_raw_response.create(model=MODEL, prompt=synthesize_text(20, i), max_tokens=1)
            seen[raw.headers["x-fleetroute-replica"]] += 1
        assert seen == {a.url: 3, b.url: 3, c3.url: 3}


async def test_model_field_is_respected() -> None:
    async with (
        live_replica(models=["model-a"]) as a,
        live_replica(models=["model-b"]) as b,
        live_router([a.url, b.url], policy="round_robin") as router,
    ):
        c = client(router.api)
        for _ in range(4):
            raw = await c.completions.with_raw_response.create(model="model-b", prompt="hello", max_tokens=1)
            assert raw.headers["x-fleetroute-replica"] == b.url
            assert raw.parse().model == "model-b"
        models = await c.models.list()
        assert sorted(m.id for m in models.data) == ["model-a", "model-b"]
        with pytest.raises(openai.NotFoundError) as err:
            await c.completions.create(model="model-z", prompt="hello", max_tokens=1)
        assert "model-z" in str(err.value)


async def test_bad_input_gets_openai_errors_and_the_router_keeps_serving() -> None:
    async with live_replica() as a, live_router([a.url], max_body_bytes=64 * 1024) as router:
        async with aiohttp.ClientSession() as s:
            cases = [
                ("POST", "/v1/completions", b"{nope", 400),
                ("POST", "/v1/completions", b'"a string"', 400),
                ("POST", "/v1/completions", json.dumps({"model": MODEL}).encode(), 400),
                ("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), 400),
                ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": -3}).encode(), 400),
                ("POST", "/v1/completions", json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400),
                ("POST", "/v1/completions", json.dumps({"prompt": "x" * 100_000}).encode(), 413),
                ("POST", "/v1/completions", json.dumps({"model": "ghost", "prompt": "x"}).encode(), 404),
                ("GET", "/v1/unknown", b"", 404),
                ("GET", "/v1/completions", b"", 405),
            ]
            for method, path, body, status in cases:
                async with s.request(method, router.url + path, data=body) as r:
                    assert r.status == status, (path, body[:40], await r.text())
                    error = (await r.json())["error"]
                    assert error["code"] == status and error["message"] and error["type"]
            # a parameter only the engine validates comes back from the engine, in the same format
            async with s.post(router.url + "/v1/completions", json={"prompt": "x", "n": 3}) as r:
                assert r.status == 400 and "n=1" in (await r.json())["error"]["message"]
        done = await client(router.api).completions.create(model=MODEL, prompt="still here", max_tokens=1)
        assert done.choices
        for r in router.service.fleet.all():
            assert r.inflight_requests == 0


async def test_health_ready_and_metrics() -> None:
    async with live_replica() as a, live_router([a.url]) as router:
        await client(router.api).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        async with aiohttp.ClientSession() as s:
            async with s.get(router.url + "/health") as r:
                assert r.status == 200
            async with s.get(router.url + "/ready") as r:
                assert r.status == 200 and (await r.json())["ready"] is True
            await asyncio.sleep(0.5)  # let one scrape land
            async with s.get(router.url + "/metrics") as r:
                text = await r.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    names = {name for name, _ in samples}
    for expected in (
        "fleetroute_requests_total",
        "fleetroute_time_to_first_token_seconds_bucket",
        "fleetroute_request_duration_seconds_bucket",
        "fleetroute_routing_decision_seconds_bucket",
        "fleetroute_replica_inflight_requests",
        "fleetroute_replica_inflight_tokens",
        "fleetroute_replica_healthy",
        "fleetroute_signal_age_seconds",
        "fleetroute_replica_kv_usage_ratio",
        "fleetroute_prefix_index_bytes",
    ):
        assert expected in names, expected
    assert samples[("fleetroute_requests_total", (("policy", "default"), ("replica", a.url), ("status", "200")))] == 1
    assert samples[("fleetroute_replica_healthy", (("replica", a.url),))] == 1


async def test_ready_is_503_without_healthy_replicas() -> None:
    async with live_router(["http://127.0.0.1:1"], wait_ready=0) as router, aiohttp.ClientSession() as s:
        async with s.get(router.url + "/ready") as r:
            assert r.status == 503
        async with s.post(router.url + "/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 503
            assert (await r.json())["error"]["type"] == "ServiceUnavailableError"


async def test_admin_api_drain_policy_and_token() -> None:
    async with (
        live_replica() as a,
        live_replica() as b,
        live_router([a.url, b.url], admin_token="s3cret", policy="round_robin") as router,
        aiohttp.ClientSession() as s,
    ):
        auth = {"Authorization": "Bearer s3cret"}
        async with s.get(router.admin + "/admin/replicas") as r:
            assert r.status == 401
        async with s.get(router.admin + "/admin/replicas", headers=auth) as r:
            listed = (await r.json())["replicas"]
            assert {x["id"] for x in listed} == {a.url, b.url}
            assert all(x["health"] == "healthy" and x["eligible"] for x in listed)
        async with s.post(router.admin + "/admin/replicas/drain", json={"replica": a.url}, headers=auth) as r:
            assert r.status == 200 and (await r.json())["draining"] is True
        c = client(router.api)
        for _ in range(4):
            raw = await c.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=1)
            assert raw.headers["x-fleetroute-replica"] == b.url
        async with s.post(router.admin + "/admin/replicas/undrain", json={"replica": a.url}, headers=auth) as r:
            assert (await r.json())["draining"] is False
        async with s.put(router.admin + "/admin/policy", json={"policy": "least_requests"}, headers=auth) as r:
            assert r.status == 200 and (await r.json())["policy"] == "least_requests"
        assert router.service.policy.name == "least_requests"
        async with s.put(router.admin + "/admin/policy", json={"policy": "bogus"}, headers=auth) as r:
            assert r.status == 400 and "bogus" in (await r.json())["error"]["message"]
        async with s.post(
            router.admin + "/admin/replicas/drain", json={"replica": "http://nowhere:1"}, headers=auth
        ) as r:
            assert r.status == 404


async def test_engine_scheduler_is_applied_to_emulated_replicas() -> None:
    async with (
        live_replica() as a,
        live_router([f"{a.url},kind=emulator"], engine_schedulers={"*": "priority"}) as router,
    ):
        for _ in range(100):
            if a.replica.engine.scheduler.policy.name == "priority":
                break
            await asyncio.sleep(0.02)
        assert a.replica.engine.scheduler.policy.name == "priority"
        assert router.service.fleet.all()[0].applied_scheduler == "priority"


async def test_sjf_reaches_a_vllm_replica_through_the_priority_field() -> None:
    """A vLLM replica of an ``sjf`` group gets the prompt's token count as ``priority`` (it runs vLLM's
    ``priority`` order); an emulated replica in the same group runs ``sjf`` itself and gets the body as sent."""
    async with (
        live_replica() as vllm,
        live_replica() as emulated,
        live_router(
            [f"{vllm.url},kind=vllm,group=g", f"{emulated.url},kind=emulator,group=g"],
            engine_schedulers={"g": "sjf"},
            policy="round_robin",
        ) as router,
    ):
        vllm.replica.engine.set_policy(make_scheduling_policy("priority"))
        seen: dict[str, list[tuple[int, int]]] = {vllm.url: [], emulated.url: []}
        for replica in (vllm, emulated):
            submit = replica.replica.runner.submit

            def capture(
                request: EngineRequest, _log: list[tuple[int, int]] = seen[replica.url], _submit: Any = submit
            ) -> Any:
                _log.append((request.priority, request.num_prompt_tokens))
                return _submit(request)

            replica.replica.runner.submit = capture  # type: ignore[method-assign]
        c = client(router.api)
        sent = {300: None, 40: 7, 1200: None, 90: -3}  # prompt tokens -> the client's own priority
        for i, (tokens, client_priority) in enumerate(sent.items()):
            extra: dict[str, object] = {"ignore_eos": True}
            if client_priority is not None:
                extra["priority"] = client_priority
            done = await c.completions.create(
                model=MODEL, prompt=synthesize_text(tokens, 10 + i), max_tokens=2, extra_body=extra
            )
            assert done.usage and done.usage.prompt_tokens == tokens
        assert len(seen[vllm.url]) == 2 and len(seen[emulated.url]) == 2
        for priority, prompt_tokens in seen[vllm.url]:
            # Set from the prompt's bytes, so close to the engine's count but not equal; never the client's.
            assert priority not in (0, 7, -3)
            assert 0.5 * prompt_tokens < priority < 2.0 * prompt_tokens, (priority, prompt_tokens)
        assert all(priority == (sent[n] or 0) for priority, n in seen[emulated.url])
        assert emulated.replica.engine.scheduler.policy.name == "sjf"


def test_priority_is_appended_as_the_last_member() -> None:
    for raw in (b'{"model":"m","prompt":"x"}', b'{"priority":5,"prompt":"x"}  \n', b'{"a":{"b":1}}', b"{ }"):
        body = json.loads(body_with_priority(raw, 1234))
        assert body["priority"] == 1234 and {k: v for k, v in body.items() if k != "priority"} == {
            k: v for k, v in json.loads(raw).items() if k != "priority"
        }
    for not_an_object in (b"[1, 2]", b"", b"[{}]"):
        with pytest.raises(ValueError):
            body_with_priority(not_an_object, 1)


def test_invalid_configuration_names_the_field() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve", "--replica", "http://127.0.0.1:9", "--policy", "nonsense"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "policy" in result.stderr and "nonsense" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "serve", "--replica", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"FLEETROUTE_HEALTH__TIMEOUT_S": "-2", "PATH": ""},
    )
    assert result.returncode == 2 and "health.timeout_s" in result.stderr
