"""The fleet simulator: determinism, decode spans versus step-by-step, and agreement with the live path."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from emulator.profiles import load_profile
from emulator.sim import FleetSimulator, SimConfig
from loadgen.arrivals import retime, scale_arrivals
from loadgen.runner import LoadOptions, run_load
from loadgen.traces import TraceRequest, read_trace
from tests.live import live_replica, live_router

TRACE = Path(__file__).parent / "data" / "mooncake_conversation_head500.jsonl"
H100 = load_profile("h100-llama3-8b")


def simulate(trace: list[TraceRequest], **config: object) -> dict[str, object]:
    options: dict[str, object] = {"profile": H100, "replicas": 4, "policy": "round_robin"}
    options.update(config)
    result = FleetSimulator(SimConfig(**options)).run(trace)  # type: ignore[arg-type]
    return {"summary": result.summary, "records": result.records, "replicas": result.replicas}


def test_simulation_is_deterministic_for_a_seed() -> None:
    trace = read_trace(TRACE, limit=200)
    a = simulate(trace, policy="random", seed=3)
    b = simulate(trace, policy="random", seed=3)
    c = simulate(trace, policy="random", seed=4)
    assert a["summary"] == b["summary"]
    assert a["summary"] != c["summary"]


def test_decode_spans_match_step_by_step_simulation() -> None:
    trace = read_trace(TRACE, limit=120)
    fast = simulate(trace, decode_spans=True)
    slow = simulate(trace, decode_spans=False)
    for f, s in zip(fast["records"], slow["records"], strict=True):  # type: ignore[call-overload]
        assert f.ttft == pytest.approx(s.ttft, abs=1e-9)
        assert f.e2e == pytest.approx(s.e2e, abs=1e-9)
        assert f.output_len == s.output_len
        assert f.cached_tokens == s.cached_tokens
        assert len(f.itls) == len(s.itls) == f.output_len - 1
        assert sum(f.itls) == pytest.approx(sum(s.itls), abs=1e-9)


def test_records_and_summary_are_consistent() -> None:
    trace = read_trace(TRACE, limit=150)
    out = simulate(trace, policy="least_tokens")
    summary = out["summary"]
    records = out["records"]
    assert summary["completed"] == 150 and summary["failed"] == 0  # type: ignore[index]
    for rec, row in zip(records, trace, strict=True):  # type: ignore[call-overload]
        assert rec.input_len == row.input_length
        assert rec.output_len == row.output_length
        assert rec.ttft is not None and 0 < rec.ttft <= rec.e2e
    # every request after the first shares the system-prompt block (id 0): cached tokens appear
    assert summary["prefix_cache_hit_rate"] > 0  # type: ignore[index]
    replicas = out["replicas"]
    assert sum(r["prefix_cache_hits_tokens"] for r in replicas) == sum(r.cached_tokens for r in records)  # type: ignore[attr-defined, union-attr]


def test_drain_is_the_work_left_after_the_last_arrival() -> None:
    light = [TraceRequest(arrival=i * 1.0, input_length=200, output_length=10) for i in range(5)]
    result = FleetSimulator(SimConfig(profile=H100, replicas=2, policy="round_robin")).run(light)
    last = max(r.start + r.e2e for r in result.records)
    assert result.drain_s == pytest.approx(last - 4.0)
    assert result.drain_s < 0.5  # one short request, nothing queued
    # a 60k-token prompt arriving last: its prefill (~3 s on an H100) is still owed when the load stops
    heavy = [*light, TraceRequest(arrival=4.5, input_length=60_000, output_length=10)]
    owed = FleetSimulator(SimConfig(profile=H100, replicas=2, policy="round_robin")).run(heavy)
    assert owed.drain_s > 2.0


def test_oversized_requests_fail_cleanly() -> None:
    trace = [
        TraceRequest(arrival=0.0, input_length=130_000, output_length=5000),
        TraceRequest(arrival=0.1, input_length=100, output_length=10),
    ]
    out = simulate(trace)
    records = out["records"]
    assert records[0].error is not None and "max_model_len" in records[0].error  # type: ignore[index]
    assert records[1].ok  # type: ignore[index]


async def test_live_path_and_simulator_agree_on_median_ttft() -> None:
    """The same trace and policy, live over HTTP and simulated: median TTFT within 15 %.

    Live, every component shares this process's core, so each request's CPU cost (prompt synthesis,
    JSON, tokenisation: ~10 ms for a Mooncake-size prompt) is multiplied by the emulator's speed-up in
    model time. Real time (speed 1) keeps that a few percent of TTFT even when other processes hold both
    cores: measured live/sim 1.02 with two CPU hogs running, where speed 2 drifted to 1.23.
    """
    speed = 1.0
    trace = retime(read_trace(TRACE, limit=40), rate=1.5, seed=1)
    sim = simulate(trace, replicas=2)
    async with (
        live_replica(speed=speed) as a,
        live_replica(speed=speed) as b,
        live_router([a.url, b.url], policy="round_robin") as router,
    ):
        # the live replay runs `speed` times faster than model time
        live = await run_load(router.url, scale_arrivals(trace, speed), LoadOptions(progress=False))
    assert live.summary["completed"] == len(trace)
    live_median_ms = statistics.median(r.ttft for r in live.records if r.ttft is not None) * speed * 1000
    sim_median_ms = sim["summary"]["median_ttft_ms"]  # type: ignore[index]
    assert live_median_ms == pytest.approx(sim_median_ms, rel=0.15), (live_median_ms, sim_median_ms)
    live_tpot_ms = statistics.median(t for r in live.records if (t := r.tpot) is not None) * speed * 1000
    assert live_tpot_ms == pytest.approx(sim["summary"]["median_tpot_ms"], rel=0.15)  # type: ignore[index]
