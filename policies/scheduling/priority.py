"""vLLM's ``--scheduling-policy priority``: lower ``priority`` value first, then earlier arrival."""

from __future__ import annotations

from collections.abc import Sequence

from policies.scheduling.base import (
    EngineSchedulingPolicy,
    R,
    RequestQueue,
    SchedulableRequest,
    SchedulingContext,
)
from policies.scheduling.queues import KeyedQueue


def _rank(request: SchedulableRequest) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


class PriorityPolicy(EngineSchedulingPolicy):
    """Admit by ``(priority, arrival_time)``; preempt the running request that ranks last.

    This is vLLM V1's rule: the waiting queue is a heap on ``(priority, arrival_time)`` and the
    preemption victim is ``max(running, key=(priority, arrival_time))``.
    """

    name = "priority"
    reaches_vllm_via_priority = True

    def make_waiting_queue(self) -> RequestQueue[SchedulableRequest]:
        return KeyedQueue(_rank)

    def preemption_victim(self, running: Sequence[R], ctx: SchedulingContext) -> R:
        return max(running, key=_rank)
