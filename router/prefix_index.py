"""Which replica is believed to hold which prompt prefix, in a hard memory budget.

The router cannot see an engine's KV cache, but it knows what it sent where: after dispatching a request it
records the chained hashes of the prompt's fixed-size byte blocks against the chosen replica; for the next
request it asks, per replica, how many leading blocks were recorded there. Chaining makes a block's hash stand
for the whole prefix up to and including it, so one dict lookup per block answers "does this replica hold this
prefix", and a running AND of replica bitmasks walks all replicas at once.

Unbounded prefix indexes are a recurring production failure (production-stack's trie that never evicts,
SGLang's per-tenant tree size bug), so :class:`PrefixIndex` enforces its byte budget on every insert with an
LRU over whole entries, using a size model of CPython's dict layout checked against ``sys.getsizeof`` and
``tracemalloc`` in the tests.

Hashes are xxh3-64 with the previous block's hash as seed: stable across processes and machines (several
router processes share the index through Redis), and ~25 ns per 256-byte block; the Python call around it
dominates, which is why the block size is in bytes of prompt text (a few hundred) rather than vLLM's 16
tokens.
"""

from __future__ import annotations

import heapq
import struct
import sys
from array import array
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from itertools import accumulate, repeat, takewhile
from operator import and_
from typing import Any

import xxhash

__all__ = [
    "PrefixIndex",
    "chat_prompt_bytes",
    "completion_prompt_bytes",
    "prompt_block_hashes",
]

_xxh3: Callable[[Any, int], int] = xxhash.xxh3_64_intdigest


# -- hashing ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _block_struct(block_bytes: int) -> struct.Struct:
    return struct.Struct(f"{block_bytes}s")


def prompt_block_hashes(data: bytes | bytearray | memoryview, block_bytes: int) -> list[int]:
    """Chained 64-bit hashes of the full ``block_bytes``-sized blocks of ``data`` (a trailing partial block is
    not hashed): ``h[i] = xxh3_64(block[i], seed=h[i-1])``, seed 0 for the first block.

    ``struct.iter_unpack`` cuts the blocks in C; it copies each block into a small bytes object, which
    measured ~30 % faster than slicing a ``memoryview`` in a Python loop (per-block object creation dominates,
    not the copy). The input itself is never copied.
    """
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    view = memoryview(data).cast("B")
    usable = len(view) - len(view) % block_bytes
    if not usable:
        return []
    h = 0
    return [h := _xxh3(block, h) for (block,) in _block_struct(block_bytes).iter_unpack(view[:usable])]


# Control characters that do not occur in ordinary text delimit the rendering, so role and content
# boundaries cannot be confused and a conversation's rendering is a prefix of its next turn's.
_MESSAGE = "\x1e"  # record separator: starts every message
_FIELD = "\x1f"  # unit separator: ends the role (and separates a tool call's name from its arguments)
_NON_TEXT = "\x1d"  # group separator: starts the marker of a non-text part or a tool call
_TEXT_PART_TYPES = frozenset({"text", "input_text"})


def chat_prompt_bytes(messages: Sequence[Any]) -> bytes:
    """A canonical byte rendering of OpenAI chat ``messages`` for prefix hashing.

    Each message renders as ``\\x1e{role}\\x1f{content}``. Content may be a string or a list of parts; text
    parts are joined with ``"\\n"`` as vLLM joins them for string-format chat templates, so a single text part
    renders exactly like the equivalent string. A non-text part (image, audio, file) renders as a stable marker
    of its type only: hashing megabytes of base64 on the hot path is not worth it, at the price of treating two
    prompts that differ only in an image as sharing that block. An assistant's tool calls render as
    ``\\x1dtool_call\\x1f{name}\\x1f{arguments}`` because agentic prompts are mostly tool traffic. Malformed
    entries (non-mapping messages, non-string roles) are skipped rather than rejected: this is a routing hint,
    and the engine validates the request.
    """
    pieces: list[str] = []
    add = pieces.append
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = message.get("role")
        add(_MESSAGE)
        add(role if isinstance(role, str) else "")
        add(_FIELD)
        content = message.get("content")
        if isinstance(content, str):
            add(content)
        elif isinstance(content, list):
            _render_parts(content, add)
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping):
                    name, arguments = function.get("name"), function.get("arguments")
                    add(f"{_NON_TEXT}tool_call{_FIELD}")
                    add(name if isinstance(name, str) else "")
                    add(_FIELD)
                    add(arguments if isinstance(arguments, str) else "")
    return "".join(pieces).encode("utf-8", "surrogatepass")


def _render_parts(parts: list[Any], add: Callable[[str], None]) -> None:
    after_text = False
    for part in parts:
        if isinstance(part, str):
            text: object = part
        elif isinstance(part, Mapping):
            kind = part.get("type")
            text = part.get("text") if kind in _TEXT_PART_TYPES else None
            if not isinstance(text, str):
                add(_NON_TEXT)
                add(kind if isinstance(kind, str) else "")
                after_text = False
                continue
        else:
            continue
        if after_text:
            add("\n")
        add(text)  # type: ignore[arg-type]  # narrowed to str above
        after_text = True


_U32 = "I" if array("I").itemsize == 4 else "L"


def completion_prompt_bytes(prompt: str | Sequence[int]) -> bytes:
    """The bytes a completion prompt is hashed over: UTF-8 text, or token ids as little-endian uint32."""
    if isinstance(prompt, str):
        return prompt.encode("utf-8", "surrogatepass")
    try:
        ids = array(_U32, prompt)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()


# -- memory model ----------------------------------------------------------------------------------------------
#
# One entry costs, in CPython 3.11+ (64-bit):
#   key     a 64-bit hash as a Python int: sys.getsizeof 36 bytes, a 48-byte pymalloc block (16-byte aligned);
#   mask    the replica bitmask: assumed to be its own int object (new entries share the replica's bit object,
#           entries held by several replicas own one), 32 bytes up to 60 replica slots;
#   node    OrderedDict's linked-list node: 32 bytes;
#   table   the dict's hash table: per slot an index (2 bytes below 65536 slots) and a fast-node pointer
#           (8 bytes), plus a 24-byte entry per usable slot (2/3 of the slots).
# Under LRU churn a full shard of ``cap`` entries resizes, on every refill of its deleted slots, to the
# smallest power of two >= 3 * cap slots, so its steady-state size is known exactly; sizes on the way up are
# smaller. The budget takes the largest cap whose steady-state shard fits: ~190 bytes per entry when the cap
# sits just under a power-of-two boundary, more (up to ~270) just above one.
# ``tracemalloc`` sees slightly less (it counts the requested 36 bytes of a key, not the 48-byte block).

_KEY_BYTES = 48
_NODE_BYTES = 32
_REPLICA_BYTES = 256  # a replica's id, slot and bit object
_RESERVED_SLOTS = 60  # slots budgeted up front: masks of up to 60 bits are 32-byte ints
_FIXED_BYTES = 4096  # the index object, its shard list and counters
_SHARD_TARGET = 4096  # entries per shard: a shard's resize (~100 ns per entry) stays well under a millisecond


def _table_slots(entries: int) -> int:
    slots = 8
    while slots < 3 * entries:
        slots *= 2
    return slots


def _table_bytes(slots: int) -> int:
    index = 1 if slots <= 0xFF else 2 if slots <= 0xFFFF else 4 if slots <= 0xFFFFFFFF else 8
    return slots * (index + 8) + (2 * slots // 3) * 24


def _calibrate_shard_base() -> int:
    od: OrderedDict[int, int] = OrderedDict()
    od[1 << 63] = 1
    return sys.getsizeof(od) - _table_bytes(8) - _NODE_BYTES


_SHARD_BASE = _calibrate_shard_base()


def _shard_bytes(entries: int, object_bytes: int) -> int:
    """Steady-state bytes of one full shard of ``entries`` entries."""
    return _SHARD_BASE + _table_bytes(_table_slots(entries)) + entries * (_NODE_BYTES + object_bytes)


def _int_bytes(bits: int) -> int:
    """Allocated size of an int of ``bits`` bits (pymalloc rounds to 16 bytes)."""
    size = sys.getsizeof(1 << max(bits - 1, 31))
    return -(-size // 16) * 16


_od_get = OrderedDict.get
_od_move_to_end = OrderedDict.move_to_end


class PrefixIndex:
    """Block hash -> bitmask of replicas believed to hold the prefix ending at that block.

    Structure: ``shards`` ``OrderedDict[int, int]`` maps, picked by the hash's low bits, each an exact LRU
    (``move_to_end`` on use, ``popitem(last=False)`` to evict) with a per-shard entry cap derived from
    ``max_bytes``. An OrderedDict was chosen over a plain dict with generation stamps: refresh and eviction
    are single C calls, and a stamp would make every value a fresh int. Sharding exists because a CPython dict
    rehashes its whole table whenever churn uses up its free slots: a 350k-entry table (64 MiB) stalls the
    event loop ~30 ms each time, a shard of <= 5.5k entries ~0.1 ms, and shards are staggered so they do not
    all rehash during the same call. The price is ~2x the per-block cost of one big dict in ``match`` (a
    shard lookup per block, and a prompt's entries no longer adjacent in memory). Eviction is per shard,
    which approximates a global LRU closely since hashes spread uniformly.

    ``record`` walks the prompt's blocks last to first, so a prompt's leading blocks are its most recently
    used: eviction trims prompts from the tail and keeps the shared leading blocks (system prompts, earlier
    turns) that matching needs, since a match stops at the first missing block. Recency is refreshed by
    ``record`` and, on request, by ``match(touch=True)``; the router records every prompt it dispatches, which
    refreshes the same entries, so its hot path matches without touching.

    Replicas are slots in a Python int bitmask, so any number works. Removing a replica is O(1): its bit
    leaves the live mask at once (``match`` never reports it), and its stale bits are cleared lazily, one
    shard per subsequent ``record`` call; the slot is reused only after every shard has been swept.
    ``purge_removed`` does the whole sweep at once.

    Not thread-safe: one event loop owns it.
    """

    def __init__(self, max_bytes: int, block_bytes: int = 256, *, shards: int | None = None) -> None:
        if block_bytes <= 0:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        if shards is not None and (shards < 1 or shards & (shards - 1)):
            raise ValueError(f"shards must be a power of two, got {shards}")
        self.max_bytes = max_bytes
        self.block_bytes = block_bytes
        if shards is None:
            rough_entries = max(1, max_bytes // 200)
            shards = 1
            while shards * _SHARD_TARGET < rough_entries and shards < 4096:
                shards *= 2
        self._shards: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(shards)]
        self._shard_mask = shards - 1
        self._shard_cap = 0
        self._stagger: dict[int, int] = {}
        self._object_bytes = 0
        self._slots_budgeted = 0
        # Replica slots.
        self._slot_of: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._bits: list[int] = []
        self._free: list[int] = []  # heap: reuse low slots first so masks stay small
        self._live = 0
        self._dead = 0  # removed slots whose bits may still be in entries
        self._pending: deque[tuple[int, int]] = deque()  # (sweep count that frees it, slot)
        self._sweep_cursor = 0
        self._sweeps = 0
        # Counters.
        self._evictions = 0
        self._queries = 0
        self._query_blocks = 0
        self._hit_blocks = 0
        self._budget(_RESERVED_SLOTS)
        # Shards fill in lockstep, so left alone they would all resize their tables at about the same record,
        # every time: the single big stall sharding is meant to avoid. Once full, each shard burns a different
        # share of its free slots, spreading the resizes evenly over the refill period.
        period = 2 * _table_slots(self._shard_cap) // 3 - self._shard_cap
        self._stagger = {i: i * period // shards for i in range(1, shards)}

    # -- budget ---------------------------------------------------------------------------------------------

    def _budget(self, slots: int) -> None:
        """Size the per-shard cap for ``slots`` replica slots, evicting if it shrank."""
        object_bytes = _KEY_BYTES + _int_bytes(slots)
        per_shard = (self.max_bytes - _FIXED_BYTES - _REPLICA_BYTES * slots) // len(self._shards)
        lo, hi = 0, max(0, per_shard // (_NODE_BYTES + object_bytes))
        while lo < hi:  # largest cap whose steady-state shard fits
            mid = (lo + hi + 1) // 2
            if _shard_bytes(mid, object_bytes) <= per_shard:
                lo = mid
            else:
                hi = mid - 1
        if lo < 1:
            need = _FIXED_BYTES + _REPLICA_BYTES * slots + len(self._shards) * _shard_bytes(1, object_bytes)
            raise ValueError(
                f"max_bytes={self.max_bytes} is too small for {len(self._shards)} shard(s) and {slots} replica "
                f"slots; need at least {need}"
            )
        self._shard_cap = lo
        self._object_bytes = object_bytes
        self._slots_budgeted = slots
        table_limit = _SHARD_BASE + _table_bytes(_table_slots(lo))
        for i, shard in enumerate(self._shards):
            while len(shard) > lo:
                shard.popitem(last=False)
                self._evictions += 1
            if sys.getsizeof(shard) > table_limit + len(shard) * _NODE_BYTES:
                # A dict never shrinks its table: rebuild a shard whose table was sized for a larger cap.
                self._shards[i] = OrderedDict(shard)

    @property
    def capacity_entries(self) -> int:
        """Entries the budget holds (per-shard cap x shards)."""
        return self._shard_cap * len(self._shards)

    @property
    def num_entries(self) -> int:
        return sum(map(len, self._shards))

    def __len__(self) -> int:
        return self.num_entries

    @property
    def approx_bytes(self) -> int:
        """Estimated bytes held: the shards' real table sizes (``sys.getsizeof``) plus the modelled key and mask
        objects and replica bookkeeping; never above ``max_bytes``."""
        tables = sum(map(sys.getsizeof, self._shards))
        return _FIXED_BYTES + _REPLICA_BYTES * len(self._ids) + tables + self.num_entries * self._object_bytes

    @property
    def evictions(self) -> int:
        return self._evictions

    def stats(self) -> dict[str, int]:
        """Size, evictions, and matching totals: ``hit_blocks / query_blocks`` is the share of queried blocks
        some replica was believed to hold (the best replica's leading run per query)."""
        return {
            "entries": self.num_entries,
            "capacity_entries": self.capacity_entries,
            "approx_bytes": self.approx_bytes,
            "max_bytes": self.max_bytes,
            "evictions": self._evictions,
            "replicas": len(self._slot_of),
            "queries": self._queries,
            "query_blocks": self._query_blocks,
            "hit_blocks": self._hit_blocks,
        }

    # -- replicas -------------------------------------------------------------------------------------------

    @property
    def replicas(self) -> list[str]:
        return list(self._slot_of)

    def add_replica(self, replica_id: str) -> int:
        """Register ``replica_id`` (idempotent) and return its slot."""
        slot = self._slot_of.get(replica_id)
        if slot is not None:
            return slot
        if self._free:
            slot = heapq.heappop(self._free)
            self._ids[slot] = replica_id
        else:
            slot = len(self._ids)
            self._ids.append(replica_id)
            self._bits.append(1 << slot)
        self._slot_of[replica_id] = slot
        self._live |= self._bits[slot]
        if len(self._ids) > self._slots_budgeted:
            self._budget(max(len(self._ids), 2 * self._slots_budgeted))
        return slot

    def remove_replica(self, replica_id: str) -> None:
        """Forget ``replica_id`` at once for matching; its bits are swept lazily (see the class docstring)."""
        slot = self._slot_of.pop(replica_id, None)
        if slot is None:
            return
        bit = self._bits[slot]
        self._ids[slot] = None
        self._live &= ~bit
        self._dead |= bit
        self._pending.append((self._sweeps + len(self._shards), slot))

    def purge_removed(self) -> None:
        """Sweep every shard now, freeing removed replicas' slots (O(entries))."""
        for _ in range(len(self._shards)):
            if not self._dead:
                break
            self._sweep_step()

    def _sweep_step(self) -> None:
        shard = self._shards[self._sweep_cursor]
        dead = self._dead
        keep = ~dead
        stale = [(h, mask) for h, mask in shard.items() if mask & dead]
        for h, mask in stale:
            mask &= keep
            if mask:
                shard[h] = mask  # replacing a value keeps the entry's LRU position
            else:
                del shard[h]
        self._sweep_cursor = (self._sweep_cursor + 1) & self._shard_mask
        self._sweeps += 1
        pending = self._pending
        while pending and pending[0][0] <= self._sweeps:
            slot = pending.popleft()[1]
            self._dead &= ~self._bits[slot]
            heapq.heappush(self._free, slot)

    # -- recording and matching -----------------------------------------------------------------------------

    def hash_prompt(self, data: bytes | bytearray | memoryview) -> list[int]:
        """:func:`prompt_block_hashes` at this index's block size."""
        return prompt_block_hashes(data, self.block_bytes)

    def record(self, replica_id: str, hashes: Sequence[int]) -> None:
        """Mark every block of ``hashes`` as held by ``replica_id`` (registered on first use) and make them the
        most recently used, leading blocks last. Blocks beyond the index's capacity are not recorded."""
        slot = self._slot_of.get(replica_id)
        if slot is None:
            slot = self.add_replica(replica_id)
        bit = self._bits[slot]
        if len(hashes) > self.capacity_entries:
            hashes = hashes[: self.capacity_entries]
        shards, shard_mask, cap, live = self._shards, self._shard_mask, self._shard_cap, self._live
        stagger = self._stagger
        evicted = 0
        for h in reversed(hashes):
            shard = shards[h & shard_mask]
            mask = shard.get(h)
            if mask is None:
                shard[h] = bit
                if len(shard) > cap:
                    shard.popitem(last=False)
                    evicted += 1
                    if stagger:
                        self._stagger_step(h & shard_mask, shard)
            else:
                if not mask & bit:
                    shard[h] = (mask & live) | bit
                shard.move_to_end(h)
        self._evictions += evicted
        if self._dead:
            self._sweep_step()

    def _stagger_step(self, index: int, shard: OrderedDict[int, int]) -> None:
        """Burn a few more of a full shard's free entry slots, until its stagger offset is used up.

        Each burn inserts and deletes a key in C (``setdefault`` returns the key, since it is also the value,
        and ``pop`` removes it), one at a time, so a resize it triggers sees only the live entries and the
        table never outgrows its modelled size. Sixteen per eviction spreads the burn over the first refill.
        """
        left = self._stagger.get(index)
        if left is None:
            return
        burn = min(left, 16)
        if left > burn:
            self._stagger[index] = left - burn
        else:
            del self._stagger[index]
        deque(map(shard.pop, map(shard.setdefault, repeat(-1, burn), repeat(-1))), maxlen=0)  # -1: never a hash

    def forget(self, replica_id: str, hashes: Sequence[int]) -> int:
        """Clear ``replica_id``'s bit on ``hashes`` (e.g. when the engine reports the blocks evicted, or a
        request failed); entries no live replica holds are dropped. Returns how many blocks were cleared."""
        slot = self._slot_of.get(replica_id)
        if slot is None:
            return 0
        bit = self._bits[slot]
        shards, shard_mask, live = self._shards, self._shard_mask, self._live
        cleared = 0
        for h in hashes:
            shard = shards[h & shard_mask]
            mask = shard.get(h)
            if mask is None or not mask & bit:
                continue
            cleared += 1
            mask ^= bit
            if mask & live:
                shard[h] = mask
            else:
                del shard[h]
        return cleared

    def match(self, hashes: Sequence[int], *, touch: bool = False) -> dict[str, int]:
        """Leading blocks of ``hashes`` each replica is believed to hold; only replicas with at least one.

        The walk runs entirely in C (``map`` / ``accumulate`` / ``takewhile``): a running AND of the blocks'
        masks, starting from the live replicas, stops at the first block no replica holds, so a miss costs one
        lookup. Per-replica lengths come from binary searches over the running masks, one per distinct drop.
        ``touch`` also refreshes the matched blocks' LRU position (leading blocks most recent), which roughly
        doubles the cost; it is off by default because a dispatched prompt is recorded right after, and
        ``record`` refreshes the same entries.
        """
        self._queries += 1
        self._query_blocks += len(hashes)
        live = self._live
        if not hashes or not live:
            return {}
        shards, shard_mask = self._shards, self._shard_mask
        if shard_mask:
            shard_seq = map(shards.__getitem__, map(and_, hashes, repeat(shard_mask)))
            masks = map(_od_get, shard_seq, hashes, repeat(0))
        else:
            masks = map(shards[0].get, hashes, repeat(0))
        # runs[k] = live & mask[0] & ... & mask[k-1]: the replicas holding at least k leading blocks.
        runs = list(takewhile(bool, accumulate(masks, and_, initial=live)))
        matched = len(runs) - 1
        if not matched:
            return {}
        self._hit_blocks += matched
        result: dict[str, int] = {}
        ids = self._ids
        current = runs[matched]
        _assign(result, ids, current, matched)
        end = matched + 1
        while True:
            first = bisect_left(runs, True, 0, end, key=current.__eq__)  # where `current` starts
            if first <= 1:
                break  # replicas dropped at the first block hold nothing
            previous = runs[first - 1]
            _assign(result, ids, previous & ~current, first - 1)
            current, end = previous, first
        if touch:
            leading = hashes[matched - 1 :: -1]
            if shard_mask:
                shard_seq = map(shards.__getitem__, map(and_, leading, repeat(shard_mask)))
                deque(map(_od_move_to_end, shard_seq, leading), maxlen=0)
            else:
                deque(map(shards[0].move_to_end, leading), maxlen=0)
        return result


def _assign(result: dict[str, int], ids: list[str | None], bits: int, blocks: int) -> None:
    while bits:
        low = bits & -bits
        replica_id = ids[low.bit_length() - 1]
        if replica_id is not None:
            result[replica_id] = blocks
        bits ^= low
