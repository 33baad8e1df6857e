"""Our default policy: minimum estimated TTFT plus fleet prefill work, SLO-aware placement."""

from __future__ import annotations

import math

import pytest

from policies.routing import DEFAULT_POLICY, FleetView, NoEligibleReplica, ReplicaView, RequestFeatures
from policies.routing.prefix_affinity import PrefixAffinity


def view(i: int, **fields: object) -> ReplicaView:
    return ReplicaView(replica_id=f"r{i}", index=i, kv_capacity_tokens=450_000, **fields)  # type: ignore[arg-type]


def request(prompt: int, max_tokens: int = 200) -> RequestFeatures:
    return RequestFeatures(request_id="q", prompt_tokens=prompt, max_tokens=max_tokens)


def test_is_the_default() -> None:
    assert DEFAULT_POLICY == "prefix_affinity"


def test_prefers_the_replica_holding_the_prefix() -> None:
    p = PrefixAffinity()
    fleet = FleetView([view(0), view(1, prefix_match_tokens=15_000), view(2)])
    assert p.choose(request(20_000), fleet).replica.replica_id == "r1"


def test_spills_when_the_cached_replica_is_busy() -> None:
    p = PrefixAffinity()
    busy = view(1, prefix_match_tokens=2_000, inflight_prefill_new_tokens=40_000, inflight_prefill_attention=4e8)
    fleet = FleetView([view(0), busy])
    decision = p.choose(request(4_000), fleet)
    assert decision.replica.replica_id == "r0"
    assert decision.scores["estimated_ttft_ms"] < p.estimate_ttft_ms(request(4_000), busy)


def test_queued_attention_work_counts_not_just_tokens() -> None:
    p = PrefixAffinity()
    # same queued token count; r0's queue is one huge prompt (quadratic attention), r1's many small ones
    fleet = FleetView(
        [
            view(0, inflight_prefill_new_tokens=60_000, inflight_prefill_attention=60_000 * 30_000),
            view(1, inflight_prefill_new_tokens=60_000, inflight_prefill_attention=60 * 1000 * 500),
        ]
    )
    assert p.choose(request(1_000), fleet).replica.replica_id == "r1"


def test_long_contexts_slow_prefill_through_decode_drag() -> None:
    p = PrefixAffinity()
    fleet = FleetView([view(0, inflight_kv_tokens=400_000), view(1, inflight_kv_tokens=10_000)])
    assert p.choose(request(2_000), fleet).replica.replica_id == "r1"


def test_kv_overflow_costs_its_recompute() -> None:
    p = PrefixAffinity()
    other = view(1, inflight_requests=3, inflight_prefill_new_tokens=3_000)
    # 20k cached tokens save ~0.6 s here, and the fleet that much compute: worth 54k tokens over the 90 % line
    # (~1.1 s of recompute, often less: preempted blocks stay in the prefix cache) ...
    full = view(0, inflight_kv_tokens=430_000, prefix_match_tokens=20_000)
    assert p._kv_pressure_ms(request(25_000, 4_000), full) == pytest.approx(0.0208 * 54_000)
    assert p.choose(request(25_000, 4_000), FleetView([full, other])).replica.replica_id == "r0"
    # ... but not a replica already well past its capacity
    over = view(0, inflight_kv_tokens=520_000, prefix_match_tokens=20_000)
    assert p.choose(request(25_000, 4_000), FleetView([over, other])).replica.replica_id == "r1"
    # without a published capacity there is no pressure term
    assert p._kv_pressure_ms(request(25_000), ReplicaView("r0", 0, inflight_kv_tokens=480_000)) == 0.0


def test_unreachable_slo_goes_where_it_delays_fewest() -> None:
    p = PrefixAffinity()
    fleet = FleetView([view(0, inflight_requests=9), view(1, inflight_requests=2, inflight_kv_tokens=200_000)])
    decision = p.choose(request(120_000), fleet)  # ~10 s of prefill anywhere
    assert decision.reason == "slo_unreachable"
    assert decision.replica.replica_id == "r1"


def test_unreachable_slo_reuses_its_cache_when_isolated() -> None:
    p = PrefixAffinity()
    # r0 holds 70k of the prompt but is busy (its queue makes even the cached prompt miss the SLO);
    # r1 is quieter but would recompute the whole 76k-token prompt (~4.5 s of compute)
    cached = view(0, inflight_requests=9, prefix_match_tokens=70_000, inflight_prefill_new_tokens=150_000)
    quiet = view(1, inflight_requests=2)
    decision = p.choose(request(76_000), FleetView([cached, quiet]))
    assert decision.reason == "slo_unreachable"
    assert decision.replica.replica_id == "r0"
    # with no slack for cached work, fewest in flight wins as before
    blind = PrefixAffinity(isolation_slack_ms=math.inf)
    assert blind.choose(request(76_000), FleetView([cached, quiet])).replica.replica_id == "r1"


def test_ties_rotate_and_empty_fleet_raises() -> None:
    p = PrefixAffinity()
    fleet = FleetView([view(0), view(1), view(2)])
    picks = {p.choose(request(100), fleet).replica.replica_id for _ in range(6)}
    assert picks == {"r0", "r1", "r2"}
    with pytest.raises(NoEligibleReplica):
        p.choose(request(100), FleetView([]))


def test_estimate_matches_the_step_model_for_an_idle_replica() -> None:
    # an idle H100 prefilling 2048 tokens: the emulator's model gives 50.5 ms (sim-traces.md §1.10)
    p = PrefixAffinity()
    assert p.estimate_ttft_ms(request(2048), view(0)) == pytest.approx(50.5, rel=0.05)


def test_parameters_are_validated() -> None:
    with pytest.raises(ValueError):
        PrefixAffinity(kv_headroom=0)
    with pytest.raises(ValueError):
        PrefixAffinity(token_budget=0)
    with pytest.raises(ValueError):
        PrefixAffinity(slo_ttft_ms=-1)


def test_big_prefill_avoids_replicas_decoding_short_replies() -> None:
    p = PrefixAffinity()
    # r0: twenty requests streaming 5-token replies (each would miss its TPOT behind one 8k chunk);
    # r1: twenty streaming 500-token replies, and ~0.8 s more queued prefill than r0.
    short = view(0, inflight_requests=20, tpot_sensitivity=20 / 4)
    long = view(1, inflight_requests=20, tpot_sensitivity=20 / 499, inflight_prefill_new_tokens=40_000)
    assert p.choose(request(30_000), FleetView([short, long])).replica.replica_id == "r1"
    # a small prompt slows the short replies' steps by ~10 ms: worth less than its own 0.8 s wait
    assert p.choose(request(500), FleetView([short, long])).replica.replica_id == "r0"
    # without the harm term the big prompt goes to the shorter queue
    blind = PrefixAffinity(tpot_harm_weight=0)
    assert blind.choose(request(30_000), FleetView([short, long])).replica.replica_id == "r0"
