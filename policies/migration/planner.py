"""Llumnix's migration check (Sun et al., OSDI'24; AlibabaPAI/llumnix @ 37d8e5ea, papers.md §5.3).

Load is negative *freeness*: free KV blocks (minus a watermark) per running request, i.e. roughly how many
decode steps an instance can still run — ``load = −(available − first waiting request's blocks) /
(running + [1 if waiting])``, −inf for an idle instance. The released code compares this negated
freeness with ``migrate_out_threshold`` 3.0 in a way whose sign papers.md flags as ambiguous; we read the
threshold as freeness — *steps of headroom* — so instances with fewer than 3 steps of headroom (load above
−3) or with preempted requests are sources, and instances with no preemptions and more headroom are
destinations; the most loaded source pairs with the least loaded destination. Under the ``balanced``
policy a pair is kept only if the move narrows the gap without pushing the destination over the threshold.
The request to move is the last admitted (LCFS), or the shortest / longest (SJF / LJF) by context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

RequestChoice = Literal["lcfs", "sjf", "ljf"]


@dataclass(frozen=True, slots=True)
class RunningRequest:
    request_id: str
    context_tokens: int  # KV it holds (prompt + generated): what a migration must copy
    admitted_at: float


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    replica_id: str
    free_blocks: int
    watermark_blocks: int
    running: Sequence[RunningRequest]
    waiting_first_blocks: int = 0  # KV blocks the head of the waiting queue needs (0: none waiting)
    has_waiting: bool = False
    preempted: int = 0  # requests preempted since the last check
    block_size: int = 16


@dataclass(frozen=True, slots=True)
class MigrationHint:
    source: str
    destination: str
    request_id: str
    source_load: float
    destination_load: float


def freeness_load(instance: InstanceLoad) -> float:
    """Llumnix's migrate load with prefill migration enabled (higher = less free)."""
    n = len(instance.running) + (1 if instance.has_waiting else 0)
    if n == 0:
        return -math.inf
    available = instance.free_blocks - instance.watermark_blocks
    return -(available - instance.waiting_first_blocks) / n


def _with(instance: InstanceLoad, request: RunningRequest, add: bool) -> float:
    blocks = -(-request.context_tokens // instance.block_size)
    running = [*instance.running, request] if add else [r for r in instance.running if r is not request]
    free = instance.free_blocks - blocks if add else instance.free_blocks + blocks
    moved = InstanceLoad(
        instance.replica_id,
        free,
        instance.watermark_blocks,
        running,
        instance.waiting_first_blocks,
        instance.has_waiting,
        instance.preempted,
        instance.block_size,
    )
    return freeness_load(moved)


def _pick(running: Sequence[RunningRequest], choice: RequestChoice) -> RunningRequest | None:
    if not running:
        return None
    if choice == "lcfs":
        return max(running, key=lambda r: r.admitted_at)
    if choice == "sjf":
        return min(running, key=lambda r: (r.context_tokens, -r.admitted_at))
    return max(running, key=lambda r: (r.context_tokens, r.admitted_at))


def plan_migrations(
    instances: Sequence[InstanceLoad],
    migrate_out_threshold: float = 3.0,
    policy: Literal["balanced", "prefill_constrained"] = "balanced",
    choice: RequestChoice = "lcfs",
) -> list[MigrationHint]:
    """Hints for one migration check: at most one request per source/destination pair."""
    loads = {i.replica_id: freeness_load(i) for i in instances}
    sources = sorted(
        (i for i in instances if (loads[i.replica_id] > -migrate_out_threshold or i.preempted) and i.running),
        key=lambda i: loads[i.replica_id],
        reverse=True,
    )
    destinations = sorted(
        (i for i in instances if not i.preempted and loads[i.replica_id] < -migrate_out_threshold),
        key=lambda i: loads[i.replica_id],
    )
    hints: list[MigrationHint] = []
    used: set[str] = set()
    for src, dst in zip(sources, destinations, strict=False):
        if src.replica_id == dst.replica_id or src.replica_id in used or dst.replica_id in used:
            continue
        request = _pick(src.running, choice)
        if request is None:
            continue
        if policy == "balanced":
            before = loads[src.replica_id] - loads[dst.replica_id]
            src_after = _with(src, request, add=False)
            dst_after = _with(dst, request, add=True)
            after = src_after - dst_after
            if dst_after > -migrate_out_threshold or not 0 < abs(after) < abs(before):
                continue
        used.update((src.replica_id, dst.replica_id))
        hints.append(
            MigrationHint(
                src.replica_id, dst.replica_id, request.request_id, loads[src.replica_id], loads[dst.replica_id]
            )
        )
    return hints
