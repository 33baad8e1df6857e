"""Trace requests as the simulator needs them: prompt lengths and prefix-block identities, no text.

Mooncake ``hash_ids`` name 512-token prompt blocks, and equal leading ids mean an equal prefix (each id
appears at one position only), so an id alone identifies a block's content *and* everything before it.
The engine's 16-token blocks and the router's prefix-index blocks inside a trace block are therefore
keyed by ``(id, sub-block)`` without chaining. A truncated last trace block keeps the sub-blocks it
fully covers: a shorter truncation of the same block is a prefix of a longer one.

Requests without ``hash_ids`` (Azure) get keys unique to the request; turns of a synthetic session
get keys over the session's append-only token stream, so each turn shares the previous turns' prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from loadgen.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest

_TRACE = 0x51A1
_UNIQUE = 0x51A2
_SESSION = 0x51A3


def stable_hash(text: str) -> int:
    """A string's hash that does not depend on PYTHONHASHSEED (keeps runs reproducible)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") ^ _SESSION


@lru_cache(maxsize=1 << 18)
def _sub_block_keys(block_id: int, sub_blocks: int, domain: int) -> tuple[int, ...]:
    return tuple(hash((domain, block_id, j)) for j in range(sub_blocks))


def prefix_keys(
    request: TraceRequest, index: int, prompt_tokens: int, block_tokens: int, session_offset: int
) -> list[int]:
    """Keys of the full ``block_tokens``-token blocks of a request's prompt (see module docstring)."""
    if request.hash_ids is not None:
        per_id = MOONCAKE_BLOCK_TOKENS // block_tokens
        keys: list[int] = []
        full_ids = len(request.hash_ids) - 1
        for h in request.hash_ids[:full_ids]:
            keys.extend(_sub_block_keys(h, per_id, _TRACE))
        tail = prompt_tokens - full_ids * MOONCAKE_BLOCK_TOKENS
        keys.extend(_sub_block_keys(request.hash_ids[-1], per_id, _TRACE)[: tail // block_tokens])
        return keys
    if request.session_id is not None:
        sid = stable_hash(request.session_id)
        return [hash((sid, j)) for j in range((session_offset + prompt_tokens) // block_tokens)]
    return [hash((_UNIQUE, index, j)) for j in range(prompt_tokens // block_tokens)]


@dataclass(slots=True)
class SimRequest:
    """One request of the run; ``prompt_tokens`` includes any session history."""

    index: int
    trace: TraceRequest
    prompt_tokens: int
    output_tokens: int

    @property
    def arrival(self) -> float:
        return self.trace.arrival


def validate_trace(requests: Sequence[TraceRequest]) -> None:
    for i, r in enumerate(requests):
        if r.input_length < 1 or r.output_length < 1:
            raise ValueError(f"trace request {i}: input_length and output_length must be at least 1")
