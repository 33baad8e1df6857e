"""The load generator end to end over loopback HTTP: an emulated replica, a scripted fake server, nothing."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

from loadgen.cli import main
from loadgen.runner import LoadOptions, run_load
from loadgen.synthetic import SyntheticWorkload, generate_synthetic
from loadgen.traces import TraceRequest, read_mooncake
from tests.live import free_port, live_replica

HEAD500 = Path(__file__).parent / "data" / "mooncake_conversation_head500.jsonl"


async def test_mooncake_rows_against_an_emulated_replica() -> None:
    rows = read_mooncake(HEAD500, limit=20)  # 20 rows within 3 s of trace time
    requests = [TraceRequest(r.arrival / 6.0, r.input_length, r.output_length, r.hash_ids) for r in rows]
    async with live_replica(speed=100) as live:
        result = await run_load(live.url, requests, LoadOptions(request_id_prefix="t"))
    summary = result.summary
    assert result.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert (summary["completed"], summary["failed"]) == (20, 0), [r.error for r in result.records]
    assert [r.request_id for r in result.records] == [f"t-{i}" for i in range(20)]
    for row, record in zip(rows, result.records, strict=True):
        assert record.output_len == row.output_length
        assert record.input_len == record.prompt_tokens == row.input_length
        assert record.ttft is not None and 0 < record.ttft <= record.e2e < 30
        assert len(record.itls) == row.output_length - 1  # one token per chunk
        assert record.start >= record.scheduled >= 0
    # Every row starts with the trace's shared first block (hash id 0): later rows find it cached.
    assert max(r.cached_tokens for r in result.records) >= 512
    assert 0 < summary["prefix_cache_hit_rate"] < 1
    assert summary["total_input_tokens"] == sum(r.input_length for r in rows)
    assert summary["total_output_tokens"] == sum(r.output_length for r in rows)
    assert summary["mean_tpot_ms"] > 0 and summary["p99_itl_ms"] > 0


async def test_chat_endpoint_counts_exactly() -> None:
    rows = read_mooncake(HEAD500, limit=4)
    requests = [TraceRequest(0.0, r.input_length, 3, r.hash_ids) for r in rows] + [TraceRequest(0.0, 2, 3)]
    async with live_replica(speed=100) as live:
        result = await run_load(live.url + "/v1/", requests, LoadOptions(endpoint="chat"))
    assert result.summary["completed"] == 5
    for request, record in zip(requests, result.records, strict=True):
        assert record.prompt_tokens == record.input_len == max(request.input_length, 3)
        assert record.output_len == 3


async def test_multi_turn_sessions_hit_the_cache() -> None:
    workload = SyntheticWorkload(
        sessions=4, tenants=2, session_rate=20.0, min_turns=3, max_turns=3, system_prompt_tokens=256,
        user_tokens=64, output_tokens=24, think_time=0.05, seed=3,
    )  # fmt: skip
    requests = generate_synthetic(workload)
    async with live_replica(speed=100) as live:
        result = await run_load(live.url, requests, LoadOptions(endpoint="chat"))
    assert result.summary["completed"] == 12, [r.error for r in result.records]
    by_session: dict[str, list] = {}  # type: ignore[type-arg]
    for record in result.records:
        assert record.session_id is not None and record.tenant.startswith("tenant-")
        assert record.input_len == record.prompt_tokens
        by_session.setdefault(record.session_id, []).append(record)
    for turns in by_session.values():
        turns.sort(key=lambda r: r.turn)
        for previous, turn in itertools.pairwise(turns):
            assert turn.start >= previous.end  # sent only after the previous reply arrived
            # The previous prompt and its reply are a prefix of this one (16-token blocks).
            assert turn.cached_tokens >= previous.input_len + previous.output_len - 16
            assert turn.input_len > previous.input_len + previous.output_len
    assert result.summary["prefix_cache_hit_rate"] > 0.5


async def test_nothing_listening_records_errors() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    requests = [TraceRequest(0.01 * i, 10, 5) for i in range(3)]
    requests += generate_synthetic(SyntheticWorkload(sessions=1, min_turns=2, max_turns=2, seed=1))
    result = await run_load(url, requests, LoadOptions(connect_timeout=2.0))
    assert result.model is None
    assert (result.summary["completed"], result.summary["failed"]) == (0, 5)
    errors = [r.error or "" for r in result.records]
    assert sum("ClientConnectorError" in e for e in errors) == 4, errors
    assert sum(e.startswith("not sent: turn 0 of session") for e in errors) == 1


# ---------------------------------------------------------------------------------------------------------
# A scripted server: the reply length asked for picks the behaviour
# ---------------------------------------------------------------------------------------------------------


def _data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class Script:
    """``max_tokens`` 1: error mid-stream; 2: stream cut short; 3: HTTP 503; 4: normal (spaced JSON);
    5: slow normal; 6: hangs."""

    def __init__(self) -> None:
        self.headers: list[CIMultiDict[str]] = []
        self.bodies: list[dict[str, object]] = []
        self.in_flight = 0
        self.peak = 0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.headers.append(request.headers.copy())
        self.bodies.append(body)
        mode = body["max_tokens"]
        if mode == 3:
            return web.json_response({"error": {"message": "overloaded", "code": 503}}, status=503)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(_data({"choices": [{"index": 0, "text": " ba"}]}))
            if mode == 1:
                await response.write(_data({"error": {"message": "engine died", "code": 500}}))
            elif mode in (4, 5, 6):
                await asyncio.sleep({4: 0.0, 5: 0.1, 6: 30.0}[mode])
                await response.write(_data({"choices": [{"index": 0, "text": " bo", "finish_reason": "length"}]}))
                usage = {"prompt_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": None}
                await response.write(_data({"choices": [], "usage": usage}))
            if mode != 2:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted"}]})


@asynccontextmanager
async def scripted() -> AsyncIterator[tuple[str, Script]]:
    script = Script()
    app = web.Application()
    app.router.add_post("/v1/completions", script.completions)
    app.router.add_get("/v1/models", script.models)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", script
    finally:
        await runner.cleanup()


async def test_failures_are_recorded_not_raised() -> None:
    requests = [TraceRequest(0.0, 4, mode, tenant="acme") for mode in (1, 2, 3, 4)]
    async with scripted() as (url, script):
        result = await run_load(url, requests, LoadOptions(request_id_prefix="x"))
    errors = [r.error for r in result.records]
    assert errors == ["error in stream: engine died", "stream ended without [DONE]", "HTTP 503: overloaded", None]
    ok = result.records[3]
    assert (ok.output_len, ok.prompt_tokens, ok.cached_tokens, len(ok.itls)) == (2, 7, 0, 1)
    assert result.summary["completed"] == 1 and result.summary["failed"] == 3
    assert sorted(h["X-Request-Id"] for h in script.headers) == ["x-0", "x-1", "x-2", "x-3"]
    assert all(h["X-Tenant-Id"] == "acme" and "X-Session-Id" not in h for h in script.headers)
    assert all(b["model"] == "scripted" and b["ignore_eos"] is True for b in script.bodies)


async def test_concurrency_cap_duration_and_drain() -> None:
    async with scripted() as (url, script):
        capped = await run_load(url, [TraceRequest(0.0, 4, 5) for _ in range(6)], LoadOptions(max_concurrency=2))
        assert capped.summary["completed"] == 6 and script.peak == 2
        assert capped.summary["max_concurrent_requests"] == 2
        assert max(r.start - r.scheduled for r in capped.records) > 0.1  # held back, not counted in TTFT
        assert max(r.ttft or 0 for r in capped.records) < 0.1
        spaced = [TraceRequest(0.1 * i, 4, 4, session_id="s" if i == 0 else None) for i in range(20)]
        timed = await run_load(url, spaced, LoadOptions(duration=0.35, model="scripted"))
        assert 3 <= len(timed.records) <= 5 and timed.summary["failed"] == 0
        assert script.headers[-len(timed.records)]["X-Session-Id"] == "s"
        hung = await run_load(url, [TraceRequest(0.0, 4, 6)], LoadOptions(duration=0.1, drain_timeout=0.2))
        assert hung.records[0].error == "cancelled" and hung.wall_time < 5


async def test_cli_writes_results_and_plots(tmp_path: Path) -> None:
    trace = tmp_path / "slice.jsonl"
    trace.write_text("".join(HEAD500.read_text().splitlines(keepends=True)[:6]))
    async with live_replica(speed=100) as live:
        argv = ["--url", live.url, "--trace", str(trace), "--rate-scale", "4", "--goodput", "ttft:5000", "tpot:50"]
        argv += ["--output", str(tmp_path / "out" / "run.json"), "--detailed", "--metric-percentiles", "50,99"]
        code = await asyncio.to_thread(main, argv)
    assert code == 0
    saved = json.loads((tmp_path / "out" / "run.json").read_text())
    assert saved["completed"] == 6 and saved["goodput_slos_ms"] == {"ttft": 5000.0, "tpot": 50.0}
    assert saved["model_id"] == "meta-llama/Llama-3.1-8B-Instruct" and saved["rate_scale"] == 4.0
    assert len(saved["ttfts"]) == 6 and "p50_ttft_ms" in saved
    rows = (tmp_path / "out" / "run.jsonl").read_text().splitlines()
    assert len(rows) == 6 and json.loads(rows[0])["input_len"] == 6758
    for name in ("run_ttft_cdf.png", "run_tpot_cdf.png", "run_throughput.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_bad_input(tmp_path: Path, capsys: object) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1, 2]}\n')
    assert main(["--trace", str(bad)]) == 2
    assert main([]) == 2
    assert main(["--trace-format", "synthetic", "--burstiness", "0.5"]) == 2
    assert main(["--trace-format", "synthetic", "--goodput", "ttft"]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert f"{bad}:1: 2 hash_ids" in err and "give --trace FILE" in err and "--burstiness" in err
