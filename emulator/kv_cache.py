"""Paged KV cache with prefix caching: a block pool and the manager that gives blocks to requests.

Follows vLLM V1 (``vllm/v1/core/block_pool.py``, ``kv_cache_manager.py``, docs/design/prefix_caching.md):

* KV lives in fixed-size blocks. A block that becomes full gets the request's chained block hash and is
  registered in the cache map, so later requests with the same prefix reuse it.
* Free blocks wait in an LRU queue. Freed blocks join its tail, a request's blocks in *reverse* order
  so its last (least shareable) block is evicted first; allocation pops the head and forgets the
  hash that block carried. A cache hit on a free block "touches" it: it leaves the queue.
* Only full blocks are cached, and a hit never covers the whole prompt: at least one token is always
  computed so the engine has logits to sample from.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from emulator.request import EngineRequest


@dataclass(slots=True)
class KVStats:
    """Cumulative counters the metrics layer exports."""

    evicted_blocks: int = 0
    prefix_queries_tokens: int = 0
    prefix_hit_tokens: int = 0


class BlockPool:
    """All KV blocks of one engine: reference counts, cached hashes and the LRU free queue."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self._ref_cnt = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        # Insertion order is eviction order: head = next to reuse. OrderedDict gives O(1) touch.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}
        self.stats = KVStats()

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, including cached blocks no request references."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def ref_count(self, block_id: int) -> int:
        return self._ref_cnt[block_id]

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cache-hit blocks, pulling unreferenced ones out of the free queue."""
        for b in block_ids:
            if self._ref_cnt[b] == 0:
                del self._free[b]
            self._ref_cnt[b] += 1

    def allocate(self, n: int) -> list[int]:
        """Pop ``n`` blocks from the head of the free queue, evicting whatever they cached."""
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out: list[int] = []
        for _ in range(n):
            b, _none = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                if self._cached.get(h) == b:
                    del self._cached[h]
                self._hash[b] = None
                self.stats.evicted_blocks += 1
            self._ref_cnt[b] = 1
            out.append(b)
        return out

    def free(self, block_ids_in_eviction_order: Iterable[int]) -> None:
        """Drop a reference on each block; unreferenced ones join the tail of the free queue."""
        for b in block_ids_in_eviction_order:
            self._ref_cnt[b] -= 1
            if self._ref_cnt[b] == 0:
                self._free[b] = None
            elif self._ref_cnt[b] < 0:
                raise RuntimeError(f"block {b} freed more often than referenced")

    def cache(self, block_id: int, block_hash: int) -> None:
        """Register a newly full block. A duplicate of an already cached hash stays unregistered."""
        if block_hash not in self._cached and self._hash[block_id] is None:
            self._cached[block_hash] = block_id
            self._hash[block_id] = block_hash

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (vLLM's /reset_prefix_cache); refused while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        return True


class KVCacheManager:
    """Gives requests their blocks; finds their cached prefixes; frees them."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}
        self._num_cached: dict[str, int] = {}

    def blocks_of(self, request_id: str) -> Sequence[int]:
        return self._blocks.get(request_id, ())

    @property
    def num_requests(self) -> int:
        return len(self._blocks)

    def find_cached_prefix(self, request: EngineRequest) -> list[int]:
        """The longest run of cached blocks matching the request's leading block hashes.

        Capped below the request's token count: the last token is always recomputed.
        """
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        lookup = self.pool.lookup
        for h in request.block_hashes[:max_blocks]:
            b = lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.pool.stats.prefix_queries_tokens += num_tokens
        self.pool.stats.prefix_hit_tokens += num_hit_tokens

    def allocate_slots(self, request: EngineRequest, num_new_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens of KV (after ``cached_blocks``, if any).

        Returns False, changing nothing, when the free queue cannot supply the blocks.
        """
        rid = request.request_id
        blocks = self._blocks.get(rid)
        held = len(blocks) if blocks is not None else 0
        num_cached_tokens = len(cached_blocks) * self.block_size
        total = request.num_computed_tokens + num_cached_tokens + num_new_tokens
        need = -(-total // self.block_size) - held - len(cached_blocks)
        # Touching an unreferenced cached block removes it from the free queue: it stops being free.
        evictable_hits = sum(1 for b in cached_blocks if self.pool.ref_count(b) == 0)
        if need > self.pool.num_free_blocks - evictable_hits:
            return False
        if blocks is None:
            blocks = self._blocks[rid] = []
            self._num_cached[rid] = 0
        if cached_blocks:
            self.pool.touch(cached_blocks)
            blocks.extend(cached_blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        # Publish blocks that this step fills, so later requests can hit them.
        full = min(total, request.num_tokens) // self.block_size
        done = self._num_cached[rid]
        if full > done:
            hashes = request.block_hashes
            for i in range(done, min(full, len(hashes))):
                self.pool.cache(blocks[i], hashes[i])
            self._num_cached[rid] = min(full, len(hashes))
        return True

    def free(self, request: EngineRequest) -> None:
        """Release a request's blocks, tail first, so its least shareable blocks are evicted first."""
        blocks = self._blocks.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))
