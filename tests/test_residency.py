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
    # The engine frees a request's blocks last-first, so the first prompt lost its tail and keeps its head.
    assert index.match(first) == {"a": 4, "b": 8}
    assert index.match(second) == {"a": 6}
    assert model.evicted_blocks == 4
    # Re-sending a prefix refreshes it: now the rest of the first prompt and then the second's tail go.
    model.record("a", first[:4])
    model.record("a", [201, 202, 203, 204])
    assert index.match(first) == {"a": 4, "b": 8}
    assert index.match(second) == {"a": 2}
    assert model.evicted_blocks == 8


def test_capacity_share_is_validated() -> None:
    with pytest.raises(ValueError):
        ResidencyModel(PrefixIndex(1 << 20), cache_share=0)


def test_a_smaller_capacity_trims_at_once_and_capacity_is_capped_by_the_index() -> None:
    index = PrefixIndex(1 << 20, block_bytes=256)
    model = ResidencyModel(index, cache_share=1.0)
    assert model.capacity_blocks("a") is None
    model.set_capacity("a", kv_tokens=0, tokens_per_block=64)  # no capacity exported: still unknown
    assert model.capacity_blocks("a") is None
    model.set_capacity("a", kv_tokens=10 * 64, tokens_per_block=64)
    model.record("a", list(range(1, 11)))
    assert model.tracked_blocks == 10 and model.evicted_blocks == 0
    # A recalibrated tokens-per-block (or a resized engine) shrinks the model without waiting for a record.
    model.set_capacity("a", kv_tokens=10 * 64, tokens_per_block=128)
    assert model.capacity_blocks("a") == 5 and model.tracked_blocks == 5 and model.evicted_blocks == 5
    assert index.match(list(range(1, 11))) == {"a": 5}  # the prompt's tail went first
    assert index.match(list(range(6, 11))) == {}
    # A replica cannot be believed to hold more than the index remembers: memory stays bounded by the index.
    model.set_capacity("b", kv_tokens=1 << 40, tokens_per_block=1)
    assert model.capacity_blocks("b") == index.capacity_entries


def test_removing_a_replica_drops_its_model() -> None:
    index = PrefixIndex(1 << 20, block_bytes=256)
    model = ResidencyModel(index)
    model.set_capacity("a", kv_tokens=640, tokens_per_block=64)
    model.record("a", [1, 2, 3])
    index.remove_replica("a")
    model.remove_replica("a")
    assert model.capacity_blocks("a") is None and model.tracked_blocks == 0
