"""Chained hashes of full KV blocks, as vLLM's prefix cache computes them.

A block's hash covers its parent's hash and its own token ids, so equal hashes imply equal whole
prefixes. ``cache_salt`` enters the first block only (vLLM's ``extra_keys``), isolating tenants that
must not share cache. Python's ``hash`` of ints and tuples does not depend on PYTHONHASHSEED, so the
chain is stable across processes; salts (strings) go through blake2b for the same reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: Parent of the first block (vLLM draws NONE_HASH at random per process; a constant keeps ours
#: reproducible across runs and processes).
NONE_HASH = 0x5EED_F1EE_7A0B_C0DE


def _salt_key(cache_salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(cache_salt.encode(), digest_size=8).digest(), "little")


def hash_block(parent: int | None, token_ids: Sequence[int], cache_salt: str | None = None) -> int:
    """Hash one full block given its parent's hash (None for the first block)."""
    extra = _salt_key(cache_salt) if cache_salt else 0
    return hash((NONE_HASH if parent is None else parent, tuple(token_ids), extra))


# Integer tags keep the tuples free of strings, whose hash() varies with PYTHONHASHSEED.
_OPAQUE_TAG = 0x0B1A
_KEY_TAG = 0x0B1B


def hash_opaque_block(parent: int | None, seed: int, index: int) -> int:
    """Hash of a block whose tokens are not materialised (simulator): unique per (seed, index)."""
    return hash((NONE_HASH if parent is None else parent, _OPAQUE_TAG, seed, index))


def chain_block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None) -> list[int]:
    """Hashes of every full block of ``token_ids``; a trailing partial block is not hashed."""
    hashes: list[int] = []
    parent: int | None = None
    salt = _salt_key(cache_salt) if cache_salt else 0
    tokens = tuple(token_ids)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((NONE_HASH if parent is None else parent, tokens[start : start + block_size], salt))
        hashes.append(parent)
        salt = 0
    return hashes


def chain_opaque_block_hashes(block_keys: Sequence[int], parent: int | None = None) -> list[int]:
    """Chain arbitrary per-block keys (e.g. trace hash ids expanded to 16-token blocks)."""
    hashes: list[int] = []
    for key in block_keys:
        parent = hash((NONE_HASH if parent is None else parent, _KEY_TAG, key))
        hashes.append(parent)
    return hashes
