"""Shared builders for the engine-model tests: small profiles, deterministic prompts, a step driver."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from emulator.engine import EngineCore, EngineStep, RequestOutput
from emulator.profiles import EngineProfile, StepTimeCoefficients, load_profile
from emulator.request import EngineRequest, SamplingParams
from policies.scheduling import EngineSchedulingPolicy, make_scheduling_policy

EOS = 2
BLOCK = 16


def token_source(seed: int, i: int) -> int:
    """The generated token ids: never the EOS id."""
    return 1000 + (seed * 7919 + i) % 30000


def expected_tokens(seed: int, n: int) -> list[int]:
    return [token_source(seed, i) for i in range(n)]


def h100_coefficients() -> StepTimeCoefficients:
    return load_profile("h100-llama3-8b").step_time


def make_profile(
    *,
    num_gpu_blocks: int = 64,
    block_size: int = BLOCK,
    max_num_batched_tokens: int = 256,
    max_num_seqs: int = 16,
    max_model_len: int = 1024,
    jitter: float = 0.0,
    name: str = "tiny-test",
) -> EngineProfile:
    return EngineProfile(
        name=name,
        model="test/tiny",
        max_model_len=max_model_len,
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        step_time=h100_coefficients(),
        jitter=jitter,
    )


def make_engine(
    profile: EngineProfile | None = None,
    policy: str | EngineSchedulingPolicy = "fcfs",
    seed: int = 0,
    observer: object | None = None,
) -> EngineCore:
    pol = make_scheduling_policy(policy) if isinstance(policy, str) else policy
    return EngineCore(
        profile or make_profile(),
        pol,
        token_source,
        eos_token_id=EOS,
        observer=observer,  # type: ignore[arg-type]
        seed=seed,
    )


def prompt_tokens(n: int, seed: int = 0, prefix: Sequence[int] = ()) -> list[int]:
    """``n`` prompt token ids: ``prefix`` followed by ids derived from ``seed`` (never EOS)."""
    body = [10_000 + (seed * 104_729 + 31 * i) % 50_000 for i in range(n - len(prefix))]
    return [*prefix, *body][:n]


def make_request(
    request_id: str,
    prompt: Sequence[int] | int,
    max_tokens: int = 8,
    *,
    arrival_time: float = 0.0,
    block_size: int = BLOCK,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    eos_after: int | None = None,
    priority: int = 0,
    cache_salt: str | None = None,
    seed: int | None = None,
) -> EngineRequest:
    """A request; ``prompt`` may be a token list or a length (tokens derived from the id)."""
    if isinstance(prompt, int):
        prompt = prompt_tokens(prompt, seed=zlib.crc32(request_id.encode()) % 1000 + 1)
    return EngineRequest(
        request_id=request_id,
        num_prompt_tokens=len(prompt),
        sampling=SamplingParams(
            max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=ignore_eos, eos_after=eos_after
        ),
        arrival_time=arrival_time,
        block_size=block_size,
        prompt_token_ids=list(prompt),
        priority=priority,
        cache_salt=cache_salt,
        seed=seed if seed is not None else zlib.crc32(request_id.encode()) % 10_000,
    )


@dataclass
class StepRecord:
    step: EngineStep
    outputs: list[RequestOutput]
    start: float
    end: float


@dataclass
class Driver:
    """Drives an engine in virtual time: schedule, advance by the step's duration, complete."""

    engine: EngineCore
    now: float = 0.0
    history: list[StepRecord] = field(default_factory=list)

    def step(self) -> StepRecord | None:
        step = self.engine.schedule(self.now)
        if step is None:
            return None
        start = self.now
        self.now += step.duration_s
        outputs = self.engine.complete_step(step, self.now)
        rec = StepRecord(step, outputs, start, self.now)
        self.history.append(rec)
        return rec

    def run(self, max_steps: int = 100_000) -> list[StepRecord]:
        """Step until the engine has no work; returns the records of these steps."""
        first = len(self.history)
        idle = 0
        for _ in range(max_steps):
            if not self.engine.has_work():
                break
            if self.step() is None:
                # A step can come out empty when the first running request preempted itself
                # (vLLM runs an empty iteration then); the next plan must make progress.
                idle += 1
                if idle > 1:
                    raise AssertionError("engine has work but schedules nothing")
            else:
                idle = 0
        else:
            raise AssertionError("engine did not drain")
        return self.history[first:]


def assert_kv_drained(engine: EngineCore) -> None:
    """Every block free, no request holding blocks, every reference count zero."""
    pool = engine.kv.pool
    assert engine.kv.num_requests == 0
    assert pool.num_free_blocks == pool.num_blocks
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))
    assert engine.num_unfinished == 0
    assert engine.num_running == 0
    assert engine.num_waiting == 0
