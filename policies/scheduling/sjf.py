"""Shortest job first: admit the waiting request with the shortest prompt (Sarathi/SLAI's SPF order)."""

from __future__ import annotations

from collections.abc import Sequence

from policies.scheduling.base import EngineSchedulingPolicy, R, RequestQueue, SchedulableRequest, SchedulingContext
from policies.scheduling.queues import KeyedQueue


def _shortest(request: SchedulableRequest) -> tuple[int, float]:
    return (request.num_prompt_tokens, request.arrival_time)


class SjfPolicy(EngineSchedulingPolicy):
    """Shortest prompt first, ties by arrival; preempts the most recently admitted request as vLLM does.

    Reaches a real vLLM through ``priority``: for a vLLM replica started with ``--scheduling-policy
    priority`` the router sets each request's ``priority`` to its prompt's token count (its estimate from
    the prompt's bytes). Short prompts can starve long ones under sustained load.
    """

    name = "sjf"
    reaches_vllm_via_priority = True

    def make_waiting_queue(self) -> RequestQueue[SchedulableRequest]:
        return KeyedQueue(_shortest)

    def preemption_victim(self, running: Sequence[R], ctx: SchedulingContext) -> R:
        return running[-1]
