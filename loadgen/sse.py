"""Timing one streamed OpenAI response, chunk by chunk, at the lowest parsing cost we can get away with.

The client shares its cores with the replicas under test, so most chunks are not decoded at all: a content
chunk is recognised from the compact ``"text":"`` / ``"content":"`` bytes, and only chunks that carry usage,
an error, an unfamiliar layout, or text we must keep (a reply sent back in the next turn) go through
``json.loads``. Timestamps are taken by the caller when the bytes arrive, before any parsing.
"""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ["StreamState", "error_message"]

_CONTENT_KEYS: Final = (b'"text":"', b'"content":"')
_QUOTE: Final = ord('"')


def _fast_content(payload: bytes) -> bool | None:
    """Whether a compact chunk carries text (its string value is non-empty); None if it cannot tell."""
    for key in _CONTENT_KEYS:
        at = payload.find(key)
        if at >= 0:
            end = at + len(key)
            return end < len(payload) and payload[end] != _QUOTE
    return None


def error_message(obj: object) -> str:
    """The message of an OpenAI error object (``{"error": {"message": ...}}``, or a bare ``message``)."""
    if isinstance(obj, dict):
        inner = obj.get("error", obj)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return json.dumps(obj)[:300]


class StreamState:
    """What one SSE response has delivered so far: feed it each ``data:`` payload with its arrival time."""

    __slots__ = (
        "cached_tokens",
        "chunks",
        "done",
        "error",
        "itls",
        "last",
        "output_tokens",
        "prompt_tokens",
        "start",
        "texts",
        "ttft",
        "want_text",
    )

    def __init__(self, start: float, want_text: bool = False) -> None:
        self.start = start
        self.want_text = want_text
        self.ttft: float | None = None
        self.last = start
        self.itls: list[float] = []
        self.chunks = 0
        self.texts: list[str] = []
        self.output_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.cached_tokens = 0
        self.error: str | None = None
        self.done = False

    @property
    def finished(self) -> bool:
        """``[DONE]`` or an error: nothing more to read."""
        return self.done or self.error is not None

    def _content(self, now: float) -> None:
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itls.append(now - self.last)
        self.last = now
        self.chunks += 1

    def feed(self, payload: bytes, now: float) -> None:
        """One ``data:`` payload (without the prefix), received at ``now``."""
        if payload == b"[DONE]":
            self.done = True
            return
        if not self.want_text and b'"error"' not in payload:
            has_usage = b'"usage"' in payload and b'"usage":null' not in payload
            fast = None if has_usage else _fast_content(payload)
            if fast is not None:
                if fast:
                    self._content(now)
                return
        try:
            obj = json.loads(payload)
        except ValueError:
            self.error = f"malformed stream chunk: {payload[:200]!r}"
            return
        if isinstance(obj, dict):
            self._parsed(obj, now)

    def _parsed(self, obj: dict[str, Any], now: float) -> None:
        if "error" in obj and not obj.get("choices"):
            self.error = f"error in stream: {error_message(obj)}"
            return
        choices = obj.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            text = choice.get("text") if "text" in choice else delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                self._content(now)
                if self.want_text:
                    self.texts.append(text)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            completion = usage.get("completion_tokens")
            if isinstance(completion, int):
                self.output_tokens = completion
            prompt = usage.get("prompt_tokens")
            if isinstance(prompt, int):
                self.prompt_tokens = prompt
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            if isinstance(cached, int):
                self.cached_tokens = cached
