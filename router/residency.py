"""What each engine probably still caches: the router's model of every replica's LRU prefix cache.

The prefix index remembers where each prompt block was *sent*; the engine forgets blocks as its LRU
cache turns over. Without a model of that, routing chases prefixes that are long gone (in simulation a
quarter of believed matches were stale). The model keeps, per replica, the blocks sent there in LRU
order, bounded by what the replica's KV can hold (its ``kv_capacity_tokens``, e.g. vLLM's
``cache_config_info``, scaled by ``cache_share`` because generated tokens and running requests take KV too,
and converted to index blocks), and clears the replica's bit in the index for blocks that fall off the
end — as the engine would have evicted them. Every block sent to a replica goes through the model, whichever
router sent it, since the engine's LRU sees them all.

Memory: a replica's LRU never holds more than its capacity, and capacity is capped at the index's own
``capacity_entries`` (a replica cannot be believed to hold more than the index remembers), so the model
costs at most ~100 bytes per block of each replica's modelled cache. A replica without a known capacity is
recorded without bound, as if there were no model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from router.prefix_index import PrefixIndex


class ResidencyModel:
    def __init__(self, index: PrefixIndex, cache_share: float = 0.8) -> None:
        if not 0 < cache_share <= 1:
            raise ValueError("cache_share must be in (0, 1]")
        self._index = index
        self._share = cache_share
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        self.evicted_blocks = 0

    def capacity_blocks(self, replica_id: str) -> int | None:
        """Blocks ``replica_id`` is modelled to hold; None while its capacity is unknown (recorded unbounded)."""
        return self._capacity.get(replica_id)

    @property
    def tracked_blocks(self) -> int:
        """Blocks held in the per-replica LRUs (the model's memory, in entries)."""
        return sum(map(len, self._lru.values()))

    def set_capacity(self, replica_id: str, kv_tokens: int, tokens_per_block: float) -> None:
        """Tell the model how many prompt blocks ``replica_id`` can hold (from its KV capacity); a smaller
        capacity than before trims the replica's LRU at once, so callers keep resizing off the request path."""
        if kv_tokens <= 0 or tokens_per_block <= 0:
            return
        capacity = max(1, min(int(kv_tokens * self._share / tokens_per_block), self._index.capacity_entries))
        self._capacity[replica_id] = capacity
        lru = self._lru.get(replica_id)
        if lru is not None and len(lru) > capacity:
            self._trim(replica_id, lru, capacity)

    def record(self, replica_id: str, hashes: Sequence[int]) -> None:
        """``hashes`` were sent to ``replica_id``: refresh them, and forget what its cache pushed out."""
        self._index.record(replica_id, hashes)
        capacity = self._capacity.get(replica_id)
        if capacity is None:
            return
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = OrderedDict()
        move = lru.move_to_end
        # Last block first, so a prompt's leading blocks are its most recent: the engine frees a request's
        # blocks tail first, the index orders its LRU the same way, and matching needs the leading blocks.
        for h in reversed(hashes):
            if h in lru:
                move(h)
            else:
                lru[h] = None
        if len(lru) > capacity:
            self._trim(replica_id, lru, capacity)

    def _trim(self, replica_id: str, lru: OrderedDict[int, None], capacity: int) -> None:
        gone = [lru.popitem(last=False)[0] for _ in range(len(lru) - capacity)]
        self.evicted_blocks += self._index.forget(replica_id, gone)

    def remove_replica(self, replica_id: str) -> None:
        """Drop the replica's LRU and capacity (the index forgets the replica itself)."""
        self._lru.pop(replica_id, None)
        self._capacity.pop(replica_id, None)
