"""One request inside an engine: its tokens, its KV progress and its timeline.

Mirrors vLLM V1's ``Request``: ``num_computed_tokens`` counts tokens whose KV is in cache (it drops
to 0 on preemption), ``num_tokens`` counts prompt plus generated tokens, and block hashes are kept
for every full 16-token block so the KV cache manager can find and publish cached prefixes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from emulator.block_hash import chain_block_hashes, hash_block, hash_opaque_block


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # the model emitted end-of-sequence
    LENGTH = "length"  # max_tokens (or the context length) reached
    ABORT = "abort"  # the client went away or the server aborted it


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """The parts of sampling that shape timing: how many tokens the request will generate.

    ``eos_after`` is the length at which the emulated model would emit end-of-sequence on its own
    (``None``: never). ``ignore_eos`` and ``min_tokens`` behave as in vLLM.
    """

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    eos_after: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")


@dataclass(eq=False, slots=True)
class EngineRequest:
    """A request and its engine-side state. Identity equality: one object per request."""

    request_id: str
    num_prompt_tokens: int
    sampling: SamplingParams
    arrival_time: float
    block_size: int
    #: Prompt token ids, or None when the caller supplies block hashes directly (the simulator
    #: replays traces that only carry prefix-block identities, never text).
    prompt_token_ids: Sequence[int] | None = None
    prompt_block_hashes: Sequence[int] | None = None
    priority: int = 0
    tenant: str = "default"
    cache_salt: str | None = None
    #: Seeds the generated token ids (and the hashes of generated blocks in hash-only mode).
    seed: int = 0

    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    #: Prompt tokens found in the prefix cache when the request was first scheduled (-1: not yet).
    num_cached_tokens: int = -1
    num_preemptions: int = 0

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1:
            raise ValueError("a request needs at least one prompt token")
        if self.prompt_token_ids is not None:
            if len(self.prompt_token_ids) != self.num_prompt_tokens:
                raise ValueError("num_prompt_tokens does not match prompt_token_ids")
            self.block_hashes = chain_block_hashes(self.prompt_token_ids, self.block_size, self.cache_salt)
        elif self.prompt_block_hashes is not None:
            if len(self.prompt_block_hashes) != self.num_prompt_tokens // self.block_size:
                raise ValueError("prompt_block_hashes must have one hash per full prompt block")
            self.block_hashes = list(self.prompt_block_hashes)
        else:
            raise ValueError("a request needs prompt_token_ids or prompt_block_hashes")

    # SchedulableRequest protocol -------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """Whether the next scheduled tokens are prompt (or recompute) tokens rather than a decode."""
        return self.num_tokens - self.num_computed_tokens > 1

    def append_output_token(self, token_id: int) -> None:
        """Record a generated token; hash the block it completes, if any."""
        if self.prompt_token_ids is None:
            self.append_opaque_tokens(1)
            return
        self.output_token_ids.append(token_id)
        self.num_output_tokens += 1
        n = self.num_tokens
        bs = self.block_size
        if n % bs:
            return
        parent = self.block_hashes[-1] if self.block_hashes else None
        start = n - bs
        p = self.num_prompt_tokens
        tokens = [self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p] for i in range(start, n)]
        self.block_hashes.append(hash_block(parent, tokens, self.cache_salt if start == 0 else None))

    def tokens_until_stop(self) -> int:
        """How many more tokens this request generates before it stops (its last one included)."""
        s = self.sampling
        limit = s.max_tokens
        if not s.ignore_eos and s.eos_after is not None:
            limit = min(limit, max(s.eos_after, s.min_tokens))
        return max(0, limit - self.num_output_tokens)

    def append_opaque_tokens(self, count: int) -> None:
        """Advance a hash-only request (no token ids) by ``count`` generated tokens at once."""
        if self.prompt_token_ids is not None:
            raise RuntimeError("append_opaque_tokens is for requests without token ids")
        bs = self.block_size
        before = self.num_tokens
        self.num_output_tokens += count
        after = self.num_tokens
        parent = self.block_hashes[-1] if self.block_hashes else None
        for end in range((before // bs + 1) * bs, after + 1, bs):
            parent = hash_opaque_block(parent, self.seed, end // bs - 1)
            self.block_hashes.append(parent)

    def stop_reason_after_token(self) -> FinishReason | None:
        """Whether the request is done now that it has ``num_output_tokens`` tokens."""
        s = self.sampling
        n = self.num_output_tokens
        if not s.ignore_eos and s.eos_after is not None and n >= max(s.eos_after, s.min_tokens):
            return FinishReason.STOP
        if n >= s.max_tokens:
            return FinishReason.LENGTH
        return None
