"""When requests are due: a trace's own timing sped up, or seeded Poisson/gamma arrivals at a fixed rate.

Only independent requests are re-timed. A follow-up turn of a conversation is sent a think time after the
previous turn completes, so it keeps its place in its session; its nominal arrival moves with the session.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from loadgen.traces import TraceRequest

__all__ = ["gamma_intervals", "retime", "scale_arrivals"]


def scale_arrivals(requests: Sequence[TraceRequest], rate_scale: float) -> list[TraceRequest]:
    """The trace replayed ``rate_scale`` times faster: arrival offsets and think times divided by it."""
    if not rate_scale > 0:
        raise ValueError(f"rate scale must be > 0, got {rate_scale}")
    if rate_scale == 1.0:
        return list(requests)
    return [replace(r, arrival=r.arrival / rate_scale, think_time=r.think_time / rate_scale) for r in requests]


def gamma_intervals(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """``count`` inter-arrival gaps with mean ``1/rate``: gamma with shape ``burstiness`` (vLLM's meaning:
    1 is Poisson, below 1 burstier, above 1 more regular). An infinite rate gives all zeros."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if rate == float("inf"):
        return [0.0] * count
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(count)]


def retime(requests: Sequence[TraceRequest], rate: float, burstiness: float = 1.0, seed: int = 0) -> list[TraceRequest]:
    """Independent requests re-timed to arrive at ``rate`` per second (the first at 0), in trace order;
    follow-up turns keep their offset from their session's first turn."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
    independent = [i for i in order if not requests[i].is_follow_up]
    gaps = gamma_intervals(len(independent), rate, burstiness, seed)
    arrivals: dict[int, float] = {}
    session_shift: dict[str, float] = {}
    clock = 0.0
    for k, index in enumerate(independent):
        clock += gaps[k] if k else 0.0
        arrivals[index] = clock
        session = requests[index].session_id
        if session is not None:
            session_shift[session] = clock - requests[index].arrival
    out: list[TraceRequest] = []
    for index, request in enumerate(requests):
        if index in arrivals:
            out.append(replace(request, arrival=arrivals[index]))
        else:
            shift = session_shift.get(request.session_id or "", 0.0)
            out.append(replace(request, arrival=max(0.0, request.arrival + shift)))
    out.sort(key=lambda r: r.arrival)
    return out
