"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

One call to :meth:`Scheduler.schedule` plans one engine iteration, the way vLLM V1's scheduler does:

1. Running requests claim the budget first (a decode needs one token, an unfinished prefill its
   next chunk). When KV blocks run out, the policy's victim is preempted: its blocks are freed, its
   progress reset to zero, and it goes back to the front of the waiting queue; it recomputes later,
   finding whatever of its prefix is still cached.
2. If nothing was preempted, waiting requests are admitted in the policy's order while budget,
   sequence slots and KV blocks last. A new request first looks up its cached prefix; only the rest is
   scheduled, chunked to the remaining budget. Admission stops at the first request that does not fit.

With ``chunked_prefill=False`` the engine is vLLM V0's prefill-prioritising scheduler instead, the
baseline Sarathi-Serve measures against: a step admits whole prompts only and, if it admitted any, runs
no decodes (they stall until the waiting queue cannot be admitted); otherwise it is a decode step.

The policy (``policies.scheduling``) decides order only; the mechanics above are the engine's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from emulator.kv_cache import KVCacheManager
from emulator.request import EngineRequest, RequestStatus
from emulator.step_time import BatchShape, prefill_attention_units
from policies.scheduling.base import EngineSchedulingPolicy, RequestQueue, SchedulingContext


@dataclass(slots=True)
class ScheduledStep:
    """The plan of one iteration: which requests compute how many tokens."""

    requests: list[EngineRequest] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[EngineRequest] = field(default_factory=list)
    num_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_seqs: int = 0
    context_tokens: int = 0
    prefill_attention_units: float = 0.0

    @property
    def shape(self) -> BatchShape:
        return BatchShape(
            num_tokens=self.num_tokens,
            num_seqs=len(self.requests),
            context_tokens=self.context_tokens,
            prefill_attention_units=self.prefill_attention_units,
        )

    def add(self, request: EngineRequest, num_new: int) -> None:
        computed = request.num_computed_tokens
        self.requests.append(request)
        self.num_new_tokens.append(num_new)
        self.num_tokens += num_new
        self.context_tokens += computed + num_new
        if request.num_tokens - computed > 1:
            self.num_prefill_tokens += num_new
            self.prefill_attention_units += prefill_attention_units(computed, num_new)
        else:
            self.num_decode_seqs += 1

    def remove(self, request: EngineRequest) -> int:
        """Drop a request planned earlier in this step (it was preempted); returns its token count."""
        i = self.requests.index(request)
        num_new = self.num_new_tokens[i]
        computed = request.num_computed_tokens
        del self.requests[i]
        del self.num_new_tokens[i]
        self.num_tokens -= num_new
        self.context_tokens -= computed + num_new
        if request.num_tokens - computed > 1:
            self.num_prefill_tokens -= num_new
            self.prefill_attention_units -= prefill_attention_units(computed, num_new)
        else:
            self.num_decode_seqs -= 1
        return num_new


class Scheduler:
    """Owns the waiting queue and the running list of one engine."""

    def __init__(
        self,
        kv: KVCacheManager,
        policy: EngineSchedulingPolicy,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        on_preempt: Callable[[EngineRequest], None] | None = None,
        chunked_prefill: bool = True,
    ) -> None:
        self.kv = kv
        self.chunked_prefill = chunked_prefill
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.running: list[EngineRequest] = []
        self._policy = policy
        self.waiting: RequestQueue[EngineRequest] = policy.make_waiting_queue()  # type: ignore[assignment]
        self._on_preempt = on_preempt

    @property
    def policy(self) -> EngineSchedulingPolicy:
        return self._policy

    def set_policy(self, policy: EngineSchedulingPolicy) -> None:
        """Switch policy at run time: waiting requests are re-queued in the new policy's order."""
        queue: RequestQueue[EngineRequest] = policy.make_waiting_queue()  # type: ignore[assignment]
        for request in self.waiting:
            queue.add(request)
        self._policy = policy
        self.waiting = queue

    def add(self, request: EngineRequest, now: float) -> None:
        self._policy.on_arrival(request, now)
        self.waiting.add(request)

    def remove(self, request: EngineRequest) -> None:
        """Take a request out of the engine (finished or aborted) and release its KV."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        self.kv.free(request)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def _context(self, now: float, budget: int) -> SchedulingContext:
        pool = self.kv.pool
        return SchedulingContext(
            now=now,
            token_budget=budget,
            num_free_blocks=pool.num_free_blocks,
            num_total_blocks=pool.num_blocks,
            block_size=self.kv.block_size,
        )

    def _preempt(self, victim: EngineRequest, step: ScheduledStep) -> int:
        """Preempt ``victim``; returns the budget it gives back if it was already planned this step."""
        refund = step.remove(victim) if victim in step.requests else 0
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.waiting.prepend(victim)
        step.preempted.append(victim)
        if self._on_preempt is not None:
            self._on_preempt(victim)
        return refund

    def _schedule_running(
        self, request: EngineRequest, budget: int, step: ScheduledStep, now: float
    ) -> tuple[int, bool]:
        """Give a running request its next tokens; returns (budget left, whether to keep going)."""
        policy = self._policy
        num_new = min(request.num_tokens - request.num_computed_tokens, budget)
        if num_new <= 0:
            return budget, True
        while not self.kv.allocate_slots(request, num_new):
            victim = policy.preemption_victim(self.running, self._context(now, budget))
            budget += self._preempt(victim, step)
            if victim is request:
                # The request preempted itself: nothing more can be scheduled from the running list.
                return budget, False
        step.add(request, num_new)
        policy.on_scheduled(request, num_new, request.is_prefilling)
        return budget - num_new, True

    def _admit_waiting(self, now: float, budget: int, step: ScheduledStep, whole_prompts: bool = False) -> int:
        """Admit waiting requests in the policy's order; returns the budget left.

        ``whole_prompts``: a prompt is never chunked; one that exceeds what is left of the budget stops
        admission, except as the step's first request (so an over-long prompt cannot block the engine).
        """
        policy = self._policy
        kv = self.kv
        waiting = self.waiting
        while waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = waiting.peek()
            if not policy.admit(request, self._context(now, budget)):
                break
            cached: list[int] = []
            if request.num_computed_tokens == 0:
                cached = kv.find_cached_prefix(request)
            num_cached_tokens = len(cached) * kv.block_size
            num_new = request.num_tokens - num_cached_tokens
            if whole_prompts and num_new > budget and step.requests:
                break
            if not whole_prompts:
                num_new = min(num_new, budget)
            if not kv.allocate_slots(request, num_new, cached):
                break
            waiting.pop()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached_tokens
                kv.record_prefix_query(request.num_tokens, num_cached_tokens)
                request.first_scheduled_time = now
            request.num_computed_tokens = num_cached_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            step.add(request, num_new)
            policy.on_scheduled(request, num_new, True)
            budget -= num_new
        return budget

    def schedule(self, now: float) -> ScheduledStep:
        policy = self._policy
        policy.on_step(now)
        budget = policy.token_budget(self.max_num_batched_tokens)
        step = ScheduledStep()
        if not self.chunked_prefill:
            # Prefill-prioritising (vLLM V0): a step that admits whole prompts runs nothing else.
            self._admit_waiting(now, budget, step, whole_prompts=True)
            if step.requests:
                return step

        # 1. Running requests first (those the policy does not defer).
        ordered = list(policy.order_running(self.running, self._context(now, budget)))
        keep_going = True
        for request in ordered:
            if budget <= 0 or not keep_going:
                break
            if request.status is RequestStatus.RUNNING:
                budget, keep_going = self._schedule_running(request, budget, step, now)

        # 2. Admit waiting requests, unless this step had to preempt (KV is tight).
        if not step.preempted and self.chunked_prefill:
            budget = self._admit_waiting(now, budget, step)

        # 3. Deferred running requests take what budget is left.
        if len(ordered) < len(self.running) and keep_going and budget > 0:
            seen = {id(r) for r in ordered} | {id(r) for r in step.requests}
            deferred = [r for r in self.running if id(r) not in seen]
            for request in policy.order_deferred(deferred, self._context(now, budget)):
                if budget <= 0:
                    break
                if request.status is RequestStatus.RUNNING:
                    budget, keep_going = self._schedule_running(request, budget, step, now)
                    if not keep_going:
                        break
        return step
