"""The engine core end to end: finish reasons, aborts, admission checks, prefix reuse, and no leaks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.engine import EngineCore
from emulator.request import EngineRequest, FinishReason, RequestStatus, SamplingParams
from emulator.scheduler import ScheduledStep
from policies.scheduling import make_scheduling_policy
from tests.engine_helpers import (
    BLOCK,
    EOS,
    Driver,
    StepRecord,
    assert_kv_drained,
    expected_tokens,
    make_engine,
    make_profile,
    make_request,
    prompt_tokens,
)


@dataclass
class Recorder:
    """An EngineObserver that keeps everything."""

    steps: list[tuple[ScheduledStep, float, float]] = field(default_factory=list)
    first_tokens: dict[str, float] = field(default_factory=dict)
    itls: dict[str, list[float]] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)
    finished: dict[str, FinishReason | None] = field(default_factory=dict)

    def on_step(self, step: ScheduledStep, duration_s: float, now: float) -> None:
        self.steps.append((step, duration_s, now))

    def on_first_token(self, request: EngineRequest, now: float) -> None:
        assert request.request_id not in self.first_tokens
        self.first_tokens[request.request_id] = now

    def on_token(self, request: EngineRequest, now: float, since_last_s: float) -> None:
        self.itls.setdefault(request.request_id, []).append(since_last_s)

    def on_preempted(self, request: EngineRequest) -> None:
        self.preempted.append(request.request_id)

    def on_finished(self, request: EngineRequest, now: float) -> None:
        assert request.request_id not in self.finished, "finished twice"
        self.finished[request.request_id] = request.finish_reason


def _expected_outcome(s: SamplingParams) -> tuple[FinishReason, int]:
    if not s.ignore_eos and s.eos_after is not None:
        stop_at = max(s.eos_after, s.min_tokens, 1)
        if stop_at <= s.max_tokens:
            return FinishReason.STOP, stop_at
    return FinishReason.LENGTH, s.max_tokens


def _expected_ids(r: EngineRequest) -> list[int]:
    reason, n = _expected_outcome(r.sampling)
    if reason is FinishReason.STOP:
        return [*expected_tokens(r.seed, n - 1), EOS]
    return expected_tokens(r.seed, n)


def _run_one(**sampling: object) -> EngineRequest:
    engine = make_engine()
    req = make_request("r", 30, **sampling)  # type: ignore[arg-type]
    engine.add_request(req, now=0.0)
    Driver(engine).run()
    assert_kv_drained(engine)
    return req


# ------------------------------------------------------------------------------------------ finish reasons


def test_finish_length_at_max_tokens() -> None:
    r = _run_one(max_tokens=5)
    assert r.finish_reason is FinishReason.LENGTH
    assert r.num_output_tokens == 5
    assert r.output_token_ids == expected_tokens(r.seed, 5)
    assert EOS not in r.output_token_ids
    assert r.status is RequestStatus.FINISHED


def test_finish_stop_at_eos_after() -> None:
    r = _run_one(max_tokens=10, eos_after=3)
    assert r.finish_reason is FinishReason.STOP
    assert r.num_output_tokens == 3
    assert r.output_token_ids[-1] == EOS
    assert r.output_token_ids[:-1] == expected_tokens(r.seed, 2)


def test_min_tokens_delays_eos() -> None:
    r = _run_one(max_tokens=10, eos_after=3, min_tokens=6)
    assert r.finish_reason is FinishReason.STOP
    assert r.num_output_tokens == 6
    assert r.output_token_ids[-1] == EOS
    assert EOS not in r.output_token_ids[:-1]


def test_min_tokens_below_eos_after_changes_nothing() -> None:
    r = _run_one(max_tokens=10, eos_after=4, min_tokens=2)
    assert (r.finish_reason, r.num_output_tokens) == (FinishReason.STOP, 4)


def test_ignore_eos_disables_eos() -> None:
    r = _run_one(max_tokens=10, eos_after=3, ignore_eos=True)
    assert r.finish_reason is FinishReason.LENGTH
    assert r.num_output_tokens == 10
    assert EOS not in r.output_token_ids


def test_eos_beyond_max_tokens_is_length() -> None:
    r = _run_one(max_tokens=4, eos_after=9)
    assert (r.finish_reason, r.num_output_tokens) == (FinishReason.LENGTH, 4)
    assert EOS not in r.output_token_ids


def test_eos_as_last_allowed_token_is_stop() -> None:
    # vLLM V1's check_stop tests EOS before the length cap.
    r = _run_one(max_tokens=4, eos_after=4)
    assert (r.finish_reason, r.num_output_tokens) == (FinishReason.STOP, 4)
    assert r.output_token_ids[-1] == EOS


def test_single_token_request() -> None:
    r = _run_one(max_tokens=1)
    assert (r.finish_reason, r.num_output_tokens) == (FinishReason.LENGTH, 1)
    assert r.first_token_time == r.finished_time == r.last_token_time


def test_sampling_params_validation() -> None:
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=5, min_tokens=6)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=5, min_tokens=-1)
    with pytest.raises(ValueError):
        make_request("empty", [], max_tokens=1)


# ------------------------------------------------------------------------------------------ admission checks


def test_check_fits_uses_vllm_message() -> None:
    engine = make_engine(make_profile(max_model_len=1024))
    engine.check_fits(1000, 24)  # exactly the context length is allowed
    with pytest.raises(ValueError) as info:
        engine.check_fits(1000, 25)
    assert str(info.value) == (
        "This model's maximum context length is 1024 tokens. However, you requested 1025 tokens "
        "(1000 in the messages, 25 in the completion). Please reduce the length of the messages or completion."
    )


def test_add_request_too_long_rejected_before_queueing() -> None:
    engine = make_engine(make_profile(max_model_len=512))
    with pytest.raises(ValueError, match="maximum context length is 512"):
        engine.add_request(make_request("big", 500, max_tokens=20), now=0.0)
    assert engine.get("big") is None
    assert engine.num_waiting == 0
    assert not engine.has_work()


def test_duplicate_request_id_rejected() -> None:
    engine = make_engine()
    engine.add_request(make_request("dup", 20, max_tokens=3), now=0.0)
    with pytest.raises(ValueError, match="duplicate request id 'dup'"):
        engine.add_request(make_request("dup", 30, max_tokens=3), now=0.0)
    assert engine.num_waiting == 1
    Driver(engine).run()
    assert_kv_drained(engine)


def test_block_size_mismatch_rejected() -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="block size"):
        engine.add_request(make_request("x", 20, block_size=32), now=0.0)


# ------------------------------------------------------------------------------------------ aborts


def test_abort_during_in_flight_step_takes_effect_at_complete() -> None:
    rec = Recorder()
    engine = make_engine(observer=rec)
    req = make_request("a", 40, max_tokens=20)
    other = make_request("b", 40, max_tokens=3)
    engine.add_request(req, now=0.0)
    engine.add_request(other, now=0.0)
    d = Driver(engine)
    d.step()
    step = engine.schedule(d.now)
    assert step is not None
    held = list(engine.kv.blocks_of("a"))
    assert held
    assert engine.abort("a", d.now) is True
    # Nothing happens yet: the step computing a's token is on the GPU.
    assert req.status is RequestStatus.RUNNING
    assert list(engine.kv.blocks_of("a")) == held
    assert engine.get("a") is req
    outputs = engine.complete_step(step, d.now + step.duration_s)
    d.now += step.duration_s
    assert req.status is RequestStatus.FINISHED
    assert req.finish_reason is FinishReason.ABORT
    assert req.finished_time == pytest.approx(d.now)
    assert engine.kv.blocks_of("a") == ()
    assert engine.get("a") is None
    assert rec.finished["a"] is FinishReason.ABORT
    # The token computed in the aborted step is still reported (vLLM processes aborts between steps).
    assert [o.request.request_id for o in outputs] == ["a", "b"]
    assert engine.abort("a", d.now) is False
    d.run()
    assert other.finish_reason is FinishReason.LENGTH
    assert_kv_drained(engine)


def test_abort_in_flight_of_request_finishing_in_that_step_keeps_natural_reason() -> None:
    engine = make_engine()
    req = make_request("a", 20, max_tokens=2)
    engine.add_request(req, now=0.0)
    d = Driver(engine)
    d.step()
    step = engine.schedule(d.now)
    assert step is not None
    engine.abort("a", d.now)
    outputs = engine.complete_step(step, d.now + step.duration_s)
    assert outputs[0].finish_reason is FinishReason.LENGTH
    assert req.finish_reason is FinishReason.LENGTH
    assert_kv_drained(engine)


def test_abort_in_flight_mid_prefill_releases_blocks() -> None:
    engine = make_engine(make_profile(max_num_batched_tokens=256))
    req = make_request("long", 600, max_tokens=4)
    engine.add_request(req, now=0.0)
    step = engine.schedule(0.0)
    assert step is not None
    assert len(engine.kv.blocks_of("long")) == 16
    engine.abort("long", 0.0)
    assert engine.complete_step(step, step.duration_s) == []
    assert req.finish_reason is FinishReason.ABORT
    assert req.num_output_tokens == 0
    assert_kv_drained(engine)


def test_abort_waiting_request() -> None:
    rec = Recorder()
    engine = make_engine(make_profile(max_num_seqs=1), observer=rec)
    first, second = make_request("first", 20, max_tokens=5), make_request("second", 20, max_tokens=5)
    engine.add_request(first, now=0.0)
    engine.add_request(second, now=0.0)
    d = Driver(engine)
    d.step()
    assert second.status is RequestStatus.WAITING
    assert engine.abort("second", d.now) is True
    assert second.finish_reason is FinishReason.ABORT
    assert second.status is RequestStatus.FINISHED
    assert second.first_scheduled_time is None
    assert engine.num_waiting == 0
    assert engine.num_unfinished == 1
    assert rec.finished == {"second": FinishReason.ABORT}
    d.run()
    assert first.finish_reason is FinishReason.LENGTH
    assert "second" not in rec.first_tokens
    assert_kv_drained(engine)


def test_abort_running_request_between_steps() -> None:
    engine = make_engine()
    req = make_request("a", 50, max_tokens=30)
    engine.add_request(req, now=0.0)
    d = Driver(engine)
    d.step()
    d.step()
    assert engine.abort("a", d.now) is True
    assert req.finish_reason is FinishReason.ABORT
    assert req.num_output_tokens == 2
    assert_kv_drained(engine)
    assert engine.schedule(d.now) is None


def test_abort_preempted_request() -> None:
    engine = make_engine(make_profile(num_gpu_blocks=16, max_model_len=256, max_num_batched_tokens=512))
    a = make_request("a", 100, max_tokens=150, seed=1)
    b = make_request("b", 100, max_tokens=150, seed=2)
    engine.add_request(a, now=0.0)
    engine.add_request(b, now=0.0)
    d = Driver(engine)
    while b.status is not RequestStatus.PREEMPTED:
        assert d.step() is not None
    assert engine.abort("b", d.now) is True
    assert b.finish_reason is FinishReason.ABORT
    assert engine.num_waiting == 0
    d.run()
    assert a.finish_reason is FinishReason.LENGTH
    assert_kv_drained(engine)


def test_abort_unknown_request() -> None:
    assert make_engine().abort("ghost", 0.0) is False


# ------------------------------------------------------------------------------------------ prefix reuse


def test_second_request_reuses_shared_prefix_blocks() -> None:
    shared = prompt_tokens(512, seed=1)
    engine = make_engine(make_profile(max_num_batched_tokens=256))
    d = Driver(engine)
    a = make_request("a", [*shared, *prompt_tokens(40, seed=2)], max_tokens=2)
    engine.add_request(a, now=0.0)
    steps_a = d.run()
    ttft_a = (a.first_token_time or 0.0) - 0.0
    t_b = d.now
    b = make_request("b", [*shared, *prompt_tokens(45, seed=3)], max_tokens=2, arrival_time=t_b)
    engine.add_request(b, now=t_b)
    steps_b = d.run()
    ttft_b = (b.first_token_time or 0.0) - t_b
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 512
    assert b.num_computed_tokens >= 557

    def prefill_steps(steps: list[StepRecord], r: EngineRequest) -> int:
        return sum(1 for s in steps if r in s.step.plan.requests and s.step.plan.num_prefill_tokens)

    assert prefill_steps(steps_a, a) == 3
    assert prefill_steps(steps_b, b) == 1
    assert ttft_b < ttft_a
    stats = engine.kv.pool.stats
    assert stats.prefix_hit_tokens == 512
    assert stats.prefix_queries_tokens == 552 + 557


def test_prefix_shared_with_a_running_request() -> None:
    shared = prompt_tokens(96, seed=4)
    engine = make_engine()
    d = Driver(engine)
    a = make_request("a", [*shared, 7, 7, 7], max_tokens=30)
    engine.add_request(a, now=0.0)
    d.step()
    b = make_request("b", [*shared, 8, 8], max_tokens=3)
    engine.add_request(b, now=d.now)
    rec = d.step()
    assert rec is not None
    assert b.num_cached_tokens == 96
    assert rec.step.plan.num_new_tokens[-1] == 2
    shared_blocks = list(engine.kv.blocks_of("a"))[:6]
    assert list(engine.kv.blocks_of("b"))[:6] == shared_blocks
    assert all(engine.kv.pool.ref_count(blk) == 2 for blk in shared_blocks)
    d.run()
    assert_kv_drained(engine)


def test_identical_block_aligned_prompt_recomputes_last_block() -> None:
    toks = prompt_tokens(64, seed=5)
    engine = make_engine()
    d = Driver(engine)
    engine.add_request(make_request("a", toks, max_tokens=1), now=0.0)
    d.run()
    b = make_request("b", toks, max_tokens=1)
    engine.add_request(b, now=d.now)
    rec = d.step()
    assert rec is not None
    assert b.num_cached_tokens == 48
    assert rec.step.plan.num_new_tokens == [16]


def test_cache_salt_isolates_tenants() -> None:
    toks = prompt_tokens(80, seed=6)
    engine = make_engine()
    d = Driver(engine)
    engine.add_request(make_request("a", toks, max_tokens=1, cache_salt="t1"), now=0.0)
    d.run()
    other = make_request("b", toks, max_tokens=1, cache_salt="t2")
    plain = make_request("c", toks, max_tokens=1)
    same = make_request("d", toks, max_tokens=1, cache_salt="t1")
    for r in (other, plain, same):
        engine.add_request(r, now=d.now)
    d.run()
    assert other.num_cached_tokens == 0
    assert plain.num_cached_tokens == 0
    assert same.num_cached_tokens == 64


def test_engine_reset_prefix_cache() -> None:
    toks = prompt_tokens(64, seed=7)
    engine = make_engine()
    d = Driver(engine)
    engine.add_request(make_request("a", toks, max_tokens=3), now=0.0)
    d.step()
    assert engine.kv_usage == pytest.approx(4 / 64)  # the next token gets its slot when scheduled
    assert engine.reset_prefix_cache() is False
    d.run()
    assert engine.kv_usage == 0.0
    assert engine.reset_prefix_cache() is True
    b = make_request("b", toks, max_tokens=1)
    engine.add_request(b, now=d.now)
    d.run()
    assert b.num_cached_tokens == 0


# ------------------------------------------------------------------------------------------ timeline


def test_observer_timeline_matches_steps() -> None:
    rec = Recorder()
    engine = make_engine(make_profile(max_num_batched_tokens=256), observer=rec)
    a = make_request("a", 600, max_tokens=5)
    engine.add_request(a, now=0.0)
    d = Driver(engine)
    d.run()
    assert len(rec.steps) == engine.num_steps == len(d.history) == 3 + 4
    durations = [r.step.duration_s for r in d.history]
    # TTFT: the steps up to and including the last prefill chunk.
    assert rec.first_tokens["a"] == pytest.approx(sum(durations[:3]))
    assert a.first_scheduled_time == 0.0
    # ITLs: the durations of the decode steps.
    assert rec.itls["a"] == pytest.approx(durations[3:])
    assert rec.finished == {"a": FinishReason.LENGTH}
    assert a.finished_time == pytest.approx(sum(durations))
    assert a.last_token_time == a.finished_time


def _timeline(seed: int, jitter: float) -> list[tuple[float, list[int]]]:
    engine = make_engine(make_profile(jitter=jitter), seed=seed)
    rng = random.Random(5)
    for i in range(12):
        engine.add_request(make_request(f"r{i}", rng.randint(10, 300), max_tokens=rng.randint(1, 20)), now=0.0)
    d = Driver(engine)
    d.run()
    return [(r.step.duration_s, r.step.plan.num_new_tokens) for r in d.history]


def test_engine_is_deterministic_for_a_seed() -> None:
    assert _timeline(3, 0.05) == _timeline(3, 0.05)
    a, b = _timeline(3, 0.05), _timeline(4, 0.05)
    assert [x[1] for x in a] == [x[1] for x in b]  # same plans
    assert [x[0] for x in a] != [x[0] for x in b]  # different jitter
    assert _timeline(3, 0.0) == _timeline(4, 0.0)


def test_engine_set_policy() -> None:
    engine = make_engine(make_profile(max_num_seqs=1))
    for i, prio in enumerate([2, 0, 1]):
        engine.add_request(make_request(f"r{i}", 20, max_tokens=1, priority=prio, arrival_time=0.0), now=0.0)
    engine.set_policy(make_scheduling_policy("priority"))
    d = Driver(engine)
    order: list[str] = []
    while engine.has_work():
        rec = d.step()
        assert rec is not None
        order.extend(r.request_id for r in rec.step.plan.requests)
    assert order == ["r1", "r2", "r0"]


# ------------------------------------------------------------------------------------------ no leaks


def _random_request(
    rng: random.Random, rid: str, now: float, prefixes: list[list[int]], max_model_len: int, priority: bool
) -> EngineRequest:
    n = rng.randint(1, 150)
    prefix = rng.choice(prefixes) if rng.random() < 0.6 else []
    toks = prompt_tokens(n, seed=rng.randint(0, 10_000), prefix=prefix[:n])
    max_tokens = rng.randint(1, min(60, max_model_len - n))
    eos_after = rng.randint(1, 70) if rng.random() < 0.4 else None
    min_tokens = rng.randint(0, max_tokens) if rng.random() < 0.2 else 0
    return make_request(
        rid,
        toks,
        max_tokens=max_tokens,
        arrival_time=now,
        eos_after=eos_after,
        min_tokens=min_tokens,
        ignore_eos=rng.random() < 0.1,
        priority=rng.randint(0, 3) if priority else 0,
        cache_salt=rng.choice([None, None, None, "t"]),
        seed=rng.randint(0, 1_000_000),
    )


def _check_step_invariants(engine: EngineCore, plan: ScheduledStep) -> None:
    profile = engine.profile
    assert plan.num_tokens == sum(plan.num_new_tokens) <= profile.max_num_batched_tokens
    assert all(n >= 1 for n in plan.num_new_tokens)
    assert len(plan.requests) <= profile.max_num_seqs
    assert engine.num_running <= profile.max_num_seqs
    assert all(r.status is RequestStatus.RUNNING for r in plan.requests)
    pool = engine.kv.pool
    holders = [0] * pool.num_blocks
    for r in engine.scheduler.running:
        blocks = engine.kv.blocks_of(r.request_id)
        assert len(blocks) * BLOCK >= r.num_computed_tokens
        for b in blocks:
            holders[b] += 1
    assert engine.kv.num_requests == engine.num_running
    assert [pool.ref_count(b) for b in range(pool.num_blocks)] == holders
    assert pool.num_free_blocks == holders.count(0)


def _drive_random_load(
    seed: int, policy: str, num_requests: int
) -> tuple[dict[str, EngineRequest], set[str], Recorder]:
    rng = random.Random(seed)
    profile = make_profile(num_gpu_blocks=24, max_model_len=256, max_num_batched_tokens=128, max_num_seqs=8)
    rec = Recorder()
    engine = make_engine(profile, policy=policy, seed=seed, observer=rec)
    prefixes = [prompt_tokens(rng.randint(16, 120), seed=500 + k) for k in range(4)]
    now = 0.0
    submitted: dict[str, EngineRequest] = {}
    aborted: set[str] = set()
    idle = 0
    while len(submitted) < num_requests or engine.has_work():
        if len(submitted) < num_requests:
            for _ in range(rng.choice([0, 0, 1, 1, 2])):
                rid = f"q{len(submitted)}"
                r = _random_request(rng, rid, now, prefixes, profile.max_model_len, policy == "priority")
                engine.add_request(r, now)
                submitted[rid] = r
        if submitted and rng.random() < 0.03:
            rid = rng.choice(list(submitted))
            if engine.abort(rid, now):
                aborted.add(rid)
        step = engine.schedule(now)
        if step is None:
            idle += 1
            assert idle < 3 or not engine.has_work() or len(submitted) < num_requests
            now += 0.001
            continue
        idle = 0
        _check_step_invariants(engine, step.plan)
        if rng.random() < 0.02 and step.plan.requests:
            victim = rng.choice(step.plan.requests)
            assert engine.abort(victim.request_id, now)
            aborted.add(victim.request_id)
        now += step.duration_s
        engine.complete_step(step, now)
    assert_kv_drained(engine)
    return submitted, aborted, rec


@pytest.mark.parametrize(("seed", "policy"), [(1, "fcfs"), (2, "priority"), (3, "fcfs")])
def test_no_leak_under_random_load(seed: int, policy: str) -> None:
    submitted, aborted, rec = _drive_random_load(seed, policy, num_requests=1200)
    assert len(rec.preempted) > 20, "KV was not tight enough to exercise preemption"
    assert sum(r.num_preemptions for r in submitted.values()) == len(rec.preempted)
    assert any(r.num_cached_tokens > 0 for r in submitted.values())
    assert aborted
    assert set(rec.finished) == set(submitted)
    for rid, r in submitted.items():
        assert r.status is RequestStatus.FINISHED
        assert r.finished_time is not None
        expected = _expected_ids(r)
        if r.finish_reason is FinishReason.ABORT:
            assert rid in aborted
            assert r.output_token_ids == expected[: r.num_output_tokens]
            assert r.num_output_tokens <= len(expected)
        else:
            assert r.finish_reason is _expected_outcome(r.sampling)[0], rid
            assert r.output_token_ids == expected, rid
        if r.num_output_tokens:
            assert rec.first_tokens[rid] == r.first_token_time
            assert len(rec.itls.get(rid, [])) == r.num_output_tokens - 1


_request_spec = st.tuples(
    st.integers(1, 200),  # prompt length
    st.integers(0, 3),  # which shared prefix (3: none)
    st.integers(1, 50),  # max_tokens
    st.integers(0, 30),  # arrival step
    st.one_of(st.none(), st.integers(0, 40)),  # abort at step
    st.integers(0, 2),  # priority
)


@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(_request_spec, min_size=1, max_size=25), policy=st.sampled_from(["fcfs", "priority"]))
def test_no_leak_property(specs: list[tuple[int, int, int, int, int | None, int]], policy: str) -> None:
    profile = make_profile(num_gpu_blocks=18, max_model_len=256, max_num_batched_tokens=64, max_num_seqs=4)
    engine = make_engine(profile, policy=policy)
    prefixes = [prompt_tokens(64, seed=900 + k) for k in range(3)]
    reqs: list[tuple[EngineRequest, int, int | None]] = []
    for i, (n, pfx, max_tokens, arrive, abort_at, prio) in enumerate(specs):
        prefix = prefixes[pfx] if pfx < 3 else []
        toks = prompt_tokens(n, seed=i, prefix=prefix[:n])
        mt = min(max_tokens, profile.max_model_len - n)
        reqs.append((make_request(f"h{i}", toks, max_tokens=mt, priority=prio, seed=i), arrive, abort_at))
    now = 0.0
    step_no = 0
    while step_no < 10_000:
        for r, arrive, _ in reqs:
            if arrive == step_no:
                engine.add_request(r, now)
        for r, arrive, abort_at in reqs:
            if abort_at == step_no and arrive <= step_no:
                engine.abort(r.request_id, now)
        if step_no > 40 and not engine.has_work():
            break
        step = engine.schedule(now)
        step_no += 1
        if step is None:
            continue
        _check_step_invariants(engine, step.plan)
        now += step.duration_s
        engine.complete_step(step, now)
    assert_kv_drained(engine)
    for r, _, abort_at in reqs:
        assert r.status is RequestStatus.FINISHED
        if r.finish_reason is not FinishReason.ABORT:
            assert r.num_output_tokens == r.sampling.max_tokens
            assert r.output_token_ids == expected_tokens(r.seed, r.num_output_tokens)
        else:
            assert abort_at is not None
