"""LARRY-like memory-aware prioritisation (Kossmann et al., arXiv 2410.17840; papers.md §1.4).

The paper's exact rule is not published; this is the reconstruction documented in papers.md §1.4 and
docs/policies.md. Under low KV use the queue is FCFS. Above ``pressure`` KV use, waiting requests are
ordered by estimated KV demand (prompt + max_tokens) minus an ageing credit, so small requests go first
but old large ones are not starved; and admission stops when the head's demand would push KV use past
``watermark``, which is what keeps preemptions rare. Needs engine support (no vLLM equivalent).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from policies.scheduling.base import EngineSchedulingPolicy, R, RequestQueue, SchedulableRequest, SchedulingContext
from policies.scheduling.queues import FifoQueue


class _MemoryAwareQueue(FifoQueue):
    """FIFO storage; under pressure, :meth:`peek` scans for the best-ranked request (O(n), n = waiting)."""

    def __init__(self, policy: LarryPolicy) -> None:
        super().__init__()
        self._policy = policy

    def _best(self) -> SchedulableRequest:
        items = self._items
        if not items:
            raise IndexError("peek from an empty queue")
        p = self._policy
        if not p.under_pressure:
            return items[0]
        return min(items, key=p.rank)

    def peek(self) -> SchedulableRequest:
        return self._best()

    def pop(self) -> SchedulableRequest:
        best = self._best()
        self._items.remove(best)
        return best

    def __iter__(self) -> Iterator[SchedulableRequest]:
        return iter(list(self._items))


class LarryPolicy(EngineSchedulingPolicy):
    name = "larry"

    def __init__(self, pressure: float = 0.7, watermark: float = 0.95, aging_tokens_per_s: float = 2000.0) -> None:
        if not 0 <= pressure <= 1 or not 0 < watermark <= 1:
            raise ValueError("pressure and watermark are fractions of KV capacity")
        if aging_tokens_per_s < 0:
            raise ValueError("aging_tokens_per_s must be non-negative")
        self.pressure = pressure
        self.watermark = watermark
        self.aging = aging_tokens_per_s
        self.under_pressure = False
        self._now = 0.0

    def demand(self, request: SchedulableRequest) -> int:
        return request.num_prompt_tokens + request.max_tokens

    def rank(self, request: SchedulableRequest) -> float:
        return self.demand(request) - self.aging * max(0.0, self._now - request.arrival_time)

    def make_waiting_queue(self) -> RequestQueue[SchedulableRequest]:
        return _MemoryAwareQueue(self)

    def order_running(self, running: Sequence[R], ctx: SchedulingContext) -> Sequence[R]:
        self._now = ctx.now
        self.under_pressure = ctx.kv_usage >= self.pressure
        return running

    def admit(self, request: SchedulableRequest, ctx: SchedulingContext) -> bool:
        if not self.under_pressure:
            return True
        blocks = -(-self.demand(request) // ctx.block_size)
        used = ctx.num_total_blocks - ctx.num_free_blocks
        return used + blocks <= self.watermark * ctx.num_total_blocks

    def preemption_victim(self, running: Sequence[R], ctx: SchedulingContext) -> R:
        # Free the most memory per preemption: the largest request, newest first on ties.
        return max(reversed(running), key=lambda r: r.num_tokens)
