"""Block hashes, the block pool (ref counts, LRU free queue) and the KV cache manager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.block_hash import (
    NONE_HASH,
    chain_block_hashes,
    chain_opaque_block_hashes,
    hash_block,
    hash_opaque_block,
)
from emulator.kv_cache import BlockPool, KVCacheManager
from emulator.request import EngineRequest, SamplingParams
from tests.engine_helpers import BLOCK, make_request, prompt_tokens

REPO = Path(__file__).resolve().parents[1]

# ========================================================================================== hashes


def test_chain_equal_prefixes_equal_hashes() -> None:
    a = prompt_tokens(100, seed=1)
    b = a[:64] + prompt_tokens(36, seed=2)
    ha, hb = chain_block_hashes(a, BLOCK), chain_block_hashes(b, BLOCK)
    assert len(ha) == len(hb) == 6
    assert ha[:4] == hb[:4]
    assert all(x != y for x, y in zip(ha[4:], hb[4:], strict=True))


def test_divergence_changes_every_later_hash() -> None:
    a = prompt_tokens(128, seed=3)
    b = list(a)
    b[20] += 1  # inside block 1
    ha, hb = chain_block_hashes(a, BLOCK), chain_block_hashes(b, BLOCK)
    assert ha[0] == hb[0]
    assert all(x != y for x, y in zip(ha[1:], hb[1:], strict=True))


def test_same_block_contents_at_different_positions_differ() -> None:
    block = list(range(5000, 5016))
    h = chain_block_hashes(block * 3, BLOCK)
    assert len(set(h)) == 3  # the parent chain makes position part of the identity


def test_chain_matches_hash_block() -> None:
    toks = prompt_tokens(50, seed=4)
    parent = None
    expected = []
    for i in range(3):
        parent = hash_block(parent, toks[i * 16 : (i + 1) * 16], "s" if i == 0 else None)
        expected.append(parent)
    assert chain_block_hashes(toks, BLOCK, "s") == expected
    assert hash_block(None, toks[:16]) == hash((NONE_HASH, tuple(toks[:16]), 0))


def test_cache_salt_changes_first_and_hence_all_hashes() -> None:
    toks = prompt_tokens(80, seed=5)
    plain = chain_block_hashes(toks, BLOCK)
    salted = chain_block_hashes(toks, BLOCK, cache_salt="tenant-a")
    other = chain_block_hashes(toks, BLOCK, cache_salt="tenant-b")
    assert len(plain) == len(salted) == 5
    assert all(x != y for x, y in zip(plain, salted, strict=True))
    assert all(x != y for x, y in zip(salted, other, strict=True))
    # Salt enters the first block only: later blocks are chained from the salted first hash.
    assert salted[1] == hash_block(salted[0], toks[16:32])
    assert chain_block_hashes(toks, BLOCK, cache_salt="tenant-a") == salted


def test_partial_trailing_block_not_hashed() -> None:
    assert chain_block_hashes(prompt_tokens(15), BLOCK) == []
    assert len(chain_block_hashes(prompt_tokens(16), BLOCK)) == 1
    assert len(chain_block_hashes(prompt_tokens(47), BLOCK)) == 2
    full = chain_block_hashes(prompt_tokens(48, seed=9), BLOCK)
    assert chain_block_hashes(prompt_tokens(48, seed=9)[:47], BLOCK) == full[:2]


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(
    toks=st.lists(st.integers(0, 2**31), min_size=0, max_size=120),
    cut=st.integers(0, 120),
)
def test_chain_is_prefix_closed(toks: list[int], cut: int) -> None:
    full = chain_block_hashes(toks, BLOCK)
    assert len(full) == len(toks) // BLOCK
    assert chain_block_hashes(toks[:cut], BLOCK) == full[: min(cut, len(toks)) // BLOCK]


def test_request_hashes_prompt_and_generated_blocks() -> None:
    prompt = prompt_tokens(40, seed=6)
    req = make_request("r", prompt, max_tokens=30, cache_salt="salty")
    assert req.block_hashes == chain_block_hashes(prompt, BLOCK, "salty")
    generated = [7000 + i for i in range(30)]
    for t in generated:
        req.append_output_token(t)
    # Every block completed by generated tokens is hashed exactly as the whole sequence would be.
    assert req.block_hashes == chain_block_hashes(prompt + generated, BLOCK, "salty")
    assert len(req.block_hashes) == 70 // 16


def test_request_short_prompt_salt_applies_to_first_generated_block() -> None:
    prompt = prompt_tokens(5, seed=8)
    req = make_request("short", prompt, max_tokens=20, cache_salt="t")
    assert req.block_hashes == []
    generated = [8000 + i for i in range(11)]
    for t in generated:
        req.append_output_token(t)
    assert req.block_hashes == chain_block_hashes(prompt + generated, BLOCK, "t")


_HASH_SCRIPT = """
import json, sys
from emulator.block_hash import chain_block_hashes, chain_opaque_block_hashes, hash_opaque_block
toks = [1000 + (i * 7919) % 30000 for i in range(100)]
print(json.dumps({
    "plain": chain_block_hashes(toks, 16),
    "salted": chain_block_hashes(toks, 16, "tenant-x"),
    "opaque_chain": chain_opaque_block_hashes([11, 22, 33]),
    "opaque_block": [hash_opaque_block(None, 5, 0), hash_opaque_block(123, 5, 1)],
}))
"""


def _hashes_in_subprocess(hashseed: str) -> dict[str, list[int]]:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run(
        [sys.executable, "-c", _HASH_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, list[int]] = json.loads(out.stdout)
    return result


@pytest.fixture(scope="module")
def subprocess_hashes() -> list[dict[str, list[int]]]:
    return [_hashes_in_subprocess("0"), _hashes_in_subprocess("4242")]


def test_token_block_hashes_stable_across_processes(subprocess_hashes: list[dict[str, list[int]]]) -> None:
    toks = [1000 + (i * 7919) % 30000 for i in range(100)]
    here = {"plain": chain_block_hashes(toks, 16), "salted": chain_block_hashes(toks, 16, "tenant-x")}
    assert subprocess_hashes[0]["plain"] == subprocess_hashes[1]["plain"]
    for other in subprocess_hashes:
        assert other["plain"] == here["plain"]
        assert other["salted"] == here["salted"]


def test_opaque_block_hashes_stable_across_processes(subprocess_hashes: list[dict[str, list[int]]]) -> None:
    """The module promises a chain stable across processes; the simulator's opaque chains too."""
    here_chain = chain_opaque_block_hashes([11, 22, 33])
    here_block = [hash_opaque_block(None, 5, 0), hash_opaque_block(123, 5, 1)]
    first, second = subprocess_hashes
    assert first["opaque_chain"] == second["opaque_chain"]
    assert first["opaque_block"] == second["opaque_block"]
    for other in subprocess_hashes:
        assert other["opaque_chain"] == here_chain
        assert other["opaque_block"] == here_block


def test_opaque_chain_properties() -> None:
    a = chain_opaque_block_hashes([1, 2, 3, 4])
    b = chain_opaque_block_hashes([1, 2, 9, 4])
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]
    assert chain_opaque_block_hashes([3, 4], parent=a[1]) == a[2:]


# ========================================================================================== pool


def test_pool_allocate_and_free_ref_counts() -> None:
    pool = BlockPool(8)
    assert pool.num_free_blocks == 8
    assert pool.usage == 0.0
    got = pool.allocate(3)
    assert got == [0, 1, 2]
    assert [pool.ref_count(b) for b in got] == [1, 1, 1]
    assert pool.num_free_blocks == 5
    assert pool.usage == pytest.approx(3 / 8)
    pool.touch([1])
    assert pool.ref_count(1) == 2
    pool.free([2, 1, 0])
    assert [pool.ref_count(b) for b in got] == [0, 1, 0]
    assert not pool.is_free(1)
    assert pool.num_free_blocks == 7
    pool.free([1])
    assert pool.num_free_blocks == 8
    with pytest.raises(RuntimeError):
        pool.free([1])


def test_pool_refuses_over_allocation() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    with pytest.raises(ValueError):
        BlockPool(0)


def test_pool_lru_order_freed_blocks_join_the_tail() -> None:
    pool = BlockPool(6)
    a = pool.allocate(2)  # 0, 1
    b = pool.allocate(2)  # 2, 3
    pool.free(b)  # tail: 4, 5, 2, 3
    pool.free(a)  # tail: 4, 5, 2, 3, 0, 1
    assert pool.allocate(6) == [4, 5, 2, 3, 0, 1]


def test_pool_eviction_forgets_hash_and_counts() -> None:
    pool = BlockPool(2)
    (b0,) = pool.allocate(1)
    pool.cache(b0, 111)
    assert pool.lookup(111) == b0
    pool.free([b0])  # free but still cached
    assert pool.lookup(111) == b0
    assert pool.num_cached_blocks == 1
    assert pool.allocate(1) == [1]  # the never-used block first
    assert pool.lookup(111) == b0
    assert pool.allocate(1) == [b0]  # now the cached block is evicted
    assert pool.lookup(111) is None
    assert pool.num_cached_blocks == 0
    assert pool.stats.evicted_blocks == 1


def test_pool_touch_removes_free_cached_block_from_queue() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.cache(blocks[0], 10)
    pool.free(reversed(blocks))
    assert pool.is_free(blocks[0])
    pool.touch([blocks[0]])
    assert not pool.is_free(blocks[0])
    assert pool.ref_count(blocks[0]) == 1
    assert pool.num_free_blocks == 3
    # The touched block is never handed out by allocate.
    assert blocks[0] not in pool.allocate(3)


def test_pool_duplicate_hash_stays_unregistered() -> None:
    pool = BlockPool(4)
    x, y = pool.allocate(2)
    pool.cache(x, 5)
    pool.cache(y, 5)
    assert pool.lookup(5) == x
    pool.free([y, x])
    # Evicting the unregistered duplicate does not touch the real entry nor count as an eviction.
    assert pool.allocate(3) == [2, 3, y]
    assert pool.lookup(5) == x
    assert pool.stats.evicted_blocks == 0


def test_pool_reset_prefix_cache() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.cache(b, 77)
    assert pool.reset_prefix_cache() is False
    assert pool.lookup(77) == b
    pool.free([b])
    assert pool.reset_prefix_cache() is True
    assert pool.lookup(77) is None
    assert pool.num_cached_blocks == 0


# ========================================================================================== manager


def _req(rid: str, n: int, seed: int = 1, prefix: list[int] | None = None, max_tokens: int = 16) -> EngineRequest:
    return make_request(rid, prompt_tokens(n, seed=seed, prefix=prefix or []), max_tokens=max_tokens)


def _snapshot(kv: KVCacheManager) -> tuple[object, ...]:
    pool = kv.pool
    return (
        pool.num_free_blocks,
        [pool.ref_count(b) for b in range(pool.num_blocks)],
        [pool.is_free(b) for b in range(pool.num_blocks)],
        pool.num_cached_blocks,
        kv.num_requests,
        pool.stats.evicted_blocks,
    )


def test_manager_allocates_ceil_blocks_and_publishes_full_ones() -> None:
    kv = KVCacheManager(16, BLOCK)
    r = _req("a", 40)
    assert kv.allocate_slots(r, 40)
    assert len(kv.blocks_of("a")) == 3
    assert kv.pool.num_cached_blocks == 2  # the partial third block is not cached
    assert [kv.pool.lookup(h) for h in r.block_hashes] == list(kv.blocks_of("a"))[:2]
    kv.free(r)
    assert kv.num_requests == 0
    assert kv.blocks_of("a") == ()
    assert kv.pool.num_free_blocks == 16


def test_manager_chunked_allocation_grows_and_publishes_progressively() -> None:
    kv = KVCacheManager(16, BLOCK)
    r = _req("a", 100)
    assert kv.allocate_slots(r, 30)
    assert len(kv.blocks_of("a")) == 2
    assert kv.pool.num_cached_blocks == 1
    r.num_computed_tokens = 30
    assert kv.allocate_slots(r, 50)
    assert len(kv.blocks_of("a")) == 5
    assert kv.pool.num_cached_blocks == 5
    r.num_computed_tokens = 80
    assert kv.allocate_slots(r, 20)
    assert len(kv.blocks_of("a")) == 7
    assert kv.pool.num_cached_blocks == 6  # 100 // 16


def test_manager_publishes_generated_blocks() -> None:
    kv = KVCacheManager(16, BLOCK)
    r = _req("a", 30)
    assert kv.allocate_slots(r, 30)
    r.num_computed_tokens = 30
    r.append_output_token(4444)
    r.append_output_token(4445)  # 32 tokens: block 1 is now full and hashed
    assert len(r.block_hashes) == 2
    assert kv.pool.lookup(r.block_hashes[1]) is None
    assert kv.allocate_slots(r, 2)  # computing tokens 30, 31
    assert kv.pool.lookup(r.block_hashes[1]) == kv.blocks_of("a")[1]


def test_manager_free_releases_in_reverse_order() -> None:
    kv = KVCacheManager(8, BLOCK)
    r = _req("a", 64)
    assert kv.allocate_slots(r, 64)
    held = list(kv.blocks_of("a"))
    assert held == [0, 1, 2, 3]
    kv.free(r)
    # The fresh blocks 4..7 first, then the request's blocks last-block-first.
    assert kv.pool.allocate(8) == [4, 5, 6, 7, 3, 2, 1, 0]


def test_manager_lru_older_freed_request_evicted_first() -> None:
    kv = KVCacheManager(8, BLOCK)
    old, new = _req("old", 64, seed=1), _req("new", 64, seed=2)
    assert kv.allocate_slots(old, 64)
    assert kv.allocate_slots(new, 64)
    old_blocks, new_blocks = list(kv.blocks_of("old")), list(kv.blocks_of("new"))
    kv.free(old)
    kv.free(new)
    # A 3-block request evicts old's last three blocks (tail first), keeping old's first block and all of new's.
    third = _req("third", 48, seed=3)
    assert kv.allocate_slots(third, 48)
    assert list(kv.blocks_of("third")) == old_blocks[::-1][:3]
    assert kv.pool.lookup(old.block_hashes[0]) == old_blocks[0]
    assert all(kv.pool.lookup(h) is None for h in old.block_hashes[1:])
    assert [kv.pool.lookup(h) for h in new.block_hashes] == new_blocks
    assert kv.pool.stats.evicted_blocks == 3
    # A surviving prefix of "old" is still found.
    assert kv.find_cached_prefix(_req("old-again", 64, seed=1)) == [old_blocks[0]]


def test_find_cached_prefix_stops_at_first_miss() -> None:
    kv = KVCacheManager(16, BLOCK)
    base = prompt_tokens(96, seed=4)
    a = make_request("a", base)
    assert kv.allocate_slots(a, 96)
    kv.free(a)
    b_tokens = list(base)
    b_tokens[40] += 1  # diverges in block 2
    b = make_request("b", b_tokens + prompt_tokens(10, seed=9))
    assert kv.find_cached_prefix(b) == list(kv.pool.lookup(h) for h in a.block_hashes[:2])


def test_cache_hit_touches_free_cached_blocks() -> None:
    kv = KVCacheManager(16, BLOCK)
    shared = prompt_tokens(64, seed=5)
    a = make_request("a", [*shared, *prompt_tokens(10, seed=6)])
    assert kv.allocate_slots(a, 74)
    kv.free(a)
    assert kv.pool.num_free_blocks == 16
    b = make_request("b", [*shared, *prompt_tokens(20, seed=7)])
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 4
    assert all(kv.pool.is_free(h) for h in hits)
    assert kv.allocate_slots(b, 20, hits)
    assert all(not kv.pool.is_free(h) and kv.pool.ref_count(h) == 1 for h in hits)
    assert list(kv.blocks_of("b"))[:4] == hits
    assert len(kv.blocks_of("b")) == 6  # 84 tokens
    assert kv.pool.num_free_blocks == 16 - 6


def test_cache_hit_on_block_in_use_shares_it() -> None:
    kv = KVCacheManager(16, BLOCK)
    shared = prompt_tokens(32, seed=5)
    a = make_request("a", [*shared, 1, 2, 3])
    assert kv.allocate_slots(a, 35)
    b = make_request("b", [*shared, 4, 5, 6, 7])
    hits = kv.find_cached_prefix(b)
    assert hits == list(kv.blocks_of("a"))[:2]
    free_before = kv.pool.num_free_blocks
    assert kv.allocate_slots(b, 4, hits)
    assert [kv.pool.ref_count(h) for h in hits] == [2, 2]
    assert kv.pool.num_free_blocks == free_before - 1
    kv.free(a)
    assert [kv.pool.ref_count(h) for h in hits] == [1, 1]
    kv.free(b)
    assert kv.pool.num_free_blocks == 16


@pytest.mark.parametrize("n", [16, 64, 160])
def test_hit_capped_so_last_block_is_recomputed(n: int) -> None:
    kv = KVCacheManager(32, BLOCK)
    toks = prompt_tokens(n, seed=11)
    a = make_request("a", toks)
    assert kv.allocate_slots(a, n)
    kv.free(a)
    assert kv.pool.num_cached_blocks == n // 16
    b = make_request("b", toks)
    hits = kv.find_cached_prefix(b)
    assert len(hits) == n // 16 - 1  # exact multiple of 16, fully cached: last block recomputed
    assert (b.num_tokens - len(hits) * 16) == 16


def test_hit_cap_non_multiple_prompt_reuses_all_full_blocks() -> None:
    kv = KVCacheManager(32, BLOCK)
    toks = prompt_tokens(70, seed=12)
    a = make_request("a", toks)
    assert kv.allocate_slots(a, 70)
    kv.free(a)
    assert len(kv.find_cached_prefix(make_request("b", toks))) == 4


def test_allocate_slots_short_of_blocks_changes_nothing() -> None:
    kv = KVCacheManager(8, BLOCK)
    a = _req("a", 80, seed=1)
    assert kv.allocate_slots(a, 80)  # 5 blocks
    before = _snapshot(kv)
    b = _req("b", 64, seed=2)
    assert kv.allocate_slots(b, 64) is False  # needs 4, 3 free
    assert _snapshot(kv) == before
    assert kv.blocks_of("b") == ()
    # Growing a running request beyond the pool also fails cleanly.
    a.num_computed_tokens = 80
    assert kv.allocate_slots(a, 64) is False
    assert _snapshot(kv) == before
    assert len(kv.blocks_of("a")) == 5


def test_allocate_slots_counts_evictable_hits_as_not_free() -> None:
    kv = KVCacheManager(8, BLOCK)
    shared = prompt_tokens(64, seed=3)
    a = make_request("a", shared)
    assert kv.allocate_slots(a, 64)
    kv.free(a)
    # b hits 4 free cached blocks and needs 5 more: 8 free blocks minus the 4 it would touch is too few.
    b = make_request("b", [*shared, *prompt_tokens(80, seed=4)], max_tokens=1)
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 4
    before = _snapshot(kv)
    assert kv.allocate_slots(b, 80, hits) is False
    assert _snapshot(kv) == before
    assert all(kv.pool.is_free(h) for h in hits)
    # With one block less it fits exactly.
    assert kv.allocate_slots(b, 64, hits)
    assert kv.pool.num_free_blocks == 0


def test_manager_duplicate_blocks_do_not_replace_cache_entry() -> None:
    kv = KVCacheManager(16, BLOCK)
    toks = prompt_tokens(48, seed=21)
    a, b = make_request("a", toks), make_request("b", toks)
    assert kv.allocate_slots(a, 48)
    assert kv.allocate_slots(b, 48)  # no lookup: duplicate blocks (vLLM V1 allows them)
    assert [kv.pool.lookup(h) for h in a.block_hashes] == list(kv.blocks_of("a"))
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free_blocks == 16
    assert kv.pool.num_cached_blocks == 3


def test_manager_reset_prefix_cache_refused_while_in_use() -> None:
    kv = KVCacheManager(8, BLOCK)
    a = _req("a", 32)
    assert kv.allocate_slots(a, 32)
    assert kv.pool.reset_prefix_cache() is False
    assert kv.find_cached_prefix(_req("a2", 48)) == list(kv.blocks_of("a"))[:2]
    kv.free(a)
    assert kv.pool.reset_prefix_cache() is True
    assert kv.find_cached_prefix(_req("a3", 48)) == []


def test_prefix_query_stats() -> None:
    kv = KVCacheManager(8, BLOCK)
    kv.record_prefix_query(100, 32)
    kv.record_prefix_query(50, 0)
    assert kv.pool.stats.prefix_queries_tokens == 150
    assert kv.pool.stats.prefix_hit_tokens == 32


def test_hash_only_requests_share_prefix() -> None:
    keys = chain_opaque_block_hashes([1, 2, 3, 4])
    a = EngineRequest("a", 70, SamplingParams(max_tokens=4), 0.0, BLOCK, prompt_block_hashes=keys, seed=1)
    b = EngineRequest("b", 64, SamplingParams(max_tokens=4), 0.0, BLOCK, prompt_block_hashes=keys, seed=2)
    kv = KVCacheManager(16, BLOCK)
    assert kv.allocate_slots(a, 70)
    assert len(kv.find_cached_prefix(b)) == 3  # 64 tokens: last block recomputed
    with pytest.raises(ValueError):
        EngineRequest("c", 70, SamplingParams(max_tokens=4), 0.0, BLOCK, prompt_block_hashes=keys[:3])


# ========================================================================================== property


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["alloc", "grow", "free"]), st.integers(0, 5), st.integers(1, 80)),
        min_size=1,
        max_size=40,
    )
)
def test_manager_ref_counts_match_holders(ops: list[tuple[str, int, int]]) -> None:
    """Random allocate/grow/free: ref counts equal the number of holders; free queue = unreferenced blocks."""
    kv = KVCacheManager(12, BLOCK)
    prefix = prompt_tokens(48, seed=99)
    reqs: dict[int, EngineRequest] = {}
    serial = 0
    for op, slot, n in ops:
        r = reqs.get(slot)
        if op == "alloc" and r is None:
            serial += 1
            r = make_request(f"r{serial}", prompt_tokens(n, seed=slot % 3, prefix=prefix[: n // 2]), max_tokens=50)
            hits = kv.find_cached_prefix(r)
            new = r.num_tokens - len(hits) * BLOCK
            if kv.allocate_slots(r, new, hits):
                r.num_computed_tokens = r.num_tokens
                reqs[slot] = r
        elif op == "grow" and r is not None:
            for _ in range(n % 20 + 1):
                r.append_output_token(5000 + r.num_output_tokens)
            if kv.allocate_slots(r, r.num_tokens - r.num_computed_tokens):
                r.num_computed_tokens = r.num_tokens
        elif op == "free" and r is not None:
            kv.free(r)
            del reqs[slot]
        pool = kv.pool
        holders = [0] * pool.num_blocks
        for req in reqs.values():
            blocks = kv.blocks_of(req.request_id)
            assert len(blocks) == -(-req.num_computed_tokens // BLOCK)
            for blk in blocks:
                holders[blk] += 1
        assert [pool.ref_count(b) for b in range(pool.num_blocks)] == holders
        assert pool.num_free_blocks == sum(1 for h in holders if h == 0)
        assert all(pool.is_free(b) == (holders[b] == 0) for b in range(pool.num_blocks))
    for r in reqs.values():
        kv.free(r)
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    assert kv.num_requests == 0
