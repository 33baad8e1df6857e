"""Request bodies of exactly the trace's length, and the growing context of a conversation.

Prompt text comes from the shared deterministic tokenizer (``emulator.tokenizer``): synthesised text is made
of space-led words, so pieces concatenate without merging and token counts add up exactly. That is what lets
the client know, without a round trip, how many prompt tokens it sends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final, Literal

from emulator.tokenizer import chat_overhead_tokens, get_tokenizer, synthesize_block, synthesize_prompt, synthesize_text
from loadgen.synthetic import derive_seed
from loadgen.traces import MOONCAKE_BLOCK_TOKENS, ChatMessage, TraceRequest

__all__ = ["ENDPOINT_PATHS", "Conversation", "Endpoint", "encode_body"]

Endpoint = Literal["completions", "chat"]
ENDPOINT_PATHS: Final[dict[str, str]] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_DUMPS: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _truncated_blocks(hash_ids: Sequence[int], num_tokens: int) -> str:
    """The first ``num_tokens`` tokens of a Mooncake prompt: whole blocks, then a cut one, so the shared
    prefixes of ``synthesize_prompt`` are kept when a chat template takes a few tokens of the budget."""
    parts: list[str] = []
    remaining = num_tokens
    for block in hash_ids:
        if remaining <= 0:
            break
        take = min(MOONCAKE_BLOCK_TOKENS, remaining)
        parts.append(synthesize_block(block, take))
        remaining -= take
    return "".join(parts)


class Conversation:
    """The prompt side of one session (a standalone request is a one-turn session).

    Each turn's prompt is the history (every earlier prompt piece and every reply received) followed by the
    turn's new content, so turn ``k + 1`` starts with exactly the tokens of turn ``k`` and its reply.
    """

    def __init__(self, endpoint: Endpoint, seed: int = 0) -> None:
        self.endpoint: Endpoint = endpoint
        self.seed = seed
        self._messages: list[ChatMessage] = []
        self._content_tokens = 0

    def _overhead(self, num_messages: int) -> int:
        return chat_overhead_tokens(num_messages) if self.endpoint == "chat" else 0

    def _new_content(self, request: TraceRequest, index: int) -> list[tuple[ChatMessage, int]]:
        """The turn's new messages with their token counts."""
        count = get_tokenizer().token_count
        if request.messages is not None:
            return [((role, text), count(text)) for role, text in request.messages]
        if request.prompt is not None:
            return [(("user", request.prompt), count(request.prompt))]
        budget = request.input_length - self._content_tokens - self._overhead(len(self._messages) + 1)
        tokens = max(0 if self.endpoint == "chat" or self._messages else 1, budget)
        return [(("user", synthesize_text(tokens, derive_seed(self.seed, "request", index))), tokens)]

    def prompt(self, request: TraceRequest, index: int) -> tuple[dict[str, Any], int]:
        """The body fields carrying the prompt of ``request`` (``prompt`` or ``messages``) and its exact
        length in tokens as the server will count it. ``index`` keys the filler text (unique per request)."""
        if request.hash_ids is not None:  # a Mooncake row carries its whole prompt, shared history included
            if self.endpoint == "completions":
                return {"prompt": synthesize_prompt(request.hash_ids, request.input_length)}, request.input_length
            tokens = max(0, request.input_length - chat_overhead_tokens(1))
            text = _truncated_blocks(request.hash_ids, tokens)
            return {"messages": [{"role": "user", "content": text}]}, tokens + chat_overhead_tokens(1)
        for message, tokens in self._new_content(request, index):
            self._messages.append(message)
            self._content_tokens += tokens
        total = self._content_tokens + self._overhead(len(self._messages))
        if self.endpoint == "completions":
            return {"prompt": "".join(text for _, text in self._messages)}, total
        return {"messages": [{"role": role, "content": text} for role, text in self._messages]}, total

    def add_reply(self, text: str, tokens: int) -> None:
        """Append the reply to the last turn, as received, so the next turn can hit its cached blocks."""
        self._messages.append(("assistant", text))
        self._content_tokens += tokens


def encode_body(fields: dict[str, Any], model: str | None, output_length: int) -> bytes:
    """The JSON body: a forced reply of exactly ``output_length`` tokens, streamed with a usage chunk."""
    body: dict[str, Any] = {"model": model} if model else {}
    body.update(fields)
    body.update(
        {
            "max_tokens": output_length,
            "min_tokens": output_length,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    return _DUMPS(body).encode()
