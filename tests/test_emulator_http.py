"""The live emulated replica over real loopback HTTP, driven with the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import aiohttp
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.tokenizer import get_tokenizer, synthesize_text
from tests.live import free_port, live_replica
from tests.live import openai_client as client

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


async def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics, keyed by name and sorted labels, parsed with prometheus_client."""
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k not in ("model_name", "engine"))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
            assert sample.labels.get("model_name") == MODEL
            assert sample.labels.get("engine") == "0"
    return samples


async def test_completion_non_streaming_usage_and_request_id() -> None:
    prompt = synthesize_text(100, seed=1)
    async with live_replica() as live:
        raw = await client(live.api).completions.with_raw_response.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=7,
            extra_body={"ignore_eos": True},
            extra_headers={"X-Request-Id": "req-42"},
        )
        completion = raw.parse()
    assert raw.headers["x-request-id"] == "req-42"
    assert completion.id == "cmpl-req-42"
    assert completion.object == "text_completion"
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert get_tokenizer().token_count(choice.text) == 7
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 100
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == 107
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


async def test_chat_streaming_chunks_and_final_usage() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": synthesize_text(40, 2)}]
    async with live_replica() as live:
        stream = await client(live.api).chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    assert len(contents) == 5 and all(contents)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    # chat template: 2 tokens per message + 1 for the generation prompt
    assert usage_chunk.usage.prompt_tokens == len(get_tokenizer().encode("be brief")) + 40 + 5
    assert usage_chunk.usage.completion_tokens == 5
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


async def test_completion_streaming_and_token_id_prompt() -> None:
    ids = get_tokenizer().encode(synthesize_text(33, 3))
    async with live_replica() as live:
        stream = await client(live.api).completions.create(
            model=MODEL, prompt=ids, max_tokens=4, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [c async for c in stream]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "length"]
    assert all(c.object == "text_completion" for c in chunks)


async def test_prefix_cache_hit_reported_in_usage_and_metrics() -> None:
    prompt = synthesize_text(1000, seed=4)
    async with live_replica() as live:
        c = client(live.api)
        first = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"ignore_eos": True})
        second = await c.completions.create(
            model=MODEL, prompt=prompt + " more", max_tokens=2, extra_body={"ignore_eos": True}
        )
        metrics = await scrape(live.url)
    assert first.usage and first.usage.prompt_tokens_details
    assert second.usage and second.usage.prompt_tokens_details
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # 1000 shared tokens: 62 full 16-token blocks are reusable
    assert second.usage.prompt_tokens_details.cached_tokens == 62 * 16
    assert metrics["vllm:prefix_cache_queries_total{}"] == 1000 + second.usage.prompt_tokens
    assert metrics["vllm:prefix_cache_hits_total{}"] == 62 * 16


async def test_metrics_follow_vllm_names_and_counts() -> None:
    async with live_replica() as live:
        c = client(live.api)
        await asyncio.gather(
            *(
                c.completions.create(
                    model=MODEL, prompt=synthesize_text(50 + i, 10 + i), max_tokens=3, extra_body={"ignore_eos": True}
                )
                for i in range(4)
            )
        )
        m = await scrape(live.url)
    assert m["vllm:request_success_total{finished_reason=length}"] == 4
    assert m["vllm:request_success_total{finished_reason=stop}"] == 0
    assert m["vllm:prompt_tokens_total{}"] == sum(50 + i for i in range(4))
    assert m["vllm:generation_tokens_total{}"] == 12
    assert m["vllm:time_to_first_token_seconds_count{}"] == 4
    assert m["vllm:inter_token_latency_seconds_count{}"] == 8
    assert m["vllm:e2e_request_latency_seconds_count{}"] == 4
    assert m["vllm:num_requests_running{}"] == 0
    assert m["vllm:num_requests_waiting{}"] == 0
    assert m["vllm:kv_cache_usage_perc{}"] == 0
    assert m["vllm:num_preemptions_total{}"] == 0
    info = [k for k in m if k.startswith("vllm:cache_config_info")]
    assert info and "block_size=16" in info[0] and "num_gpu_blocks=28125" in info[0]
    for name in (
        "vllm:request_queue_time_seconds_count{}",
        "vllm:request_prefill_time_seconds_count{}",
        "vllm:request_decode_time_seconds_count{}",
        "vllm:request_inference_time_seconds_count{}",
        "vllm:iteration_tokens_total_count{}",
        "vllm:request_prompt_tokens_count{}",
    ):
        assert name in m


async def test_natural_stop_and_min_tokens() -> None:
    async with live_replica(mean_output_tokens=4) as live:
        c = client(live.api)
        free = await c.completions.create(model=MODEL, prompt=synthesize_text(20, 5), max_tokens=200)
        forced = await c.completions.create(
            model=MODEL, prompt=synthesize_text(20, 5), max_tokens=200, extra_body={"min_tokens": 50}
        )
    assert free.choices[0].finish_reason == "stop"
    assert free.usage and free.usage.completion_tokens < 200
    assert forced.usage and forced.usage.completion_tokens >= 50
    assert forced.choices[0].finish_reason == "stop"


async def test_openai_format_errors() -> None:
    async with live_replica(max_body_bytes=64 * 1024) as live:
        c = client(live.api)
        with pytest.raises(openai.NotFoundError) as not_found:
            await c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        assert "no-such-model" in str(not_found.value)
        with pytest.raises(openai.BadRequestError) as too_long:
            await c.completions.create(model=MODEL, prompt=[5] * 200, max_tokens=131_000)
        assert "maximum context length is 131072 tokens" in str(too_long.value)
        with pytest.raises(openai.BadRequestError):
            await c.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"min_tokens": 3})
        with pytest.raises(openai.BadRequestError):
            await c.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])  # type: ignore[misc,list-item]
        async with aiohttp.ClientSession() as s:
            cases = [
                ("POST", "/v1/completions", b"{not json", 400),
                ("POST", "/v1/completions", b"[1, 2]", 400),
                ("POST", "/v1/completions", json.dumps({"model": MODEL}).encode(), 400),
                ("POST", "/v1/chat/completions", json.dumps({"messages": []}).encode(), 400),
                ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": "9"}).encode(), 400),
                ("POST", "/v1/completions", json.dumps({"prompt": "x" * 100_000}).encode(), 413),
                ("GET", "/v1/nothing-here", b"", 404),
                ("GET", "/v1/completions", b"", 405),
            ]
            for method, path, body, status in cases:
                async with s.request(method, live.url + path, data=body) as r:
                    assert r.status == status, (path, body[:30])
                    err = (await r.json())["error"]
                    assert err["code"] == status and err["message"] and err["type"]
        ok = await c.completions.create(model=MODEL, prompt="still serving", max_tokens=1)
        assert ok.choices[0].finish_reason in ("length", "stop")


async def test_bad_requests_do_not_disturb_a_running_stream() -> None:
    async with live_replica(speed=5) as live:
        c = client(live.api)
        stream = await c.completions.create(
            model=MODEL, prompt=synthesize_text(64, 6), max_tokens=40, stream=True, extra_body={"ignore_eos": True}
        )
        received = 0
        async with aiohttp.ClientSession() as s:
            async for chunk in stream:
                last = chunk
                received += 1
                if received % 10 == 1:
                    async with s.post(f"{live.url}/v1/completions", data=b"{oops") as r:
                        assert r.status == 400
        assert received == 40
        assert last.choices[0].finish_reason == "length"


async def test_client_disconnect_aborts_and_releases_kv() -> None:
    async with live_replica(speed=2) as live:
        async with aiohttp.ClientSession() as s:
            body = {"prompt": synthesize_text(3000, 7), "max_tokens": 5000, "stream": True, "ignore_eos": True}
            async with s.post(f"{live.url}/v1/completions", json=body) as r:
                await r.content.readline()  # first token arrived: the request is running
                assert live.replica.engine.num_running == 1
            # leaving the block closes the connection mid-stream
            deadline = time.monotonic() + 2
            while live.replica.engine.num_unfinished and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            state = await (await s.get(f"{live.url}/admin/state")).json()
        metrics = await scrape(live.url)
    assert state["num_running"] == 0 and state["num_waiting"] == 0 and state["open_streams"] == 0
    assert state["num_free_blocks"] == state["num_gpu_blocks"]
    assert metrics["vllm:request_success_total{finished_reason=abort}"] == 1


async def test_operational_endpoints_and_admin_scheduler() -> None:
    async with live_replica() as live, aiohttp.ClientSession() as s:
        for path in ("/health", "/ping"):
            async with s.get(live.url + path) as r:
                assert r.status == 200
        async with s.post(live.url + "/ping") as r:
            assert r.status == 200
        async with s.get(live.url + "/version") as r:
            assert "version" in await r.json()
        async with s.get(live.url + "/load") as r:
            assert await r.json() == {"server_load": 0}
        models = await client(live.api).models.list()
        assert [m.id for m in models.data] == [MODEL]
        async with s.post(live.url + "/tokenize", json={"prompt": synthesize_text(12, 1)}) as r:
            tok = await r.json()
            assert tok["count"] == 12 and len(tok["tokens"]) == 12
        async with s.post(live.url + "/detokenize", json={"tokens": tok["tokens"]}) as r:
            assert (await r.json())["prompt"] == synthesize_text(12, 1)
        async with s.get(live.url + "/admin/scheduler") as r:
            current = await r.json()
            assert current["policy"] == "fcfs" and "priority" in current["available"]
        async with s.put(live.url + "/admin/scheduler", json={"policy": "priority"}) as r:
            assert r.status == 200 and (await r.json())["policy"] == "priority"
        assert live.replica.engine.scheduler.policy.name == "priority"
        async with s.put(live.url + "/admin/scheduler", json={"policy": "nonsense"}) as r:
            assert r.status == 400 and "nonsense" in (await r.json())["error"]["message"]
        async with s.post(live.url + "/reset_prefix_cache") as r:
            assert r.status == 200


async def test_served_model_aliases() -> None:
    async with live_replica(models=["alias-a", "alias-b"]) as live:
        c = client(live.api)
        models = await c.models.list()
        assert [m.id for m in models.data] == ["alias-a", "alias-b"]
        done = await c.completions.create(model="alias-b", prompt="x", max_tokens=1)
        assert done.model == "alias-b"


def test_cli_serves_several_replicas() -> None:
    base = free_port()
    while True:  # need two consecutive free ports
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", base + 1))
            break
        except OSError:
            base = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "engine", "--replicas", "2", "--base-port", str(base), "--speed", "20"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        for port in (base, base + 1):
            while True:
                try:
                    r = httpx.post(
                        f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=5
                    )
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)
