"""Binary encodings of what routers exchange through Redis: small, fixed layouts, no JSON on the busy paths.

Replicas are named by a 64-bit hash of their URL (:func:`replica_key`): every router discovers the same
replicas, so each maps the hash back to a URL it knows, and a record costs 8 bytes instead of a URL.
Everything is little-endian.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import xxhash

from router.engine_metrics import EngineSignals
from router.fleet import RemoteLoad

__all__ = [
    "Batch",
    "decode_batch",
    "decode_load",
    "decode_prefix_member",
    "decode_signals",
    "decode_snapshot",
    "encode_batch",
    "encode_load",
    "encode_signals",
    "encode_snapshot",
    "prefix_member",
    "replica_key",
]

_U64 = "Q"
_BIG_ENDIAN = sys.byteorder == "big"


def replica_key(url: str) -> int:
    """Stable 64-bit name of a replica URL, the same in every router process."""
    return xxhash.xxh3_64_intdigest(url.encode())


# -- per-router load -----------------------------------------------------------------------------------------
# One entry per replica: replica key, requests, prefill, decode, kv and new-prefill tokens (int64 each), prefill
# attention and TPOT sensitivity (float64). An entry of zero requests says "nothing in flight here any more".
_LOAD = struct.Struct("<Q5q2d")
_SEQ = struct.Struct("<Q")


def encode_load(loads: Iterable[tuple[int, RemoteLoad]]) -> bytes:
    pack = _LOAD.pack
    return b"".join(
        pack(
            key,
            v.requests,
            v.prefill_tokens,
            v.decode_tokens,
            v.kv_tokens,
            v.prefill_new_tokens,
            v.prefill_attention,
            v.tpot_sensitivity,
        )
        for key, v in loads
    )


def decode_load(data: bytes | memoryview) -> Iterator[tuple[int, RemoteLoad]]:
    usable = len(data) - len(data) % _LOAD.size
    for key, requests, prefill, decode, kv, new, attention, sensitivity in _LOAD.iter_unpack(memoryview(data)[:usable]):
        yield key, RemoteLoad(requests, prefill, decode, kv, new, attention, sensitivity)


def encode_snapshot(seq: int, loads: Iterable[tuple[int, RemoteLoad]]) -> bytes:
    """A router's whole accounting as one value (SET is atomic, so readers see one consistent snapshot), with
    the sequence number that orders it against the partial updates sent over pub/sub."""
    return _SEQ.pack(seq) + encode_load(loads)


def decode_snapshot(data: bytes) -> tuple[int, list[tuple[int, RemoteLoad]]]:
    if len(data) < _SEQ.size:
        raise ValueError("truncated load snapshot")
    (seq,) = _SEQ.unpack_from(data)
    return seq, list(decode_load(memoryview(data)[_SEQ.size :]))


# -- prefix index entries in the Redis sorted set ------------------------------------------------------------
_MEMBER = struct.Struct("<QQ")


def prefix_member(block_hash: int, replica: int) -> bytes:
    """Sorted-set member of one (block, replica) pair: 16 bytes."""
    return _MEMBER.pack(block_hash, replica)


def decode_prefix_member(member: bytes) -> tuple[int, int]:
    block_hash, replica = _MEMBER.unpack(member)
    return block_hash, replica


# -- pub/sub batches -----------------------------------------------------------------------------------------
# Header: sender (u64), load sequence number (u64), load entry, prefix record and session binding counts (u32).
# Load entry: as in a snapshot, for the replicas whose accounting changed since the sender's previous batch.
# Prefix record: replica key (u64), block count (u32), then that many u64 block hashes.
# Session binding: replica key (u64), id length (u16), the id in UTF-8.
_HEADER = struct.Struct("<QQIII")
_RECORD = struct.Struct("<QI")
_SESSION = struct.Struct("<QH")


@dataclass(slots=True)
class Batch:
    """What one router publishes at once: changed load entries, prefix records and session bindings."""

    sender: int
    seq: int = 0
    loads: list[tuple[int, RemoteLoad]] = field(default_factory=list)
    records: list[tuple[int, Sequence[int]]] = field(default_factory=list)
    sessions: list[tuple[str, int]] = field(default_factory=list)


def _u64_bytes(values: Sequence[int]) -> bytes:
    arr = array(_U64, values)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def encode_batch(batch: Batch) -> bytes:
    parts = [_HEADER.pack(batch.sender, batch.seq, len(batch.loads), len(batch.records), len(batch.sessions))]
    parts.append(encode_load(batch.loads))
    for replica, hashes in batch.records:
        parts.append(_RECORD.pack(replica, len(hashes)))
        parts.append(_u64_bytes(hashes))
    for session_id, replica in batch.sessions:
        sid = session_id.encode("utf-8", "surrogatepass")[:0xFFFF]
        parts.append(_SESSION.pack(replica, len(sid)))
        parts.append(sid)
    return b"".join(parts)


def decode_batch(data: bytes) -> Batch:
    """Inverse of :func:`encode_batch`; raises ``ValueError`` on a truncated or malformed message."""
    try:
        view = memoryview(data)
        sender, seq, n_loads, n_records, n_sessions = _HEADER.unpack_from(view, 0)
        at = _HEADER.size
        batch = Batch(sender, seq)
        end = at + n_loads * _LOAD.size
        if end > len(view):
            raise ValueError("truncated load entries")
        batch.loads.extend(decode_load(view[at:end]))
        at = end
        for _ in range(n_records):
            replica, count = _RECORD.unpack_from(view, at)
            at += _RECORD.size
            end = at + 8 * count
            if end > len(view):
                raise ValueError("truncated prefix record")
            hashes = array(_U64)
            hashes.frombytes(view[at:end])
            if _BIG_ENDIAN:
                hashes.byteswap()
            batch.records.append((replica, hashes.tolist()))
            at = end
        for _ in range(n_sessions):
            replica, length = _SESSION.unpack_from(view, at)
            at += _SESSION.size
            if at + length > len(view):
                raise ValueError("truncated session binding")
            batch.sessions.append((bytes(view[at : at + length]).decode("utf-8", "surrogatepass"), replica))
            at += length
    except struct.error as exc:
        raise ValueError(f"malformed batch: {exc}") from None
    return batch


# -- scraped engine signals ----------------------------------------------------------------------------------
_SIGNAL_FIELDS = (
    "num_running",
    "num_waiting",
    "kv_usage",
    "kv_capacity_tokens",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_preemptions",
)


def encode_signals(signals: EngineSignals, wall_time: float) -> bytes:
    """A scrape's signals and its wall-clock time (readers keep the scrape's age)."""
    return json.dumps([wall_time, *(getattr(signals, name) for name in _SIGNAL_FIELDS)]).encode()


def decode_signals(data: bytes) -> tuple[EngineSignals, float]:
    """Inverse of :func:`encode_signals`; raises ``ValueError`` on anything else."""
    values = json.loads(data)
    if not isinstance(values, list) or len(values) != 1 + len(_SIGNAL_FIELDS):
        raise ValueError("malformed signals")
    wall_time, *rest = values
    if not isinstance(wall_time, (int, float)) or not all(v is None or isinstance(v, (int, float)) for v in rest):
        raise ValueError("malformed signals")
    kwargs = dict(zip(_SIGNAL_FIELDS, rest, strict=True))
    capacity = kwargs["kv_capacity_tokens"]
    kwargs["kv_capacity_tokens"] = None if capacity is None else int(capacity)
    return EngineSignals(**kwargs), float(wall_time)
