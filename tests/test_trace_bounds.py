"""The ceilings and floors bench/trace_bounds.py reports are what a cache and an idle engine allow."""

from __future__ import annotations

import pytest

from bench.trace_bounds import lru_hit_rate
from loadgen.traces import MOONCAKE_BLOCK_TOKENS as B
from loadgen.traces import TraceRequest


def row(t: float, ids: list[int]) -> TraceRequest:
    return TraceRequest(arrival=t, input_length=len(ids) * B, output_length=8, hash_ids=ids)


def test_infinite_cache_hits_every_repeated_leading_block() -> None:
    trace = [row(0, [1, 2]), row(1, [1, 2, 3]), row(2, [9, 2])]
    rate, cached = lru_hit_rate(trace, None)
    assert cached == [0, 2 * B, 0]  # block 2 after a miss on 9 cannot be reused: prefixes chain
    assert rate == pytest.approx(2 * B / (7 * B))


def test_a_bounded_cache_forgets_the_least_recently_used() -> None:
    trace = [row(0, [1, 2]), row(1, [3, 4]), row(2, [1, 2])]
    assert lru_hit_rate(trace, 4)[1] == [0, 0, 2 * B - 1]  # the last token is always recomputed
    assert lru_hit_rate(trace, 3)[1] == [0, 0, 0]
