"""Read what routing needs from an OpenAI request body, once, and nothing more.

The body is forwarded as received, never re-serialised; a replica group whose engine order travels in
vLLM's ``priority`` field gets that one member appended (router/engine_config.py).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from router.api_errors import ApiError, bad_request, load_json_object
from router.prefix_index import chat_prompt_bytes

TENANT_HEADER = "X-Tenant-Id"
SESSION_HEADER = "X-Session-Id"


@dataclass(slots=True)
class ParsedRequest:
    kind: str  # "completion" | "chat"
    body: dict[str, Any]
    model: str | None
    stream: bool
    max_tokens: int | None
    prompt_bytes: bytes
    tenant: str
    session_id: str | None
    priority: int


def _int_field(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"'{key}' must be a positive integer", key)
    return value


def _completion_prompt_bytes(prompt: Any) -> bytes:
    if isinstance(prompt, str):
        return prompt.encode()
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return array("I", [t & 0xFFFFFFFF for t in prompt]).tobytes()
        # Several prompts in one request: route on their concatenation.
        return b"\x1d".join(_completion_prompt_bytes(p) for p in prompt)
    raise bad_request("'prompt' must be a string, a list of token ids, or a list of those", "prompt")


def parse_request(kind: str, raw: bytes, headers: dict[str, str] | Any) -> ParsedRequest:
    """Validate the fields the router relies on; the engine validates the rest."""
    body = load_json_object(raw)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    if kind == "completion":
        if "prompt" not in body:
            raise bad_request("'prompt' is required", "prompt")
        prompt_bytes = _completion_prompt_bytes(body["prompt"])
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise bad_request("'messages' must be a non-empty list of message objects", "messages")
        prompt_bytes = chat_prompt_bytes(messages)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    max_tokens = _int_field(body, "max_completion_tokens") or _int_field(body, "max_tokens")
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise bad_request("'priority' must be an integer", "priority")
    user = body.get("user")
    tenant = headers.get(TENANT_HEADER) or (user if isinstance(user, str) and user else None) or "default"
    return ParsedRequest(
        kind=kind,
        body=body,
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        prompt_bytes=prompt_bytes,
        tenant=tenant,
        session_id=headers.get(SESSION_HEADER),
        priority=priority,
    )


__all__ = ["ApiError", "ParsedRequest", "parse_request"]
