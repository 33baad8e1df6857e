"""The OpenAI-compatible request and response formats, vLLM flavour, for the emulated replica.

Parsing validates exactly what vLLM would reject (types, ranges, context length) and ignores sampling
knobs that do not change timing (temperature, top_p, …). Errors use the OpenAI error object.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emulator.tokenizer import Tokenizer
from router.api_errors import ApiError, bad_request, load_json_object


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated completion or chat request, reduced to what the engine needs."""

    kind: str  # "completion" | "chat"
    model: str
    prompt_token_ids: list[int]
    max_tokens: int | None
    min_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    priority: int
    tenant: str
    cache_salt: str | None
    seed: int | None


def _opt_int(body: Mapping[str, Any], key: str, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer", key)
    if minimum is not None and value < minimum:
        raise bad_request(f"'{key}' must be at least {minimum}, got {value}", key)
    return value


def _opt_bool(body: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be a boolean", key)
    return value


def _is_token_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompt_ids(body: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required", "prompt")
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif _is_token_list(prompt) and prompt:
        ids = list(prompt)
        if min(ids) < 0 or max(ids) >= tokenizer.vocab_size:
            raise bad_request(f"prompt token ids must be in [0, {tokenizer.vocab_size})", "prompt")
    elif isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_list(prompt[0])):
        return _prompt_ids({"prompt": prompt[0]}, tokenizer)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request(
            "batched prompts (a list of several prompts) are not supported; send one per request", "prompt"
        )
    else:
        raise bad_request("'prompt' must be a string, a list of token ids, or a list with one of those", "prompt")
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    return ids


def _chat_ids(body: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", "messages")
    try:
        return tokenizer.render_chat(messages, add_generation_prompt=_opt_bool(body, "add_generation_prompt", True))
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None


def parse_generation_request(
    kind: str, raw: bytes, tokenizer: Tokenizer, served_models: Sequence[str], tenant_header: str | None
) -> GenerationRequest:
    """Validate a ``/v1/completions`` (kind ``completion``) or ``/v1/chat/completions`` (``chat``) body."""
    body = load_json_object(raw)
    model = body.get("model")
    if model is None:
        model = served_models[0]  # vLLM serves the default model when none is named
    elif not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    elif model not in served_models:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model")
    n = _opt_int(body, "n", 1)
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported by the emulator", "n")
    ids = _prompt_ids(body, tokenizer) if kind == "completion" else _chat_ids(body, tokenizer)
    max_tokens = _opt_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1)
    min_tokens = _opt_int(body, "min_tokens", 0) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({min_tokens}) must be less than or equal to max_tokens ({max_tokens})", "min_tokens"
        )
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    stream = _opt_bool(body, "stream")
    if options and not stream:
        raise bad_request("stream_options can only be set when stream is true", "stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("'user' must be a string", "user")
    cache_salt = body.get("cache_salt")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise bad_request("'cache_salt' must be a non-empty string", "cache_salt")
    return GenerationRequest(
        kind=kind,
        model=model,
        prompt_token_ids=ids,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=_opt_bool(body, "ignore_eos"),
        stream=stream,
        include_usage=bool(options and _opt_bool(options, "include_usage")),
        continuous_usage=bool(options and _opt_bool(options, "continuous_usage_stats")),
        priority=_opt_int(body, "priority") or 0,
        tenant=tenant_header or user or "default",
        cache_salt=cache_salt,
        seed=_opt_int(body, "seed"),
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": max(cached_tokens, 0)},
    }


class ResponseBuilder:
    """Builds the response objects of one request (ids, timestamps and model fixed per request)."""

    def __init__(self, kind: str, request_id: str, model: str) -> None:
        self.kind = kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def final(self, text: str, finish_reason: str, usage_obj: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
            body = self._envelope("chat.completion")
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
            body = self._envelope("text_completion")
        body["choices"] = [choice]
        body["usage"] = usage_obj
        return body

    def chunk(self, text: str | None, finish_reason: str | None, usage_obj: dict[str, Any] | None) -> dict[str, Any]:
        """One SSE chunk. ``text=None`` with chat builds the opening role chunk."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if text is None else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion")
        if finish_reason is not None:
            choice["stop_reason"] = None
        body["choices"] = [choice]
        if usage_obj is not None:
            body["usage"] = usage_obj
        return body

    def usage_chunk(self, usage_obj: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = []
        body["usage"] = usage_obj
        return body
