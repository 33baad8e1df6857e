"""SLAI (Bari, Hegde, de Veciana, arXiv 2508.01002; agrimUT/SLAI ``slai_scheduler.py``; papers.md §2).

Decodes are deferred until close to their time-between-tokens deadline: each decoding request's
latest schedulable time is ``last token + tbt_s − offset · mean step duration``. A step serves, in
order: decodes past that time, partially prefilled requests (FIFO), new requests shortest prompt first,
then the remaining decodes while budget lasts; the budget is 512 tokens. The offset grows from 5 to 10
mean steps when KV use passes ``memory_limit``, so decodes finish sooner and free memory. Needs engine
support; a vLLM replica can only approximate its admission order through ``priority`` (sjf).
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.scheduling.base import EngineSchedulingPolicy, R, RequestQueue, SchedulableRequest, SchedulingContext
from policies.scheduling.queues import KeyedQueue


def _shortest(request: SchedulableRequest) -> tuple[int, float]:
    return (request.num_prompt_tokens, request.arrival_time)


class SlaiPolicy(EngineSchedulingPolicy):
    name = "slai"
    stable_decode_batches = False  # decodes are deferred step by step

    def __init__(
        self,
        token_budget: int = 512,
        tbt_s: float = 0.2,
        offset_below: float = 5.0,
        offset_above: float = 10.0,
        memory_limit: float = 0.96,
    ) -> None:
        if token_budget < 1 or tbt_s < 0:
            raise ValueError("token_budget must be positive and tbt_s non-negative")
        self.budget = token_budget
        self.tbt_s = tbt_s
        self.offset_below = offset_below
        self.offset_above = offset_above
        self.memory_limit = memory_limit
        self._last_step: float | None = None
        self.mean_step_s = 0.0
        self._steps = 0

    def token_budget(self, engine_budget: int) -> int:
        return self.budget

    def on_step(self, now: float) -> None:
        if self._last_step is not None and now > self._last_step:
            self._steps += 1
            self.mean_step_s += (now - self._last_step - self.mean_step_s) / self._steps
        self._last_step = now

    def make_waiting_queue(self) -> RequestQueue[SchedulableRequest]:
        return KeyedQueue(_shortest)

    def latest_schedulable_time(self, request: SchedulableRequest, ctx: SchedulingContext) -> float:
        offset = self.offset_above if ctx.kv_usage >= self.memory_limit else self.offset_below
        last = request.last_token_time if request.last_token_time is not None else ctx.now
        return last + self.tbt_s - offset * self.mean_step_s

    def order_running(self, running: Sequence[R], ctx: SchedulingContext) -> Sequence[R]:
        decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        prefilling = [r for r in running if r.num_tokens - r.num_computed_tokens > 1]
        critical = sorted(
            (r for r in decoding if ctx.now >= self.latest_schedulable_time(r, ctx)),
            key=lambda r: (self.latest_schedulable_time(r, ctx), r.arrival_time),
        )
        return [*critical, *prefilling]

    def order_deferred(self, deferred: Sequence[R], ctx: SchedulingContext) -> Sequence[R]:
        return sorted(deferred, key=lambda r: (self.latest_schedulable_time(r, ctx), r.arrival_time))

    def preemption_victim(self, running: Sequence[R], ctx: SchedulingContext) -> R:
        # The newest partially prefilled request gives way first; otherwise the newest request.
        for r in reversed(running):
            if r.num_tokens - r.num_computed_tokens > 1:
                return r
        return running[-1]
