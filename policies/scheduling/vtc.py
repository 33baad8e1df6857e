"""Virtual Token Counter fair scheduling (Sheng et al., OSDI'24; papers.md §3).

Each tenant has a counter of the service it received: input tokens weigh 1, output tokens 2. The
waiting request of the tenant with the smallest counter is admitted next (FIFO within a tenant). When a
tenant's queue goes from empty to non-empty its counter is lifted to the smallest counter among tenants
with queued work, so idle time cannot be hoarded as credit. Needs engine support: a vLLM replica cannot
run it through ``priority`` alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

from policies.scheduling.base import EngineSchedulingPolicy, R, RequestQueue, SchedulableRequest, SchedulingContext


class _TenantQueues(RequestQueue[SchedulableRequest]):
    def __init__(self, policy: VtcPolicy) -> None:
        self._policy = policy
        self._queues: dict[str, deque[SchedulableRequest]] = {}
        self._size = 0

    def _enqueue(self, request: SchedulableRequest, front: bool) -> None:
        q = self._queues.get(request.tenant)
        if q is None:
            q = self._queues[request.tenant] = deque()
        if not q:
            self._policy.lift(request.tenant, (t for t, other in self._queues.items() if other))
        if front:
            q.appendleft(request)
        else:
            q.append(request)
        self._size += 1

    def add(self, request: SchedulableRequest) -> None:
        self._enqueue(request, front=False)

    def prepend(self, request: SchedulableRequest) -> None:
        self._enqueue(request, front=True)

    def _tenant(self) -> str:
        counters = self._policy.counters
        best = min((t for t, q in self._queues.items() if q), key=lambda t: (counters.get(t, 0.0), t), default=None)
        if best is None:
            raise IndexError("peek from an empty queue")
        return best

    def peek(self) -> SchedulableRequest:
        return self._queues[self._tenant()][0]

    def pop(self) -> SchedulableRequest:
        tenant = self._tenant()
        self._size -= 1
        return self._queues[tenant].popleft()

    def remove(self, request: SchedulableRequest) -> None:
        q = self._queues.get(request.tenant)
        if q is None:
            raise ValueError(f"request {request.request_id} is not queued")
        q.remove(request)
        self._size -= 1

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[SchedulableRequest]:
        for q in self._queues.values():
            yield from q


class VtcPolicy(EngineSchedulingPolicy):
    name = "vtc"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        if input_weight < 0 or output_weight < 0:
            raise ValueError("VTC weights must be non-negative")
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = {}

    def lift(self, tenant: str, active_tenants: Iterator[str]) -> None:
        others = [self.counters.get(t, 0.0) for t in active_tenants if t != tenant]
        current = self.counters.get(tenant, 0.0)
        self.counters[tenant] = max(current, min(others)) if others else current

    def make_waiting_queue(self) -> RequestQueue[SchedulableRequest]:
        return _TenantQueues(self)

    def on_scheduled(self, request: SchedulableRequest, num_new_tokens: int, is_prefill: bool) -> None:
        weight = self.input_weight if is_prefill else self.output_weight
        self.counters[request.tenant] = self.counters.get(request.tenant, 0.0) + weight * num_new_tokens

    def preemption_victim(self, running: Sequence[R], ctx: SchedulingContext) -> R:
        # The most-served tenant gives back first; within it, its newest request.
        counters = self.counters
        return max(reversed(running), key=lambda r: counters.get(r.tenant, 0.0))
