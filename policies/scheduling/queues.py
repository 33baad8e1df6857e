"""Reusable waiting-queue implementations: arrival order and keyed (heap) order."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from policies.scheduling.base import RequestQueue, SchedulableRequest


class FifoQueue(RequestQueue[SchedulableRequest]):
    """First come, first served; preempted requests go back to the front (vLLM V1 FCFS queue)."""

    def __init__(self) -> None:
        self._items: deque[SchedulableRequest] = deque()

    def add(self, request: SchedulableRequest) -> None:
        self._items.append(request)

    def prepend(self, request: SchedulableRequest) -> None:
        self._items.appendleft(request)

    def peek(self) -> SchedulableRequest:
        return self._items[0]

    def pop(self) -> SchedulableRequest:
        return self._items.popleft()

    def remove(self, request: SchedulableRequest) -> None:
        self._items.remove(request)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[SchedulableRequest]:
        return iter(self._items)


class KeyedQueue(RequestQueue[SchedulableRequest]):
    """Smallest key first, ties broken by insertion order; removal is lazy so aborts cost O(1).

    The key is computed once, when the request is (re)queued. Each request maps to the sequence number
    of its one live heap entry, so entries left behind by a removal (or a re-queue) are recognised as
    dead even if the same request object is queued again.
    """

    def __init__(self, key: Callable[[SchedulableRequest], Any]) -> None:
        self._key = key
        self._heap: list[tuple[Any, int, SchedulableRequest]] = []
        self._live: dict[int, int] = {}  # id(request) -> seq of its live entry
        self._counter = itertools.count()

    def add(self, request: SchedulableRequest) -> None:
        seq = next(self._counter)
        heapq.heappush(self._heap, (self._key(request), seq, request))
        self._live[id(request)] = seq

    def prepend(self, request: SchedulableRequest) -> None:
        self.add(request)

    def _is_live(self, entry: tuple[Any, int, SchedulableRequest]) -> bool:
        return self._live.get(id(entry[2])) == entry[1]

    def _drop_dead(self) -> None:
        heap = self._heap
        while heap and not self._is_live(heap[0]):
            heapq.heappop(heap)

    def peek(self) -> SchedulableRequest:
        self._drop_dead()
        if not self._heap:
            raise IndexError("peek from an empty queue")
        return self._heap[0][2]

    def pop(self) -> SchedulableRequest:
        request = self.peek()
        heapq.heappop(self._heap)
        del self._live[id(request)]
        return request

    def remove(self, request: SchedulableRequest) -> None:
        if self._live.pop(id(request), None) is None:
            raise ValueError(f"request {request.request_id} is not queued")

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[SchedulableRequest]:
        return (entry[2] for entry in sorted(self._heap, key=lambda e: (e[0], e[1])) if self._is_live(entry))
