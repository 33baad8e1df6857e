"""Routing policies: each decision rule on hand-built snapshots, edge cases, determinism and the registry."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.routing import (
    FleetView,
    NoEligibleReplica,
    ReplicaView,
    RequestFeatures,
    RoutingPolicy,
    available_routing_policies,
    make_routing_policy,
)
from policies.routing.chwbl import Chwbl
from policies.routing.dynamo_cost import DynamoCost
from policies.routing.kv_freeness import KvFreeness
from policies.routing.llmd_scorer import LlmdScorer
from policies.routing.pipeline import WeightedPolicy
from policies.routing.power_of_two import PowerOfTwo
from policies.routing.preble_e2 import PrebleE2
from policies.routing.session_affinity import SessionAffinity
from policies.routing.sglang_cache_aware import SglangCacheAware

NAMES = available_routing_policies()
BLOCK = 64  # router prefix block (tokens), as in the simulator


def rv(i: int, **kw: Any) -> ReplicaView:
    return ReplicaView(replica_id=f"r{i}", index=i, **kw)


def fleet(*replicas: ReplicaView, now: float = 0.0) -> FleetView:
    return FleetView(replicas=list(replicas), now=now)


def req(
    prompt: int = 1000,
    max_tokens: int = 100,
    session: str | None = None,
    rid: str = "q",
    blocks: Sequence[int] | None = None,
    seed: int = 0,
) -> RequestFeatures:
    if blocks is None:
        rng = random.Random(seed)
        blocks = [rng.getrandbits(64) for _ in range(prompt // BLOCK)]
    return RequestFeatures(
        request_id=rid,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        block_hashes=blocks,
        block_size=BLOCK,
        session_id=session,
    )


def scraped(i: int, *, waiting: int = 0, running: int = 0, kv: float = 0.0, **kw: Any) -> ReplicaView:
    return rv(i, num_waiting=waiting, num_running=running, kv_usage=kv, scrape_age_s=0.5, **kw)


def random_fleet(rng: random.Random, n: int, *, signals: bool = True, prompt: int = 1000) -> FleetView:
    replicas = []
    for i in range(n):
        have = signals and rng.random() < 0.8
        replicas.append(
            rv(
                i,
                inflight_requests=rng.randrange(20),
                inflight_prefill_tokens=rng.randrange(20000),
                inflight_decode_tokens=rng.randrange(5000),
                inflight_kv_tokens=rng.randrange(100000),
                num_running=rng.randrange(16) if have else None,
                num_waiting=rng.randrange(8) if have else None,
                kv_usage=rng.random() if have else None,
                scrape_age_s=rng.random() * 3 if have else None,
                kv_capacity_tokens=400_000 if have else None,
                prefix_match_tokens=rng.randrange(0, prompt + 1, BLOCK),
            )
        )
    return FleetView(replicas=replicas, now=rng.random() * 100)


# ------------------------------------------------------------------------------------------ every policy


@pytest.mark.parametrize("name", NAMES)
def test_empty_fleet_raises(name: str) -> None:
    with pytest.raises(NoEligibleReplica):
        make_routing_policy(name).choose(req(), fleet())


@pytest.mark.parametrize("name", NAMES)
def test_one_replica_is_chosen(name: str) -> None:
    policy = make_routing_policy(name)
    only = rv(0, inflight_requests=500, inflight_prefill_tokens=10**6, kv_usage=1.0, num_waiting=99)
    for session in (None, "s"):
        assert policy.choose(req(session=session), fleet(only)).replica is only


@pytest.mark.parametrize("name", NAMES)
def test_all_scraped_signals_missing(name: str) -> None:
    policy = make_routing_policy(name)
    view = fleet(*(rv(i, inflight_requests=i, inflight_kv_tokens=1000 * i) for i in range(4)))
    for _ in range(10):
        assert policy.choose(req(), view).replica in view.replicas


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prompt", [0, 1, 100_000])
def test_empty_tiny_and_huge_prompts(name: str, prompt: int) -> None:
    policy = make_routing_policy(name)
    rng = random.Random(prompt)
    for _ in range(5):
        view = random_fleet(rng, 8, prompt=prompt)
        decision = policy.choose(req(prompt=prompt), view)
        assert decision.replica in view.replicas
        assert all(math.isfinite(v) or math.isinf(v) for v in decision.scores.values())


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name: str) -> None:
    def run() -> list[str]:
        policy = make_routing_policy(name, seed=7)
        rng = random.Random(3)
        out = []
        for k in range(60):
            view = random_fleet(rng, 6)
            session = f"s{k % 5}" if k % 2 else None
            out.append(policy.choose(req(session=session, rid=f"q{k}", seed=k % 4), view).replica.replica_id)
        return out

    assert run() == run()


@pytest.mark.parametrize("name", NAMES)
def test_describe_names_the_policy_and_is_json(name: str) -> None:
    policy = make_routing_policy(name)
    described = policy.describe()
    assert described["name"] == policy.name
    json.dumps(described)


@pytest.mark.parametrize("name", NAMES)
def test_registry_constructs_and_decides(name: str) -> None:
    policy = make_routing_policy(name, seed=1)
    assert isinstance(policy, RoutingPolicy)
    view = random_fleet(random.Random(0), 5)
    assert policy.choose(req(session="s"), view).replica in view.replicas


def test_registry_rejects_unknown_parameters() -> None:
    for name in NAMES:
        with pytest.raises(ValueError, match="invalid parameters"):
            make_routing_policy(name, {"no_such_parameter": 1})


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    n=st.integers(1, 12),
    prompt=st.integers(0, 5000),
    seed=st.integers(0, 2**16),
    session=st.one_of(st.none(), st.text(max_size=8)),
)
def test_any_snapshot_yields_one_of_its_replicas(
    name: str, n: int, prompt: int, seed: int, session: str | None
) -> None:
    view = random_fleet(random.Random(seed), n, prompt=prompt)
    decision = make_routing_policy(name, seed=seed).choose(req(prompt=prompt, session=session), view)
    assert decision.replica in view.replicas


# ------------------------------------------------------------------------------------------ parameter checks


@pytest.mark.parametrize(
    ("factory", "params", "message"),
    [
        (PowerOfTwo, {"seed": "x"}, "seed"),
        (PowerOfTwo, {"seed": True}, "seed"),
        (KvFreeness, {"watermark": 1.0}, "watermark"),
        (KvFreeness, {"watermark": -0.1}, "watermark"),
        (KvFreeness, {"kv_capacity_tokens": 0}, "kv_capacity_tokens"),
        (SessionAffinity, {"max_sessions": 0}, "max_sessions"),
        (SessionAffinity, {"ttl_s": 0}, "ttl_s"),
        (SessionAffinity, {"ttl_s": math.inf}, "ttl_s"),
        (Chwbl, {"load_factor": 0.9}, "load_factor"),
        (Chwbl, {"virtual_nodes": 0}, "virtual_nodes"),
        (Chwbl, {"key_blocks": 0}, "key_blocks"),
        (Chwbl, {"use_session": "yes"}, "use_session"),
        (SglangCacheAware, {"cache_threshold": 1.5}, "cache_threshold"),
        (SglangCacheAware, {"balance_abs_threshold": -1}, "balance_abs_threshold"),
        (SglangCacheAware, {"balance_abs_threshold": 2.5}, "balance_abs_threshold"),
        (SglangCacheAware, {"balance_rel_threshold": math.nan}, "balance_rel_threshold"),
        (LlmdScorer, {"prefix_weight": -1}, "prefix_weight"),
        (LlmdScorer, {"missing_signals": "ignore"}, "missing_signals"),
        (DynamoCost, {"overlap_score_weight": -1}, "overlap_score_weight"),
        (DynamoCost, {"temperature": -0.5}, "temperature"),
        (DynamoCost, {"block_size": 0}, "block_size"),
        (PrebleE2, {"window_s": 0}, "window_s"),
        (PrebleE2, {"window_buckets": 0}, "window_buckets"),
        (PrebleE2, {"tpot_ms": -1}, "tpot_ms"),
        (WeightedPolicy, {"picker": "best"}, "picker 'best'"),
        (WeightedPolicy, {"filters": "healthy_signals"}, "filters must be a list"),
        (WeightedPolicy, {"scorers": {"prefix": -1}}, "weight of scorer 'prefix'"),
        (WeightedPolicy, {"filters": [{"name": "healthy_signals", "max_age_s": -1}]}, "max_age_s"),
        (WeightedPolicy, {"filters": [{"name": "prefix_affinity", "bogus": 1}]}, "prefix_affinity"),
        (WeightedPolicy, {"filters": [{"threshold": 0.5}]}, "'name' key"),
        (WeightedPolicy, {"scorers": {"session": {"weight": 1, "max_sessions": 0}}}, "max_sessions"),
    ],
)
def test_parameter_validation(factory: Callable[..., RoutingPolicy], params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory(**params)


def test_unknown_plugins_are_all_named() -> None:
    with pytest.raises(ValueError) as err:
        WeightedPolicy(filters=["healthy_signals", "nope_filter"], scorers={"prefix": 1, "nope_scorer": 2}, picker="x")
    text = str(err.value)
    for name in ("filter 'nope_filter'", "scorer 'nope_scorer'", "picker 'x'", "available filters"):
        assert name in text
    assert "'healthy_signals'" not in text.split(";")[0]


# ------------------------------------------------------------------------------------------ power_of_two


def test_power_of_two_prefers_lower_token_load_of_the_pair() -> None:
    light = rv(0, inflight_prefill_tokens=100)
    heavy = rv(1, inflight_prefill_tokens=50, inflight_decode_tokens=500)  # fewer requests' worth, more tokens
    policy = PowerOfTwo(seed=1)
    assert all(policy.choose(req(), fleet(light, heavy)).replica is light for _ in range(20))


def test_power_of_two_never_picks_the_heaviest_and_samples_distinct_pairs() -> None:
    replicas = [rv(i, inflight_decode_tokens=10 * i) for i in range(3)]
    policy = PowerOfTwo(seed=5)
    counts = Counter(policy.choose(req(), fleet(*replicas)).replica.replica_id for _ in range(3000))
    assert "r2" not in counts  # always compared with a lighter one: the pair is distinct
    assert counts["r0"] == pytest.approx(2000, rel=0.1)  # r0 wins whenever sampled: 2 of the 3 pairs


def test_power_of_two_tie_keeps_the_first_sampled() -> None:
    replicas = [rv(i, inflight_prefill_tokens=7) for i in range(2)]
    policy = PowerOfTwo(seed=0)
    counts = Counter(policy.choose(req(), fleet(*replicas)).replica.replica_id for _ in range(400))
    assert counts["r0"] > 100 and counts["r1"] > 100  # whichever was sampled first


# ------------------------------------------------------------------------------------------ kv_freeness


def test_kv_freeness_divides_free_memory_by_batch() -> None:
    # r0: (9900 - 5000) / 5 = 980 per request; r1: (9900 - 2000) / 10 = 790: more free memory, but a bigger batch.
    r0 = scraped(0, kv=0.5, running=5, kv_capacity_tokens=10_000)
    r1 = scraped(1, kv=0.2, running=10, kv_capacity_tokens=10_000)
    d = KvFreeness().choose(req(), fleet(r0, r1))
    assert d.replica is r0
    assert d.scores["freeness_tokens"] == pytest.approx(980)


def test_kv_freeness_waiting_requests_count_in_the_batch() -> None:
    r0 = scraped(0, kv=0.1, running=2, waiting=8, kv_capacity_tokens=10_000)  # 8900 / 10
    r1 = scraped(1, kv=0.5, running=4, kv_capacity_tokens=10_000)  # 4900 / 4
    assert KvFreeness().choose(req(), fleet(r0, r1)).replica is r1


def test_kv_freeness_router_accounting_is_virtual_usage() -> None:
    # The scrape shows r0 idle, but the router has since sent it 4 requests holding 8000 tokens.
    r0 = scraped(0, kv=0.0, running=0, kv_capacity_tokens=10_000, inflight_requests=4, inflight_kv_tokens=8000)
    r1 = scraped(1, kv=0.3, running=2, kv_capacity_tokens=10_000)  # (9900 - 3000) / 2
    assert KvFreeness().choose(req(), fleet(r0, r1)).replica is r1


def test_kv_freeness_idle_replica_is_infinitely_free_and_ties_go_first() -> None:
    busy = scraped(0, kv=0.01, running=1, kv_capacity_tokens=10_000)
    idle_a, idle_b = scraped(1, kv_capacity_tokens=10_000), scraped(2, kv_capacity_tokens=10_000)
    d = KvFreeness().choose(req(), fleet(busy, idle_a, idle_b))
    assert d.replica is idle_a and math.isinf(d.scores["freeness_tokens"])


def test_kv_freeness_missing_signals_use_fleet_capacity_and_accounting() -> None:
    r0 = rv(0, inflight_requests=2, inflight_kv_tokens=4000)  # capacity from r1: (9900 - 4000) / 2 = 2950
    r1 = scraped(1, kv=0.5, running=2, kv_capacity_tokens=10_000)  # (9900 - 5000) / 2 = 2450
    assert KvFreeness().choose(req(), fleet(r0, r1)).replica is r0
    # Nothing published anywhere: the largest demand stands in for capacity.
    a = rv(0, inflight_requests=1, inflight_kv_tokens=9000)
    b = rv(1, inflight_requests=3, inflight_kv_tokens=3000)
    assert KvFreeness().choose(req(), fleet(a, b)).replica is b
    assert KvFreeness(kv_capacity_tokens=100_000).choose(req(), fleet(a, b)).replica is a  # 90k/1 > 96k/3


# ------------------------------------------------------------------------------------------ session_affinity


def test_session_affinity_sticks_even_as_load_grows() -> None:
    policy = SessionAffinity()
    first = policy.choose(req(session="alice"), fleet(rv(0, inflight_prefill_tokens=10), rv(1))).replica
    assert first.replica_id == "r1"  # least outstanding tokens
    loaded = fleet(rv(0), rv(1, inflight_prefill_tokens=10**6))
    d = policy.choose(req(session="alice"), loaded)
    assert d.replica.replica_id == "r1" and d.reason == "sticky"
    assert policy.choose(req(session="bob"), loaded).replica.replica_id == "r0"


def test_session_affinity_rebinds_when_the_replica_disappears() -> None:
    policy = SessionAffinity()
    policy.choose(req(session="s"), fleet(rv(0, inflight_decode_tokens=5), rv(1), rv(2, inflight_decode_tokens=9)))
    d = policy.choose(req(session="s"), fleet(rv(0, inflight_decode_tokens=5), rv(2, inflight_decode_tokens=9)))
    assert d.replica.replica_id == "r0" and d.reason == "rebound"
    back = fleet(rv(0, inflight_decode_tokens=5), rv(1), rv(2))
    assert policy.choose(req(session="s"), back).replica.replica_id == "r0"  # the new binding holds


def test_session_affinity_lru_bound() -> None:
    policy = SessionAffinity(max_sessions=2)
    view = fleet(rv(0), rv(1, inflight_prefill_tokens=1))
    policy.choose(req(session="a"), view)  # a -> r0
    flipped = fleet(rv(0, inflight_prefill_tokens=1), rv(1))
    policy.choose(req(session="b"), flipped)  # b -> r1
    policy.choose(req(session="a"), flipped)  # a refreshed (still r0)
    policy.choose(req(session="c"), flipped)  # evicts b, the least recently used
    assert len(policy) == 2
    again = fleet(rv(0), rv(1, inflight_prefill_tokens=1))
    assert policy.choose(req(session="a"), again).reason == "sticky"
    assert policy.choose(req(session="b"), again).reason == "bound"  # forgotten: bound afresh, to r0
    assert len(policy) == 2


def test_session_affinity_ttl() -> None:
    policy = SessionAffinity(ttl_s=10.0)
    policy.choose(req(session="s"), fleet(rv(0), rv(1, inflight_prefill_tokens=1), now=0.0))
    later = fleet(rv(0, inflight_prefill_tokens=1), rv(1), now=9.0)
    assert policy.choose(req(session="s"), later).replica.replica_id == "r0"  # used at t=9: lives to t=19
    expired = fleet(rv(0, inflight_prefill_tokens=1), rv(1), now=19.5)
    d = policy.choose(req(session="s"), expired)
    assert d.replica.replica_id == "r1" and d.reason == "bound"
    policy.choose(req(session="t"), fleet(rv(0), now=100.0))
    assert len(policy) == 1  # s expired and was dropped


def test_session_affinity_without_session_is_least_tokens() -> None:
    d = SessionAffinity().choose(req(), fleet(rv(0, inflight_decode_tokens=3), rv(1)))
    assert d.replica.replica_id == "r1" and d.reason == "no_session"


# ------------------------------------------------------------------------------------------ chwbl


def test_chwbl_key_sticks_when_load_is_low() -> None:
    replicas = [rv(i) for i in range(8)]
    request = req(prompt=2000, seed=42)
    homes = {Chwbl().choose(request, fleet(*replicas)).replica.replica_id for _ in range(5)}
    shuffled = replicas[::-1]
    homes |= {Chwbl().choose(request, fleet(*shuffled)).replica.replica_id for _ in range(5)}
    assert len(homes) == 1  # same ring in every instance (stable hash), independent of fleet order
    other = {Chwbl().choose(req(prompt=2000, seed=s), fleet(*replicas)).replica.replica_id for s in range(40)}
    assert len(other) >= 6  # different keys spread


def test_chwbl_key_is_the_leading_blocks_or_the_session() -> None:
    policy = Chwbl(key_blocks=4)
    base = req(prompt=2000, seed=1)
    same_head = req(prompt=3000, blocks=[*base.block_hashes[:4], 1, 2, 3])
    assert policy.key(base) == policy.key(same_head)
    assert policy.key(req(prompt=2000, seed=2)) != policy.key(base)
    s1, s2 = req(prompt=2000, seed=1, session="conv"), req(prompt=5000, seed=9, session="conv")
    assert policy.key(s1) == policy.key(s2)
    assert Chwbl(use_session=False).key(s1) != Chwbl(use_session=False).key(s2)
    assert policy.key(req(prompt=10, rid="a")) != policy.key(req(prompt=10, rid="b"))  # no block: request id


def test_chwbl_spills_past_a_full_home() -> None:
    replicas = [rv(i) for i in range(4)]
    request = req(seed=3)
    home = Chwbl().choose(request, fleet(*replicas)).replica.index
    # total 6, cap = ceil(1.25 * 7 / 4) = 3: the home at 3 is full, everyone else at 1 has room.
    loaded = [rv(i, inflight_requests=3 if i == home else 1) for i in range(4)]
    d = Chwbl().choose(request, fleet(*loaded))
    assert d.replica.index != home and d.reason == "spill" and d.scores["cap"] == 3


@pytest.mark.parametrize(("n", "load_factor"), [(4, 1.25), (8, 1.25), (16, 1.0), (5, 2.0)])
def test_chwbl_bound_holds_under_a_stream(n: int, load_factor: float) -> None:
    rng = random.Random(n)
    policy = Chwbl(load_factor=load_factor)
    load = [0] * n
    hot_keys = [req(seed=k, rid=f"k{k}") for k in range(3)]  # a few very hot prefixes stress the bound
    for step in range(3000):
        request = hot_keys[rng.randrange(3)] if rng.random() < 0.7 else req(seed=1000 + step, rid=f"c{step}")
        view = fleet(*(rv(i, inflight_requests=load[i]) for i in range(n)))
        total = sum(load)
        i = policy.choose(request, view).replica.index
        load[i] += 1
        cap = math.ceil(load_factor * (total + 1) / n)
        assert load[i] <= cap  # the placement never pushes a replica past the cap
        if rng.random() < 0.45:  # completions
            busy = [j for j in range(n) if load[j]]
            load[rng.choice(busy)] -= 1


def test_chwbl_insert_only_stream_never_exceeds_the_cap_anywhere() -> None:
    n, policy, load = 8, Chwbl(), [0] * 8
    for step in range(2000):
        view = fleet(*(rv(i, inflight_requests=load[i]) for i in range(n)))
        load[policy.choose(req(seed=step % 2, rid=str(step)), view).replica.index] += 1
        assert max(load) <= math.ceil(1.25 * sum(load) / n)


def test_chwbl_retry_exclusion_does_not_move_other_keys() -> None:
    policy = Chwbl()
    replicas = [rv(i) for i in range(6)]
    homes = {s: policy.choose(req(seed=s), fleet(*replicas)).replica.replica_id for s in range(30)}
    without_r0 = [r for r in replicas if r.replica_id != "r0"]
    for s, home in homes.items():
        if home != "r0":
            assert policy.choose(req(seed=s), fleet(*without_r0)).replica.replica_id == home


# ------------------------------------------------------------------------------------------ sglang_cache_aware


def test_sglang_hit_goes_to_the_longest_match() -> None:
    r0 = rv(0, inflight_requests=5, prefix_match_tokens=640)
    r1 = rv(1, inflight_requests=0, prefix_match_tokens=64)
    d = SglangCacheAware().choose(req(prompt=1000), fleet(r0, r1))
    assert d.replica is r0 and d.reason == "cache_hit" and d.scores["match_rate"] == pytest.approx(0.64)


def test_sglang_miss_goes_least_loaded_not_smallest_tree() -> None:
    r0 = rv(0, inflight_requests=3, prefix_match_tokens=256)  # 0.256 <= 0.3
    r1 = rv(1, inflight_requests=1)
    r2 = rv(2, inflight_requests=1)
    d = SglangCacheAware().choose(req(prompt=1000), fleet(r0, r1, r2))
    assert d.replica is r1 and d.reason == "cache_miss"  # ties: first minimum in fleet order
    exactly = rv(0, prefix_match_tokens=300)
    assert SglangCacheAware().choose(req(prompt=1000), fleet(exactly, rv(1))).reason == "cache_miss"  # strict >


def test_sglang_imbalance_overrides_cache_affinity() -> None:
    full_match = rv(0, inflight_requests=100, prefix_match_tokens=1000)
    d = SglangCacheAware().choose(req(prompt=1000), fleet(full_match, rv(1, inflight_requests=10)))
    assert d.replica.replica_id == "r1" and d.reason == "imbalanced"  # 90 > 64 and 100 > 15
    # 64 apart is not more than 64: balanced, so the cache wins.
    d = SglangCacheAware().choose(req(prompt=1000), fleet(rv(0, inflight_requests=64, prefix_match_tokens=1000), rv(1)))
    assert d.reason == "cache_hit"
    # Far apart in absolute terms but within 1.5x: balanced.
    d = SglangCacheAware().choose(
        req(prompt=1000), fleet(rv(0, inflight_requests=300, prefix_match_tokens=900), rv(1, inflight_requests=201))
    )
    assert d.reason == "cache_hit"


def test_sglang_equal_matches_prefer_the_less_loaded() -> None:
    a = rv(0, inflight_requests=4, prefix_match_tokens=512)
    b = rv(1, inflight_requests=2, prefix_match_tokens=512)
    assert SglangCacheAware().choose(req(prompt=1000), fleet(a, b, rv(2))).replica is b


# ------------------------------------------------------------------------------------------ llmd_scorer / weighted


def test_llmd_weights_trade_prefix_against_load() -> None:
    # r0: 3*1 + 2*0 + 2*(1-0.9) = 3.2; r1: 0 + 2*1 + 2*1 = 4.0 -> the idle replica wins despite no cache.
    r0 = scraped(0, waiting=10, kv=0.9, prefix_match_tokens=1000)
    r1 = scraped(1, waiting=0, kv=0.0)
    d = LlmdScorer().choose(req(prompt=1000), fleet(r0, r1))
    assert d.replica is r1 and d.scores["total"] == pytest.approx(4.0)
    # r0: 3 + 2 + 2*0.5 = 6 beats r1: 0 + 2 + 2 = 4 when queues are equal (all equal -> 1).
    r0 = scraped(0, kv=0.5, prefix_match_tokens=1000)
    d = LlmdScorer().choose(req(prompt=1000), fleet(r0, r1))
    assert d.replica is r0 and d.scores["total"] == pytest.approx(6.0)


def test_llmd_prefix_score_is_capped_and_zero_for_empty_prompts() -> None:
    d = LlmdScorer().choose(req(prompt=100), fleet(scraped(0, prefix_match_tokens=10_000)))
    assert d.scores["prefix"] == 1.0
    assert LlmdScorer().choose(req(prompt=0), fleet(scraped(0, prefix_match_tokens=64))).scores["prefix"] == 0.0


def test_llmd_missing_signals_read_as_saturated_or_idle() -> None:
    never = rv(0)
    seen = scraped(1, waiting=3, kv=0.5)
    assert LlmdScorer().choose(req(), fleet(never, seen)).replica is seen
    assert LlmdScorer(missing_signals="idle").choose(req(), fleet(never, seen)).replica is never


def test_llmd_ties_break_at_random_by_seed() -> None:
    view = fleet(*(scraped(i) for i in range(4)))
    policy = LlmdScorer(seed=3)
    seq = [policy.choose(req(), view).replica.replica_id for _ in range(200)]
    assert set(seq) == {"r0", "r1", "r2", "r3"}
    again = LlmdScorer(seed=3)
    assert [again.choose(req(), view).replica.replica_id for _ in range(200)] == seq


def test_weighted_default_is_the_llmd_profile() -> None:
    rng = random.Random(9)
    a, b = WeightedPolicy(seed=4), LlmdScorer(seed=4)
    for _ in range(50):
        view = random_fleet(rng, 6)
        assert a.choose(req(), view).replica is b.choose(req(), view).replica


def test_weighted_scorers_for_accounting_signals() -> None:
    view = fleet(
        rv(0, inflight_requests=1, inflight_prefill_tokens=9000, num_running=9),
        rv(1, inflight_requests=5, inflight_prefill_tokens=100, num_running=1),
    )
    assert WeightedPolicy(scorers={"inflight_requests": 1}).choose(req(), view).replica.index == 0
    assert WeightedPolicy(scorers={"inflight_tokens": 1}).choose(req(), view).replica.index == 1
    assert WeightedPolicy(scorers={"running": 1}).choose(req(), view).replica.index == 1
    d = WeightedPolicy(scorers={"inflight_tokens": {"weight": 2}}).choose(req(), view)
    assert d.scores["total"] == 2.0 and d.scores["candidates"] == 2


def test_weighted_healthy_signals_filter_drops_stale_and_fails_open() -> None:
    stale = rv(0, num_waiting=0, kv_usage=0.0, scrape_age_s=30.0)
    fresh = rv(1, num_waiting=5, kv_usage=0.9, scrape_age_s=0.2)
    never = rv(2)
    policy = WeightedPolicy(filters=[{"name": "healthy_signals", "max_age_s": 5}])
    d = policy.choose(req(), fleet(stale, fresh, never))
    assert d.replica is fresh and d.scores["candidates"] == 1
    assert policy.choose(req(), fleet(stale, never)).scores["candidates"] == 2  # all stale: keep all


def test_weighted_prefix_affinity_filter() -> None:
    hot = scraped(0, waiting=50, kv=0.95, prefix_match_tokens=900)
    warm = scraped(1, waiting=40, kv=0.9, prefix_match_tokens=850)
    cold = scraped(2)
    sticky = WeightedPolicy(filters=["prefix_affinity"], scorers={"queue": 1}, seed=0)
    assert Counter(sticky.choose(req(prompt=1000), fleet(hot, warm, cold)).replica.index for _ in range(300))[2] < 12
    assert sticky.choose(req(prompt=1000), fleet(hot, warm, cold)).scores["candidates"] in (2, 3)
    nothing_qualifies = fleet(scraped(0, prefix_match_tokens=100), scraped(1))
    assert sticky.choose(req(prompt=1000), nothing_qualifies).scores["candidates"] == 2
    explore = WeightedPolicy(filters=[{"name": "prefix_affinity", "epsilon": 1.0}], scorers={"queue": 1})
    assert explore.choose(req(prompt=1000), fleet(hot, warm, cold)).replica is cold


def test_weighted_random_picker_follows_scores() -> None:
    view = fleet(rv(0, inflight_requests=0), rv(1, inflight_requests=10), rv(2, inflight_requests=5))
    policy = WeightedPolicy(scorers={"inflight_requests": 1}, picker="weighted_random", seed=2)
    counts = Counter(policy.choose(req(), view).replica.index for _ in range(3000))
    assert 1 not in counts  # score 0
    assert counts[0] == pytest.approx(2000, rel=0.1)  # 1.0 vs 0.5
    uniform = WeightedPolicy(scorers={}, picker="random", seed=1)
    assert len({uniform.choose(req(), view).replica.index for _ in range(100)}) == 3


def test_weighted_session_scorer_follows_the_last_choice() -> None:
    policy = WeightedPolicy(scorers={"session": 10, "inflight_requests": 1})
    first = policy.choose(req(session="s"), fleet(rv(0, inflight_requests=3), rv(1))).replica
    assert first.index == 1
    assert policy.choose(req(session="s"), fleet(rv(0), rv(1, inflight_requests=3))).replica.index == 1
    assert policy.choose(req(session="other"), fleet(rv(0), rv(1, inflight_requests=3))).replica.index == 0


# ------------------------------------------------------------------------------------------ dynamo_cost


def test_dynamo_cost_formula() -> None:
    # r0: overlap 512 of 1024 -> prefill (1024 - 512) / 16 = 32, no active KV -> 32; r1: 64 -> r0.
    r0, r1 = rv(0, prefix_match_tokens=512), rv(1)
    d = DynamoCost().choose(req(prompt=1024), fleet(r0, r1))
    assert d.replica is r0 and d.scores == {"cost": 32.0, "prefill_blocks": 32.0, "decode_blocks": 0.0}
    # Active KV 1600 tokens = 100 blocks on r0 -> 132 > 64.
    busy = rv(0, prefix_match_tokens=512, inflight_kv_tokens=1600)
    assert DynamoCost().choose(req(prompt=1024), fleet(busy, r1)).replica is r1
    # Weight 4 on prefill: 4 * 32 + 100 = 228 < 4 * 64 = 256 -> cache wins again.
    assert DynamoCost(overlap_score_weight=4).choose(req(prompt=1024), fleet(busy, r1)).replica is busy
    # Outstanding prefill counts: r1 has 2048 prompt tokens queued -> (1024 + 2048) / 16 = 192.
    queued = rv(1, inflight_prefill_tokens=2048)
    assert DynamoCost().choose(req(prompt=1024), fleet(busy, queued)).replica is busy


def test_dynamo_overlap_counts_whole_blocks_only() -> None:
    d = DynamoCost().choose(req(prompt=100), fleet(rv(0, prefix_match_tokens=40)))
    assert d.scores["prefill_blocks"] == pytest.approx((100 - 32) / 16)


def test_dynamo_ties_are_random_and_softmax_prefers_low_cost() -> None:
    view = fleet(rv(0), rv(1), rv(2))
    policy = DynamoCost(seed=1)
    assert len({policy.choose(req(), view).replica.index for _ in range(100)}) == 3
    skewed = fleet(rv(0, inflight_kv_tokens=1600), rv(1), rv(2, inflight_kv_tokens=800))
    sampler = DynamoCost(temperature=0.5, seed=3)
    counts = Counter(sampler.choose(req(), skewed).replica.index for _ in range(3000))
    assert counts[1] > counts[2] > counts[0] > 0


def test_dynamo_softmax_is_seeded() -> None:
    skewed = fleet(rv(0, inflight_kv_tokens=1600), rv(1), rv(2, inflight_kv_tokens=800))
    a, b = DynamoCost(temperature=1.0, seed=11), DynamoCost(temperature=1.0, seed=11)
    assert [a.choose(req(), skewed).replica.index for _ in range(100)] == [
        b.choose(req(), skewed).replica.index for _ in range(100)
    ]


# ------------------------------------------------------------------------------------------ preble_e2


def test_preble_exploits_when_the_cached_prefix_outweighs_the_new_tokens() -> None:
    holder = rv(0, prefix_match_tokens=768, inflight_decode_tokens=5000)  # 768 cached > 232 new
    d = PrebleE2().choose(req(prompt=1000), fleet(holder, rv(1)))
    assert d.replica is holder and d.reason == "exploit"


def test_preble_explores_by_total_cost_otherwise() -> None:
    # 448 cached <= 552 new: explore. Equal load; r0's prefill (552 tokens) beats r1's (1000 tokens).
    partial = rv(0, prefix_match_tokens=448)
    d = PrebleE2().choose(req(prompt=1000), fleet(partial, rv(1)))
    assert d.replica is partial and d.reason == "explore"
    assert d.scores["prefill_ms"] == pytest.approx(4.21 + 0.1084 * 552)
    # Decode load in flight outweighs the saving: 100 tokens x 30 ms = 3000 ms.
    busy = rv(0, prefix_match_tokens=448, inflight_decode_tokens=100)
    assert PrebleE2().choose(req(prompt=1000), fleet(busy, rv(1))).replica.index == 1


def test_preble_window_load_accumulates_and_expires() -> None:
    policy = PrebleE2(window_s=60.0, window_buckets=6)
    first = policy.choose(req(prompt=2000), fleet(rv(0), rv(1), now=0.0)).replica.index
    assert first == 0  # all equal: the first
    assert policy.window_load_ms("r0") == pytest.approx(4.21 + 0.1084 * 2000)
    # r0 now carries the first request's prefill in its window: the next explore goes to r1.
    assert policy.choose(req(prompt=2000), fleet(rv(0), rv(1), now=1.0)).replica.index == 1
    assert policy.choose(req(prompt=2000), fleet(rv(0), rv(1), now=2.0)).replica.index in (0, 1)
    policy.choose(req(prompt=0), fleet(rv(0), rv(1), now=200.0))
    assert policy.window_load_ms("r0") == 0.0 and policy.window_load_ms("r1") == 0.0


def test_preble_eviction_cost_when_the_request_does_not_fit() -> None:
    # r0 holds 9900 of 10000 tokens: 452 of its 552 missed tokens force a recompute elsewhere (53.2 ms), making
    # it 53.2 + 64.0 ms against r1's 112.6 ms prefill of the whole prompt.
    full = rv(0, kv_usage=0.99, kv_capacity_tokens=10_000, prefix_match_tokens=448)
    roomy = rv(1, kv_usage=0.1, kv_capacity_tokens=10_000)
    d = PrebleE2(tpot_ms=0).choose(req(prompt=1000), fleet(full, roomy))
    assert d.replica is roomy
    assert PrebleE2(tpot_ms=0).choose(req(prompt=1000), fleet(full, roomy)).scores["eviction_ms"] == 0.0
    fits = dataclasses.replace(full, kv_usage=0.5)
    assert PrebleE2(tpot_ms=0).choose(req(prompt=1000), fleet(fits, roomy)).replica is fits


def test_preble_exploit_ties_go_to_the_lower_load() -> None:
    a = rv(0, prefix_match_tokens=900, inflight_decode_tokens=10)
    b = rv(1, prefix_match_tokens=900, inflight_decode_tokens=2)
    assert PrebleE2().choose(req(prompt=1000), fleet(a, b)).replica is b


def test_chwbl_ring_is_the_same_in_every_process() -> None:
    code = (
        "from policies.routing.chwbl import Chwbl\n"
        "from policies.routing.base import FleetView, ReplicaView, RequestFeatures\n"
        "view = FleetView([ReplicaView(f'http://10.0.0.{i}:8000', i) for i in range(16)])\n"
        "p = Chwbl()\n"
        "print([p.choose(RequestFeatures(str(k), 100, 1, block_hashes=[k * 7919], session_id=None), view)"
        ".replica.index for k in range(50)])\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
