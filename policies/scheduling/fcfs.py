"""First come, first served: vLLM V1's default ``--scheduling-policy fcfs``."""

from __future__ import annotations

from collections.abc import Sequence

from policies.scheduling.base import (
    EngineSchedulingPolicy,
    R,
    RequestQueue,
    SchedulableRequest,
    SchedulingContext,
)
from policies.scheduling.queues import FifoQueue


class FcfsPolicy(EngineSchedulingPolicy):
    """Admit in arrival order; under KV pressure preempt the most recently admitted request."""

    name = "fcfs"
    reaches_vllm_via_priority = True  # it is vLLM's own default; nothing to send

    def make_waiting_queue(self) -> RequestQueue[SchedulableRequest]:
        return FifoQueue()

    def preemption_victim(self, running: Sequence[R], ctx: SchedulingContext) -> R:
        return running[-1]
