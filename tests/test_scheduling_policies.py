"""Engine scheduling policies: waiting-queue semantics, victims, and the registry."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from policies.scheduling import (
    EngineSchedulingPolicy,
    SchedulingContext,
    available_scheduling_policies,
    make_scheduling_policy,
)
from policies.scheduling.fcfs import FcfsPolicy
from policies.scheduling.priority import PriorityPolicy
from policies.scheduling.queues import FifoQueue, KeyedQueue


@dataclass(eq=False)
class Req:
    """A minimal SchedulableRequest; identity equality like EngineRequest."""

    request_id: str
    priority: int = 0
    arrival_time: float = 0.0
    tenant: str = "default"
    num_prompt_tokens: int = 10
    num_tokens: int = 10
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    max_tokens: int = 5


def _ids(items: Iterable[Any]) -> list[str]:
    return [r.request_id for r in items]


def _rank(r: Req) -> tuple[int, float]:
    return (r.priority, r.arrival_time)


CTX = SchedulingContext(now=0.0, token_budget=256, num_free_blocks=10, num_total_blocks=40, block_size=16)


# ------------------------------------------------------------------------------------------ FIFO


def test_fifo_order_peek_pop() -> None:
    q = FifoQueue()
    assert not q
    assert len(q) == 0
    a, b, c = Req("a"), Req("b"), Req("c")
    for r in (a, b, c):
        q.add(r)
    assert q and len(q) == 3
    assert _ids(q) == ["a", "b", "c"]
    assert q.peek() is a
    assert len(q) == 3
    assert q.pop() is a
    assert _ids(q) == ["b", "c"]


def test_fifo_prepend_goes_to_front() -> None:
    q = FifoQueue()
    a, b, p1, p2 = Req("a"), Req("b"), Req("p1"), Req("p2")
    q.add(a)
    q.add(b)
    q.prepend(p1)
    q.prepend(p2)  # preempted later goes first (vLLM: LIFO victims re-queued at the front)
    assert _ids(q) == ["p2", "p1", "a", "b"]
    assert q.pop() is p2


def test_fifo_remove() -> None:
    q = FifoQueue()
    reqs = [Req(str(i)) for i in range(4)]
    for r in reqs:
        q.add(r)
    q.remove(reqs[2])
    assert _ids(q) == ["0", "1", "3"]
    with pytest.raises(ValueError):
        q.remove(reqs[2])
    with pytest.raises(ValueError):
        q.remove(Req("2"))  # identity, not id string


def test_fifo_empty_raises_index_error() -> None:
    q = FifoQueue()
    with pytest.raises(IndexError):
        q.peek()
    with pytest.raises(IndexError):
        q.pop()


# ------------------------------------------------------------------------------------------ keyed


def test_keyed_smallest_key_first_ties_by_insertion() -> None:
    q = KeyedQueue(_rank)  # type: ignore[arg-type]
    specs = [("a", 2, 0.0), ("b", 1, 5.0), ("c", 1, 1.0), ("d", 1, 1.0), ("e", 0, 9.0)]
    for rid, prio, t in specs:
        q.add(Req(rid, prio, t))
    assert len(q) == 5
    assert _ids(q) == ["e", "c", "d", "b", "a"]
    assert q.peek().request_id == "e"
    assert [q.pop().request_id for _ in range(5)] == ["e", "c", "d", "b", "a"]
    assert not q


def test_keyed_prepend_is_keyed() -> None:
    q = KeyedQueue(_rank)  # type: ignore[arg-type]
    a, b = Req("a", 0, 1.0), Req("b", 0, 2.0)
    q.add(a)
    q.add(b)
    late = Req("late", 0, 0.5)
    q.prepend(late)  # ranks by key, wherever it came from
    assert _ids(q) == ["late", "a", "b"]
    worse = Req("worse", 5, 0.0)
    q.prepend(worse)
    assert _ids(q)[-1] == "worse"
    # Re-queued before new arrivals of equal rank.
    twin = Req("twin", 5, 0.0)
    q.add(twin)
    assert _ids(q)[-2:] == ["worse", "twin"]


def test_keyed_key_computed_once_at_queue_time() -> None:
    q = KeyedQueue(_rank)  # type: ignore[arg-type]
    a, b = Req("a", 1), Req("b", 2)
    q.add(a)
    q.add(b)
    b.priority = 0  # mutating after queueing does not reorder
    assert q.pop() is a


def test_keyed_lazy_removal() -> None:
    q = KeyedQueue(_rank)  # type: ignore[arg-type]
    reqs = [Req(str(i), priority=i) for i in range(5)]
    for r in reqs:
        q.add(r)
    q.remove(reqs[0])
    q.remove(reqs[3])
    assert len(q) == 3
    assert _ids(q) == ["1", "2", "4"]
    assert q.peek() is reqs[1]
    with pytest.raises(ValueError, match="not queued"):
        q.remove(reqs[0])
    assert [q.pop().request_id for _ in range(3)] == ["1", "2", "4"]
    assert not q
    with pytest.raises(IndexError):
        q.peek()
    with pytest.raises(IndexError):
        q.pop()


def test_keyed_remove_everything_then_empty() -> None:
    q = KeyedQueue(_rank)  # type: ignore[arg-type]
    reqs = [Req(str(i)) for i in range(3)]
    for r in reqs:
        q.add(r)
    for r in reqs:
        q.remove(r)
    assert len(q) == 0
    assert list(q) == []
    with pytest.raises(IndexError):
        q.peek()


def test_keyed_removed_then_requeued_appears_once() -> None:
    """A request removed (lazily) and queued again must be in the queue once, at its new key."""
    q = KeyedQueue(_rank)  # type: ignore[arg-type]
    a, r = Req("a", priority=1), Req("r", priority=5)
    q.add(a)
    q.add(r)
    q.remove(r)
    q.add(r)
    assert len(q) == 2
    assert _ids(q) == ["a", "r"]


def test_keyed_removed_then_requeued_uses_new_key() -> None:
    q = KeyedQueue(_rank)  # type: ignore[arg-type]
    a, r = Req("a", priority=1), Req("r", priority=0)
    q.add(a)
    q.add(r)
    q.remove(r)
    r.priority = 9
    q.add(r)
    assert q.pop() is a
    assert q.pop() is r
    assert not q


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@example(ops=[("add", 0, 1), ("remove", 0, 0), ("add", 0, 2)])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "prepend", "pop", "remove"]), st.integers(0, 7), st.integers(0, 3)),
        max_size=60,
    )
)
def test_keyed_matches_a_sorted_list_model(ops: list[tuple[str, int, int]]) -> None:
    """KeyedQueue against a plain model: sort by (key, insertion counter); each request queued at most once."""
    q = KeyedQueue(_rank)  # type: ignore[arg-type]
    pool = [Req(f"r{i}", arrival_time=float(i)) for i in range(8)]
    model: list[tuple[tuple[int, float], int, Req]] = []
    counter = 0
    for op, idx, prio in ops:
        r = pool[idx]
        queued = any(e[2] is r for e in model)
        if op in ("add", "prepend") and not queued:
            r.priority = prio
            (q.add if op == "add" else q.prepend)(r)
            model.append((_rank(r), counter, r))
            counter += 1
        elif op == "pop" and model:
            model.sort(key=lambda e: (e[0], e[1]))
            assert q.pop() is model.pop(0)[2]
        elif op == "remove" and queued:
            q.remove(r)
            model = [e for e in model if e[2] is not r]
        model.sort(key=lambda e: (e[0], e[1]))
        assert len(q) == len(model)
        assert [e[2] for e in model] == list(q)
        if model:
            assert q.peek() is model[0][2]


# ------------------------------------------------------------------------------------------ policies


def test_fcfs_policy() -> None:
    p = FcfsPolicy()
    assert p.name == "fcfs"
    assert isinstance(p.make_waiting_queue(), FifoQueue)
    running = [Req("old", arrival_time=0.0), Req("mid", arrival_time=1.0), Req("new", arrival_time=0.5)]
    assert p.preemption_victim(running, CTX).request_id == "new"  # the last admitted, whatever it arrived
    assert p.order_running(running, CTX) == running
    assert p.token_budget(8192) == 8192
    assert p.make_waiting_queue() is not p.make_waiting_queue()


def test_priority_policy() -> None:
    p = PriorityPolicy()
    assert p.name == "priority"
    assert p.reaches_vllm_via_priority
    q = p.make_waiting_queue()
    assert isinstance(q, KeyedQueue)
    for r in (Req("x", 1, 0.0), Req("y", 0, 3.0), Req("z", 0, 2.0)):
        q.add(r)
    assert _ids(q) == ["z", "y", "x"]
    running = [Req("a", 0, 5.0), Req("b", 2, 1.0), Req("c", 2, 3.0), Req("d", 1, 9.0)]
    assert p.preemption_victim(running, CTX).request_id == "c"  # max (priority, arrival)


def test_scheduling_context_kv_usage() -> None:
    assert CTX.kv_usage == pytest.approx(0.75)
    assert SchedulingContext(0.0, 1, 0, 0, 16).kv_usage == 0.0


# ------------------------------------------------------------------------------------------ registry


def test_registry_lists_and_builds() -> None:
    assert available_scheduling_policies() == ["fcfs", "larry", "priority", "sjf", "slai", "vtc"]
    for name in available_scheduling_policies():
        p = make_scheduling_policy(name)
        assert isinstance(p, EngineSchedulingPolicy)
        assert p.name == name
    assert isinstance(make_scheduling_policy("fcfs"), FcfsPolicy)
    assert isinstance(make_scheduling_policy("priority"), PriorityPolicy)
    assert make_scheduling_policy("fcfs") is not make_scheduling_policy("fcfs")  # fresh per engine


@pytest.mark.parametrize("name", ["lifo", "FCFS", "", "priority "])
def test_registry_unknown_name(name: str) -> None:
    with pytest.raises(ValueError, match="unknown engine scheduling policy") as info:
        make_scheduling_policy(name)
    assert "available: fcfs, larry, priority, sjf, slai, vtc" in str(info.value)
