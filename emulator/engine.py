"""The engine core: requests in, one iteration at a time, tokens out. No clock, no I/O.

A driver calls :meth:`EngineCore.schedule` to plan an iteration (which also says how long it takes
on the emulated GPU), waits that long in its own notion of time, then calls
:meth:`EngineCore.complete_step`, which samples one token for every sequence whose prompt is fully
computed. The live replica waits in wall-clock time; the simulator in virtual time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from emulator.kv_cache import KVCacheManager
from emulator.profiles import EngineProfile
from emulator.request import EngineRequest, FinishReason, RequestStatus
from emulator.scheduler import ScheduledStep, Scheduler
from emulator.step_time import StepTimeModel
from policies.scheduling.base import EngineSchedulingPolicy

#: Picks the id of the ``index``-th generated token of a request seeded with ``seed``.
TokenSource = Callable[[int, int], int]


class EngineObserver(Protocol):
    """Receives the engine's timeline; the metrics layer and the simulator's statistics implement it."""

    def on_step(self, step: ScheduledStep, duration_s: float, now: float) -> None: ...
    def on_first_token(self, request: EngineRequest, now: float) -> None: ...
    def on_token(self, request: EngineRequest, now: float, since_last_s: float) -> None: ...
    def on_preempted(self, request: EngineRequest) -> None: ...
    def on_finished(self, request: EngineRequest, now: float) -> None: ...
    def on_decode_span(self, span: DecodeSpan, steps: int) -> None: ...


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one iteration produced for one request."""

    request: EngineRequest
    new_token_id: int | None
    finish_reason: FinishReason | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class DecodeSpan:
    """Up to ``steps`` consecutive pure-decode steps of an unchanging batch, planned at once.

    Only the simulator uses spans: when nothing waits and every running request decodes, the batch
    stays the same until a request stops, KV runs out or something arrives, so its step times have a
    closed form (:meth:`StepTimeModel.decode_span_ms`) and the engine can skip ahead.
    """

    requests: tuple[EngineRequest, ...]
    start_time: float
    steps: int
    context_tokens: int  # C of the first step
    step_time: StepTimeModel

    @property
    def num_seqs(self) -> int:
        return len(self.requests)

    def elapsed_s(self, steps: int) -> float:
        """Duration of the first ``steps`` steps."""
        return self.step_time.decode_span_ms(self.num_seqs, self.context_tokens, steps) / 1000.0

    @property
    def end_time(self) -> float:
        return self.start_time + self.elapsed_s(self.steps)

    def steps_done_by(self, t: float) -> int:
        """How many steps have completed by time ``t``."""
        lo, hi = 0, self.steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.start_time + self.elapsed_s(mid) <= t:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def step_durations_s(self, first: int, count: int) -> list[float]:
        """Durations of steps ``first`` … ``first + count - 1`` (0-based)."""
        b = self.num_seqs
        base = self.step_time.decode_span_ms(b, self.context_tokens + first * b, 1)
        per_step_growth = self.step_time.decode_span_ms(b, b, 1) - self.step_time.decode_span_ms(b, 0, 1)
        return [(base + j * per_step_growth) / 1000.0 for j in range(count)]


@dataclass(frozen=True, slots=True)
class EngineStep:
    """A planned iteration and how long it takes on the emulated hardware."""

    plan: ScheduledStep
    duration_s: float
    start_time: float


class EngineCore:
    """One emulated replica's engine: scheduler, KV cache manager and step-time model."""

    def __init__(
        self,
        profile: EngineProfile,
        policy: EngineSchedulingPolicy,
        token_source: TokenSource,
        eos_token_id: int,
        observer: EngineObserver | None = None,
        seed: int = 0,
    ) -> None:
        if profile.max_model_len > profile.kv_capacity_tokens:
            raise ValueError(
                f"profile {profile.name}: max_model_len {profile.max_model_len} exceeds the KV capacity "
                f"of {profile.kv_capacity_tokens} tokens; a maximal request could never run"
            )
        self.profile = profile
        self.kv = KVCacheManager(profile.num_gpu_blocks, profile.block_size)
        self.scheduler = Scheduler(
            self.kv,
            policy,
            profile.max_num_batched_tokens,
            profile.max_num_seqs,
            on_preempt=self._on_preempt,
            chunked_prefill=profile.enable_chunked_prefill,
        )
        self.step_time = StepTimeModel(profile.step_time, profile.jitter, seed)
        self._token_source = token_source
        self._eos = eos_token_id
        self._observer = observer
        self._requests: dict[str, EngineRequest] = {}
        self._in_flight: EngineStep | None = None
        self._pending_aborts: list[EngineRequest] = []
        self.num_preemptions = 0
        self.num_steps = 0

    # ------------------------------------------------------------------ requests in and out
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def get(self, request_id: str) -> EngineRequest | None:
        return self._requests.get(request_id)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError, with vLLM's wording, when a request cannot fit the context window."""
        limit = self.profile.max_model_len
        if num_prompt_tokens + max_tokens > limit:
            raise ValueError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion."
            )

    def add_request(self, request: EngineRequest, now: float) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.block_size != self.profile.block_size:
            raise ValueError("request block size differs from the engine's")
        self.check_fits(request.num_prompt_tokens, request.sampling.max_tokens)
        self._requests[request.request_id] = request
        self.scheduler.add(request, now)

    def abort(self, request_id: str, now: float) -> bool:
        """Abort a request. During an in-flight step it takes effect when the step completes."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        if self._in_flight is not None:
            self._pending_aborts.append(request)
        else:
            self._finish(request, FinishReason.ABORT, now)
        return True

    def set_policy(self, policy: EngineSchedulingPolicy) -> None:
        self.scheduler.set_policy(policy)

    # ------------------------------------------------------------------ iterations
    def schedule(self, now: float) -> EngineStep | None:
        """Plan the next iteration; None when there is nothing to compute."""
        if self._in_flight is not None:
            raise RuntimeError("the previous step has not completed")
        plan = self.scheduler.schedule(now)
        if not plan.requests:
            return None
        duration_s = self.step_time.step_ms(plan.shape) / 1000.0
        step = EngineStep(plan=plan, duration_s=duration_s, start_time=now)
        self._in_flight = step
        self.num_steps += 1
        if self._observer is not None:
            self._observer.on_step(plan, duration_s, now)
        return step

    def complete_step(self, step: EngineStep, now: float) -> list[RequestOutput]:
        """Apply an iteration's results: advance KV progress, sample tokens, finish requests."""
        if step is not self._in_flight:
            raise RuntimeError("completing a step that is not in flight")
        self._in_flight = None
        outputs: list[RequestOutput] = []
        observer = self._observer
        plan = step.plan
        for request, num_new in zip(plan.requests, plan.num_new_tokens, strict=True):
            if request.status is not RequestStatus.RUNNING:
                continue  # finished by an abort processed below, or preempted after planning
            request.num_computed_tokens += num_new
            if request.num_computed_tokens < request.num_tokens:
                continue  # a prefill chunk that does not complete the prompt yields no token
            token = self._sample(request)
            request.append_output_token(token)
            if request.first_token_time is None:
                request.first_token_time = now
                if observer is not None:
                    observer.on_first_token(request, now)
            elif observer is not None and request.last_token_time is not None:
                observer.on_token(request, now, now - request.last_token_time)
            request.last_token_time = now
            reason = request.stop_reason_after_token()
            if reason is not None:
                self._finish(request, reason, now)
            outputs.append(RequestOutput(request, token, reason))
        for request in self._pending_aborts:
            if not request.is_finished:
                self._finish(request, FinishReason.ABORT, now)
        self._pending_aborts.clear()
        return outputs

    # ------------------------------------------------------------------ decode spans (simulator)
    def plan_decode_span(self, now: float, max_steps: int) -> DecodeSpan | None:
        """Plan several decode steps at once when the batch cannot change (see :class:`DecodeSpan`).

        None when any step could differ from the previous one: something waits, a request is still
        prefilling, the policy reorders decodes, the batch exceeds the token budget, or fewer than two
        steps fit before a request stops or KV runs out. Also None when a running request got no token
        at ``now`` (decodes stalled by a prefill-only step): its next gap is longer than a step, and a
        span reports every gap as a step's duration.
        """
        sched = self.scheduler
        running = sched.running
        if self._in_flight is not None or not running or sched.waiting or max_steps < 2:
            return None
        if not sched.policy.stable_decode_batches:
            return None
        if len(running) > sched.policy.token_budget(sched.max_num_batched_tokens):
            return None
        steps = max_steps
        context = 0
        for r in running:
            if r.num_tokens - r.num_computed_tokens != 1 or r.last_token_time != now:
                return None
            steps = min(steps, r.tokens_until_stop())
            context += r.num_computed_tokens + 1
        steps = min(steps, self._kv_limited_steps(running, steps))
        if steps < 2:
            return None
        return DecodeSpan(tuple(running), now, steps, context, self.step_time)

    def _kv_limited_steps(self, running: list[EngineRequest], upper: int) -> int:
        """The most decode steps (≤ ``upper``) whose new KV blocks the free queue can supply."""
        bs = self.kv.block_size
        free = self.kv.pool.num_free_blocks
        slack = [len(self.kv.blocks_of(r.request_id)) * bs - r.num_computed_tokens for r in running]

        def blocks_needed(k: int) -> int:
            return sum(-(-(k - s) // bs) for s in slack if k > s)

        if blocks_needed(upper) <= free:
            return upper
        lo, hi = 0, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if blocks_needed(mid) <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def commit_decode_span(self, span: DecodeSpan, steps: int) -> list[RequestOutput]:
        """Apply the first ``steps`` steps of ``span``; returns the requests that finished."""
        if not 0 < steps <= span.steps:
            raise ValueError("steps must be within the span")
        end = span.start_time + span.elapsed_s(steps)
        outputs: list[RequestOutput] = []
        self.num_steps += steps
        for r in span.requests:
            if r.status is not RequestStatus.RUNNING:
                raise RuntimeError("a request left the batch during a decode span")
            if not self.kv.allocate_slots(r, steps):
                raise RuntimeError("decode span ran out of KV blocks it had reserved")
            r.num_computed_tokens += steps
            if r.prompt_token_ids is None:
                r.append_opaque_tokens(steps)
            else:
                for _ in range(steps):
                    r.append_output_token(self._sample(r))
            r.last_token_time = end
            reason = r.stop_reason_after_token()
            if reason is not None:
                self._finish(r, reason, end)
                outputs.append(RequestOutput(r, None, reason))
        if self._observer is not None:
            self._observer.on_decode_span(span, steps)
        return outputs

    def _sample(self, request: EngineRequest) -> int:
        s = request.sampling
        n_next = request.num_output_tokens + 1
        if not s.ignore_eos and s.eos_after is not None and n_next >= max(s.eos_after, s.min_tokens):
            return self._eos
        return self._token_source(request.seed, request.num_output_tokens)

    def _finish(self, request: EngineRequest, reason: FinishReason, now: float) -> None:
        self.scheduler.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finished_time = now
        del self._requests[request.request_id]
        self.scheduler.policy.on_finished(request, now)
        if self._observer is not None:
            self._observer.on_finished(request, now)

    def _on_preempt(self, request: EngineRequest) -> None:
        self.num_preemptions += 1
        if self._observer is not None:
            self._observer.on_preempted(request)

    # ------------------------------------------------------------------ introspection
    @property
    def kv_usage(self) -> float:
        return self.kv.pool.usage

    def reset_prefix_cache(self) -> bool:
        return self.kv.pool.reset_prefix_cache()
