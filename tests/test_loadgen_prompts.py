"""Prompt construction (exact token counts, shared prefixes, conversation history) and SSE chunk parsing."""

from __future__ import annotations

import json

import pytest

from emulator.tokenizer import chat_overhead_tokens, get_tokenizer, synthesize_prompt, synthesize_text
from loadgen.prompts import Conversation, encode_body
from loadgen.sse import StreamState
from loadgen.traces import TraceRequest

TOK = get_tokenizer()


def sent_tokens(fields: dict[str, object]) -> list[int]:
    """Token ids the emulated replica will see for these body fields."""
    if "prompt" in fields:
        return TOK.encode(str(fields["prompt"]))
    return TOK.render_chat(fields["messages"])  # type: ignore[arg-type]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("input_length", [3, 4, 511, 512, 513, 1030, 5000])
def test_mooncake_rows_are_exact_and_share_prefixes(endpoint: str, input_length: int) -> None:
    blocks = -(-input_length // 512)
    a = TraceRequest(0.0, input_length, 5, hash_ids=tuple(range(100, 100 + blocks)))
    b = TraceRequest(0.0, input_length, 5, hash_ids=(100, *range(900, 900 + blocks - 1)))
    fields_a, count_a = Conversation(endpoint).prompt(a, 0)  # type: ignore[arg-type]
    fields_b, _ = Conversation(endpoint).prompt(b, 1)  # type: ignore[arg-type]
    ids_a, ids_b = sent_tokens(fields_a), sent_tokens(fields_b)
    assert len(ids_a) == count_a == input_length
    shared = min(512 + (1 if endpoint == "chat" else 0), input_length - (2 if endpoint == "chat" else 0))
    assert ids_a[:shared] == ids_b[:shared]
    if endpoint == "completions":
        assert fields_a["prompt"] == synthesize_prompt(a.hash_ids or (), input_length)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_plain_rows_get_unique_exact_filler(endpoint: str) -> None:
    row = TraceRequest(0.0, 300, 5)
    fields_1, count_1 = Conversation(endpoint, seed=1).prompt(row, 0)  # type: ignore[arg-type]
    fields_2, _ = Conversation(endpoint, seed=1).prompt(row, 1)  # type: ignore[arg-type]
    fields_3, _ = Conversation(endpoint, seed=1).prompt(row, 0)  # type: ignore[arg-type]
    assert len(sent_tokens(fields_1)) == count_1 == 300
    assert fields_1 != fields_2 and fields_1 == fields_3


def test_chat_minimum_is_the_template() -> None:
    """Below chat_overhead_tokens(1) = 3 tokens a chat prompt cannot shrink: the content is empty."""
    fields, count = Conversation("chat").prompt(TraceRequest(0.0, 1, 5), 0)
    assert count == chat_overhead_tokens(1) == 3
    assert fields == {"messages": [{"role": "user", "content": ""}]}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_conversation_history_is_a_prefix(endpoint: str) -> None:
    system, user1, user2 = synthesize_text(40, 1), synthesize_text(30, 2), synthesize_text(20, 3)
    conversation = Conversation(endpoint)  # type: ignore[arg-type]
    turn0 = TraceRequest(0.0, 70, 10, session_id="s", messages=(("system", system), ("user", user1)))
    turn1 = TraceRequest(0.0, 100, 10, session_id="s", turn=1, messages=(("user", user2),))
    fields0, count0 = conversation.prompt(turn0, 0)
    ids0 = sent_tokens(fields0)
    assert len(ids0) == count0 == 70 + (chat_overhead_tokens(2) if endpoint == "chat" else 0)
    reply = "".join(TOK.decode([300 + i]) for i in range(10))
    conversation.add_reply(reply, 10)
    fields1, count1 = conversation.prompt(turn1, 1)
    ids1 = sent_tokens(fields1)
    assert len(ids1) == count1 == 100 + (chat_overhead_tokens(4) if endpoint == "chat" else 0)
    assert ids1[: len(ids0)] == ids0  # the whole previous turn (ending in <|assistant|> for chat) is cached
    assert ids1[len(ids0) : len(ids0) + 10] == [300 + i for i in range(10)]  # then the reply, as generated
    if endpoint == "chat":
        assert [m["role"] for m in fields1["messages"]] == ["system", "user", "assistant", "user"]


def test_length_only_turns_fill_up_to_input_length() -> None:
    conversation = Conversation("chat")
    _, first = conversation.prompt(TraceRequest(0.0, 50, 4, session_id="s"), 0)
    conversation.add_reply(synthesize_text(4, 9), 4)
    fields, second = conversation.prompt(TraceRequest(0.0, 80, 4, session_id="s", turn=1), 1)
    assert (first, second) == (50, 80)
    assert len(sent_tokens(fields)) == 80


def test_body() -> None:
    body = json.loads(encode_body({"prompt": "x"}, "m", 7))
    assert body == {
        "model": "m",
        "prompt": "x",
        "max_tokens": 7,
        "min_tokens": 7,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "model" not in json.loads(encode_body({"prompt": "x"}, None, 1))


# ---------------------------------------------------------------------------------------------------------
# SSE chunks
# ---------------------------------------------------------------------------------------------------------


def chunk(**fields: object) -> bytes:
    return json.dumps({"id": "cmpl-1", "object": "text_completion", **fields}, separators=(",", ":")).encode()


def test_completion_stream_timing() -> None:
    state = StreamState(start=10.0)
    state.feed(chunk(choices=[{"index": 0, "text": " ba", "finish_reason": None}]), 10.5)
    state.feed(chunk(choices=[{"index": 0, "text": "", "finish_reason": None}]), 10.6)  # no content: no tick
    state.feed(chunk(choices=[{"index": 0, "text": " bo", "finish_reason": None}]), 10.7)
    state.feed(chunk(choices=[{"index": 0, "text": " bi", "finish_reason": "length"}]), 11.0)
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}}
    state.feed(chunk(choices=[], usage=usage), 11.0)
    assert not state.finished
    state.feed(b"[DONE]", 11.1)
    assert state.finished and state.error is None
    assert state.ttft == pytest.approx(0.5)
    assert state.itls == pytest.approx([0.2, 0.3])
    assert (state.chunks, state.output_tokens, state.prompt_tokens, state.cached_tokens) == (3, 3, 12, 8)
    assert state.texts == []  # not kept unless asked


def test_chat_stream_role_chunk_and_text() -> None:
    state = StreamState(start=0.0, want_text=True)
    state.feed(chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}]), 0.1)
    state.feed(chunk(choices=[{"index": 0, "delta": {"content": " ka"}}], usage=None), 0.2)
    state.feed(chunk(choices=[{"index": 0, "delta": {"content": ' "q"'}}]), 0.25)
    state.feed(b'{"choices": [{"delta": {"content": " spaced"}}], "usage": null}', 0.3)  # not compact JSON
    assert state.ttft == pytest.approx(0.2) and state.itls == pytest.approx([0.05, 0.05])
    assert state.texts == [" ka", ' "q"', " spaced"]


def test_fast_path_matches_full_parse() -> None:
    payloads = [
        chunk(choices=[{"index": 0, "text": "x", "logprobs": None}]),
        chunk(choices=[{"index": 0, "text": "", "finish_reason": "length"}]),
        chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
        chunk(choices=[{"index": 0, "delta": {"reasoning_content": "hm", "content": ""}}]),
        chunk(choices=[{"index": 0, "delta": {"content": None, "tool_calls": []}}]),
        chunk(choices=[{"index": 0, "delta": {"content": '"text":""'}}]),  # escaped on the wire
        chunk(choices=[{"index": 0, "text": '"content":""'}]),
    ]
    for payload in payloads:
        fast, full = StreamState(0.0), StreamState(0.0, want_text=True)
        fast.feed(payload, 1.0)
        full.feed(payload, 1.0)
        assert fast.chunks == full.chunks, payload


def test_stream_errors() -> None:
    state = StreamState(0.0)
    state.feed(b'{"error": {"message": "the engine failed", "type": "InternalServerError", "code": 500}}', 1.0)
    assert state.finished and state.error == "error in stream: the engine failed"
    broken = StreamState(0.0)
    broken.feed(b'{"choices": [', 1.0)
    assert broken.error is not None and broken.error.startswith("malformed stream chunk")
