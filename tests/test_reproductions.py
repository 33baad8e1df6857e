"""The paper reproductions (bench/reproductions.py) keep their direction on small inputs, and the engine's
no-chunking mode behaves like vLLM V0's prefill-prioritising scheduler that Sarathi-Serve compares against.

Every assertion is on simulator output in virtual time, so none depends on the machine's speed.
"""

from __future__ import annotations

from functools import cache
from itertools import pairwise

import pytest

from bench import reproductions as rp
from loadgen.traces import TraceRequest
from policies.scheduling.slai import SlaiPolicy
from tests.engine_helpers import Driver, make_engine, make_profile, make_request


@cache
def lengths() -> rp.Lengths:
    return rp.synthetic_lengths(5000, 8192, seed=0)


@cache
def lengths_4k() -> rp.Lengths:
    return rp.synthetic_lengths(5000, 4096, seed=0)


# ------------------------------------------------------------------------------------------------ engine option


def plan_of(driver: Driver) -> list[tuple[str, int]]:
    rec = driver.step()
    assert rec is not None
    return [(r.request_id, n) for r, n in zip(rec.step.plan.requests, rec.step.plan.num_new_tokens, strict=True)]


def test_without_chunking_a_prefill_step_runs_whole_prompts_only() -> None:
    profile = make_profile(num_gpu_blocks=256, max_num_batched_tokens=256, max_model_len=2048)
    engine = make_engine(profile.model_copy(update={"enable_chunked_prefill": False}))
    driver = Driver(engine)
    engine.add_request(make_request("a", 40, 20, ignore_eos=True), 0.0)
    assert plan_of(driver) == [("a", 40)]
    assert plan_of(driver) == [("a", 1)]
    # A 300-token prompt exceeds the 256-token budget: it still runs whole, alone, and "a" stalls.
    engine.add_request(make_request("b", 300, 5, ignore_eos=True), driver.now)
    engine.add_request(make_request("c", 100, 5, ignore_eos=True), driver.now)
    assert plan_of(driver) == [("b", 300)]
    assert plan_of(driver) == [("c", 100)]
    assert plan_of(driver) == [("a", 1), ("b", 1), ("c", 1)]


def test_with_chunking_the_same_arrival_is_chunked_beside_the_decode() -> None:
    engine = make_engine(make_profile(num_gpu_blocks=256, max_num_batched_tokens=256, max_model_len=2048))
    driver = Driver(engine)
    engine.add_request(make_request("a", 40, 20, ignore_eos=True), 0.0)
    plan_of(driver)
    engine.add_request(make_request("b", 300, 5, ignore_eos=True), driver.now)
    assert plan_of(driver) == [("a", 1), ("b", 255)]
    assert plan_of(driver) == [("a", 1), ("b", 45)]


def test_simulated_inter_token_gaps_include_a_prefill_stall() -> None:
    """A decode span that follows a prefill-only step must report the stall in the first gap."""
    profile = rp.a100_profile(8192, chunked=False)
    trace = [
        TraceRequest(arrival=0.0, input_length=1000, output_length=50),
        TraceRequest(arrival=0.2, input_length=4000, output_length=5),
    ]
    first = rp.simulate(profile, trace).records[0]
    stall = max(first.itls)
    assert stall > 0.25  # a 4000-token prefill on the A100 profile takes ~0.28 s
    assert first.ttft is not None
    assert first.e2e == pytest.approx(first.ttft + sum(first.itls))


# ------------------------------------------------------------------------------------------------ experiments


def test_chunked_prefill_lowers_p99_tbt_versus_no_chunking() -> None:
    trace = rp.poisson_trace(lengths(), 300, qps=6.0, seed=0)
    none = rp.Stats.of_result(6.0, rp.simulate(rp.a100_profile(8192, chunked=False), trace))
    chunked = rp.Stats.of_result(6.0, rp.simulate(rp.a100_profile(512), trace))
    assert none.completed == chunked.completed == 300
    assert chunked.tbt_p99_s < 0.1 < none.tbt_p99_s
    assert chunked.tbt_max_s < none.tbt_max_s / 4


def test_vtc_keeps_the_service_gap_bounded_while_fcfs_lets_it_grow() -> None:
    profile = rp.a10_profile(rp.VTC_KV_TOKENS // 16)
    trace = rp.vtc_trace(100.0, seed=0)
    times = [25.0, 50.0, 75.0, 100.0]
    fcfs = rp.service_gap(rp.simulate(profile, trace, "fcfs").records, times)
    vtc = rp.service_gap(rp.simulate(profile, trace, "vtc").records, times)
    # FCFS serves in proportion to arrivals: the faster client pulls ahead, steadily.
    assert all(b > a for a, b in pairwise(fcfs))
    assert fcfs[-1] > 1.6 * fcfs[1]
    bound = 2 * max(rp.VTC_INPUT_WEIGHT * rp.VTC_LENGTH, rp.VTC_OUTPUT_WEIGHT * rp.VTC_KV_TOKENS)
    assert fcfs[-1] > bound
    assert max(abs(g) for g in vtc) < bound


def test_slai_lowers_median_ttft_versus_fcfs_at_moderate_load() -> None:
    profile = rp.a100_profile(512)
    trace = rp.poisson_trace(lengths(), 400, qps=7.0, seed=0)
    fcfs = rp.Stats.of_result(7.0, rp.simulate(profile, trace, "fcfs"))
    slai = rp.Stats.of_result(7.0, rp.simulate(profile, trace, lambda: SlaiPolicy(tbt_s=0.5)))
    assert slai.completed == fcfs.completed == 400
    assert slai.ttft_p50_s < 0.8 * fcfs.ttft_p50_s
    assert slai.tbt_p99_s <= 0.5  # deferring decodes must still meet their deadline


def test_kv_freeness_has_a_lower_p99_ttft_than_least_requests_under_kv_pressure() -> None:
    profile = rp.a10_profile(rp.LLUMNIX_BLOCKS)
    trace = rp.poisson_trace(lengths_4k(), 800, qps=3.0, seed=0)
    p99 = {}
    for routing in ("least_requests", "kv_freeness"):
        result = rp.simulate(profile, trace, replicas=4, routing=routing)
        p99[routing] = rp.Stats.of_result(3.0, result).ttft_p99_s
    assert p99["kv_freeness"] < 0.7 * p99["least_requests"]


def test_capacity_search_finds_the_largest_passing_load() -> None:
    def measure(qps: float) -> rp.Stats:
        return rp.Stats(qps, 1, 1, qps / 10, 0.0, 0.0, 0.0, 0.0, 0, 0.0)

    cap, probes = rp.max_qps(measure, lambda s: s.ttft_p50_s <= 0.5, 0.5, 16.0, 0.01)
    assert 4.95 <= cap <= 5.0
    assert probes[0].qps == 0.5 and probes[1].qps == 16.0
    assert rp.max_qps(measure, lambda s: True, 0.5, 16.0, 0.01)[0] == 16.0
    assert rp.max_qps(measure, lambda s: False, 0.5, 16.0, 0.01)[0] == 0.0
