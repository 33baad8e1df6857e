"""What each engine probably still caches: the router's model of every replica's LRU prefix cache.

The prefix index remembers where each prompt block was *sent*; the engine forgets blocks as its LRU
cache turns over. Without a model of that, routing chases prefixes that are long gone (in simulation a
quarter of believed matches were stale). The model keeps, per replica, the blocks sent there in LRU
order, bounded by what the replica's KV can hold (``capacity_blocks``, from its ``cache_config_info``,
scaled by ``cache_share`` because generated tokens and running requests take KV too), and clears the
replica's bit in the index for blocks that fall off the end — as the engine would have evicted them.
Memory is bounded by the replicas' own KV capacity.
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

    def set_capacity(self, replica_id: str, kv_tokens: int, tokens_per_block: float) -> None:
        """Tell the model how many prompt blocks ``replica_id`` can hold (from its KV capacity)."""
        if kv_tokens > 0 and tokens_per_block > 0:
            self._capacity[replica_id] = max(1, int(kv_tokens * self._share / tokens_per_block))

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
        for h in hashes:
            if h in lru:
                move(h)
            else:
                lru[h] = None
        excess = len(lru) - capacity
        if excess > 0:
            gone = [lru.popitem(last=False)[0] for _ in range(excess)]
            self.evicted_blocks += self._index.forget(replica_id, gone)

    def remove_replica(self, replica_id: str) -> None:
        self._lru.pop(replica_id, None)
        self._capacity.pop(replica_id, None)
