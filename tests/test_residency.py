"""The router's model of each engine's LRU prefix cache keeps the prefix index honest."""

from __future__ import annotations

import pytest

from router.prefix_index import PrefixIndex
from router.residency import ResidencyModel


def test_blocks_beyond_a_replicas_cache_are_forgotten_oldest_first() -> None:
    index = PrefixIndex(1 << 20, block_bytes=256)
    index.add_replica("a")
    index.add_replica("b")
    model = ResidencyModel(index, cache_share=1.0)
    model.set_capacity("a", kv_tokens=10 * 64, tokens_per_block=64)  # a holds 10 blocks
    first = list(range(1, 9))  # 8 blocks
    second = list(range(101, 107))  # 6 more: 4 of the first must go
    model.record("a", first)
    model.record("b", first)  # b has no capacity set: never trimmed
    model.record("a", second)
    assert index.match(first) == {"b": 8}
    assert index.match(second) == {"a": 6}
    assert model.evicted_blocks == 4
    # re-sending a prefix refreshes it
    model.record("a", first[4:])
    model.record("a", [201, 202])
    assert index.match(first[4:]) == {"a": 4, "b": 4}
    assert index.match(second) == {}  # 101 and 102 were the oldest: gone, and the walk stops there


def test_capacity_share_is_validated() -> None:
    with pytest.raises(ValueError):
        ResidencyModel(PrefixIndex(1 << 20), cache_share=0)
