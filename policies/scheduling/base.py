"""The contract between an engine's continuous-batching loop and its scheduling policy.

The engine loop (``emulator.scheduler``) owns the mechanics that every vLLM-style engine shares:
the per-step token budget, chunked prefill, KV allocation and preemption by recompute. A policy only
decides *order*: which waiting request is admitted next, in which order running requests claim the
step's token budget, and which running request is preempted when KV runs out. This mirrors vLLM V1,
where ``--scheduling-policy`` swaps the waiting queue implementation and the preemption victim rule
while the rest of the scheduler stays the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar


class SchedulableRequest(Protocol):
    """What a policy may read of a request. Policies never mutate requests."""

    @property
    def request_id(self) -> str: ...
    @property
    def arrival_time(self) -> float: ...
    @property
    def priority(self) -> int: ...
    @property
    def tenant(self) -> str: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_computed_tokens(self) -> int: ...
    @property
    def num_output_tokens(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def last_token_time(self) -> float | None: ...


R = TypeVar("R", bound=SchedulableRequest)
T = TypeVar("T", bound=SchedulableRequest)


@dataclass(frozen=True, slots=True)
class SchedulingContext:
    """Engine state a policy may consult when it orders work for one step."""

    now: float
    token_budget: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, the same figure vLLM exports as ``kv_cache_usage_perc``."""
        return 1.0 - self.num_free_blocks / self.num_total_blocks if self.num_total_blocks else 0.0


class RequestQueue(ABC, Generic[T]):
    """The waiting queue. Its order *is* the admission policy (as in vLLM V1's request queues)."""

    @abstractmethod
    def add(self, request: T) -> None:
        """Enqueue a newly arrived request."""

    @abstractmethod
    def prepend(self, request: T) -> None:
        """Re-enqueue a preempted request so it is reconsidered before new arrivals of equal rank."""

    @abstractmethod
    def peek(self) -> T:
        """The request to admit next. Raises IndexError when empty."""

    @abstractmethod
    def pop(self) -> T:
        """Remove and return the request :meth:`peek` would return."""

    @abstractmethod
    def remove(self, request: T) -> None:
        """Remove a specific request (abort). Raises ValueError if absent."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[T]: ...

    def __bool__(self) -> bool:
        return len(self) > 0


class EngineSchedulingPolicy(ABC):
    """Ordering decisions of one engine replica; one instance per engine (it may keep state)."""

    name: ClassVar[str]
    #: Whether a vLLM replica can run this policy natively through the per-request ``priority``
    #: field (``--scheduling-policy priority``). Policies that need engine support say False.
    reaches_vllm_via_priority: ClassVar[bool] = False
    #: Whether a batch of running decodes, with nothing waiting, stays the same step after step. The
    #: simulator may then advance such a batch many steps at once; policies that defer or reorder running
    #: decodes over time (e.g. deadline-aware ones) must say False.
    stable_decode_batches: ClassVar[bool] = True

    def token_budget(self, engine_budget: int) -> int:
        """The per-step token budget under this policy (most keep the engine's)."""
        return engine_budget

    @abstractmethod
    def make_waiting_queue(self) -> RequestQueue[SchedulableRequest]:
        """A fresh, empty waiting queue whose order implements this policy's admission rule."""

    def order_running(self, running: Sequence[R], ctx: SchedulingContext) -> Sequence[R]:
        """The order in which running requests claim the step's budget (default: admission order).

        A policy may return a subset: the rest are *deferred* and offered the budget left after new
        requests were admitted, in the order :meth:`order_deferred` gives.
        """
        return running

    def order_deferred(self, deferred: Sequence[R], ctx: SchedulingContext) -> Sequence[R]:
        """The order of running requests that :meth:`order_running` left out (default: as given)."""
        return deferred

    def admit(self, request: SchedulableRequest, ctx: SchedulingContext) -> bool:
        """Whether the head of the waiting queue may be admitted now (a veto stops admission this step)."""
        return True

    def on_step(self, now: float) -> None:
        """Hook: the engine is planning a step at ``now``."""

    @abstractmethod
    def preemption_victim(self, running: Sequence[R], ctx: SchedulingContext) -> R:
        """Which running request to preempt (by recompute) when KV blocks run out."""

    def on_arrival(self, request: SchedulableRequest, now: float) -> None:
        """Hook: a request entered the engine (before it is queued)."""

    def on_scheduled(self, request: SchedulableRequest, num_new_tokens: int, is_prefill: bool) -> None:
        """Hook: ``num_new_tokens`` of ``request`` were scheduled in the current step."""

    def on_finished(self, request: SchedulableRequest, now: float) -> None:
        """Hook: a request finished or was aborted."""
