"""Properties of the shared deterministic tokenizer (emulator/tokenizer.py, docs/tokenizer.md)."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.tokenizer import (
    BARE_WORD_BASE,
    NUM_WORDS,
    SPACE_WORD_BASE,
    SPECIAL_BASE,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    WORDS,
    Tokenizer,
    chat_overhead_tokens,
    get_tokenizer,
    output_token_id,
    synthesize_block,
    synthesize_prompt,
    synthesize_text,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TOK = get_tokenizer()

# Fragments that exercise every pre-tokeniser rule and its boundaries: words with and without a space,
# unknown letter runs, digits, whitespace runs, specials and partial specials, punctuation, non-ASCII.
FRAGMENTS = [
    "ba",
    " ba",
    "bak",
    " bakon",
    "kobe",
    " zuzus",
    "Hello",
    " xyz",
    "q",
    "7",
    "2024",
    " ",
    "  ",
    "\n",
    "\t",
    "\r\n",
    "\xa0",
    "\u3000",
    "<",
    "|",
    ">",
    "<|",
    "<|us",
    "er|>",
    "<|ass",
    *SPECIAL_TOKENS,
    ",",
    ".",
    "é",
    "日本",
    "😀",
    "\x00",
]
tokenizer_text = st.one_of(
    st.text(),
    st.lists(st.sampled_from(FRAGMENTS), max_size=20).map("".join),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=12).map("".join),
)
settings_no_deadline = settings(deadline=None)


# -- layout --------------------------------------------------------------------------------------------------


def test_id_layout() -> None:
    assert len(WORDS) == NUM_WORDS == 32_400
    assert len(set(WORDS)) == NUM_WORDS
    assert all(w.isascii() and w.isalpha() and w.islower() for w in WORDS)
    assert list(WORDS) == sorted(WORDS, key=lambda w: (len(w), w))
    assert WORDS[0] == "ba"
    assert SPECIAL_BASE == 256 and SPACE_WORD_BASE == 272
    assert BARE_WORD_BASE == SPACE_WORD_BASE + NUM_WORDS == 32_672
    assert VOCAB_SIZE == TOK.vocab_size == 65_072 < 2**16
    assert TOK.encode(" ba") == [SPACE_WORD_BASE]
    assert TOK.encode("ba") == [BARE_WORD_BASE]
    assert TOK.encode(" " + WORDS[-1]) == [BARE_WORD_BASE - 1]
    assert TOK.encode(WORDS[-1]) == [VOCAB_SIZE - 1]
    assert TOK.encode("a") == [97]  # single ASCII characters are their byte ids
    assert TOK.encode("é") == list("é".encode())
    for offset, marker in enumerate(SPECIAL_TOKENS):
        assert TOK.encode(marker) == [SPECIAL_BASE + offset]
        assert TOK.special_token_ids[marker] == SPECIAL_BASE + offset
    assert TOK.eos_token_id == SPECIAL_BASE + SPECIAL_TOKENS.index("<|eos|>")
    assert TOK.eot_token_id == SPECIAL_BASE + SPECIAL_TOKENS.index("<|eot|>")


def test_tokenizer_is_immutable_and_cached() -> None:
    assert get_tokenizer() is TOK
    fresh = Tokenizer()
    assert fresh is not TOK and fresh.encode("<|user|> bakon 😀") == TOK.encode("<|user|> bakon 😀")
    with pytest.raises(AttributeError):
        TOK.foo = 1
    with pytest.raises(AttributeError):
        TOK._piece_to_id = {}
    with pytest.raises(TypeError):
        TOK.special_token_ids["<|x|>"] = 1  # type: ignore[index]


def test_specials_only_match_exactly() -> None:
    assert TOK.encode("<|user|>") == [TOK.special_token_ids["<|user|>"]]
    for near_miss in ["<|User|>", "<|user|", "<| user|>", "<|users|>", "<|reserved|>"]:
        ids = TOK.encode(near_miss)
        assert not any(TOK.is_special(i) for i in ids), near_miss
        assert TOK.decode(ids) == near_miss


# -- round trip ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "   ",
        "\n\n\t  \r\n",
        "Hello, World!",
        "naïve café 日本語 😀👍🏽",
        "a  b   c",
        "\ud800",
        "\ud83d\ude00",
    ],
)
def test_round_trip_examples(text: str) -> None:
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert TOK.token_count(text) == len(ids)
    assert all(0 <= i < VOCAB_SIZE for i in ids)


@settings_no_deadline
@given(tokenizer_text)
def test_round_trip(text: str) -> None:
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert TOK.token_count(text) == len(ids)


@given(st.text(st.characters(exclude_categories=())))  # includes lone surrogates
def test_round_trip_with_surrogates(text: str) -> None:
    assert TOK.decode(TOK.encode(text)) == text


def test_decode_errors_and_options() -> None:
    for bad in ([-1], [VOCAB_SIZE], [SPECIAL_BASE + len(SPECIAL_TOKENS)], [SPACE_WORD_BASE - 1]):
        with pytest.raises(ValueError):
            TOK.decode(bad)
    ids = TOK.render_chat([{"role": "user", "content": " bakon"}])
    assert TOK.decode(ids, skip_special_tokens=True) == " bakon"
    assert TOK.decode([0xFF, 97]) == "\ufffda"  # invalid UTF-8 only from hand-made id lists
    assert TOK.decode(iter(TOK.encode(" ba be"))) == " ba be"


# -- prefix property -----------------------------------------------------------------------------------------


@settings_no_deadline
@given(tokenizer_text, tokenizer_text, tokenizer_text)
def test_prefix_property(prefix: str, suffix1: str, suffix2: str) -> None:
    """With b = stable_boundary(prefix) and k = len(encode(prefix[:b])): encode(prefix + s) starts with
    encode(prefix[:b]) for every s (and for s = ""), so two texts sharing ``prefix`` agree on their first
    k ids; only the tokens of prefix's last piece (or of a trailing partial special marker) may differ."""
    b = TOK.stable_boundary(prefix)
    assert 0 <= b <= len(prefix)
    stable = TOK.encode(prefix[:b])
    k = len(stable)
    assert TOK.encode(prefix)[:k] == stable
    assert TOK.encode(prefix + suffix1)[:k] == stable
    assert TOK.encode(prefix + suffix2)[:k] == stable


@settings_no_deadline
@given(tokenizer_text, st.sampled_from(SPECIAL_TOKENS), st.integers(1, 12), tokenizer_text, tokenizer_text)
def test_prefix_property_at_split_special(base: str, marker: str, split: int, rest: str, suffix2: str) -> None:
    """The prefix ends inside a special marker, one continuation completes it: the hard case."""
    split = min(split, len(marker) - 1)
    prefix = base + marker[:split]
    stable = TOK.encode(prefix[: TOK.stable_boundary(prefix)])
    k = len(stable)
    assert TOK.encode(prefix + marker[split:] + rest)[:k] == stable
    assert TOK.encode(prefix + suffix2)[:k] == stable


@settings_no_deadline
@given(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=30),
    st.sampled_from(["", " ", "  ", "\n", "<|us", "ko", "Z", "1", ",", "😀"]),
    tokenizer_text,
    tokenizer_text,
)
def test_prefix_property_for_word_text(words: list[str], tail: str, suffix1: str, suffix2: str) -> None:
    """Independent of stable_boundary: for ``" w1 w2 ... wn" + tail`` the two id lists agree on the ids of
    all words but the last (which may still grow, e.g. " ba" + "kon"), i.e. on the first n - 1 ids."""
    prefix = "".join(" " + w for w in words) + tail
    expected = [SPACE_WORD_BASE + WORDS.index(w) for w in words[:-1]]
    n = len(expected)
    assert TOK.encode(prefix + suffix1)[:n] == expected
    assert TOK.encode(prefix + suffix2)[:n] == expected


def test_stable_boundary_examples() -> None:
    assert TOK.stable_boundary("") == 0
    assert TOK.stable_boundary(" ba ko") == 3  # last piece " ko" may grow into " kobe"
    assert TOK.stable_boundary("hi <|us") == 3  # "<|us" may become "<|user|>"
    assert TOK.stable_boundary("hi <|user|>") == 3  # a complete marker is the last piece
    assert TOK.stable_boundary("hi  ") == 2
    assert TOK.encode("hi <|us" + "er|>") == [BARE_WORD_BASE + WORDS.index("hi"), 32, 257]


# -- synthesis -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_length", [0, 1, 511, 512, 513, 1024, 10_000, 100_000])
def test_synthesize_prompt_exact_length(input_length: int) -> None:
    hash_ids = list(range(1000, 1000 + math.ceil(input_length / 512)))
    text = synthesize_prompt(hash_ids, input_length)
    ids = TOK.encode(text)
    assert len(ids) == input_length == TOK.token_count(text)
    assert all(SPACE_WORD_BASE <= i < BARE_WORD_BASE for i in ids)
    assert TOK.decode(ids) == text
    assert synthesize_prompt(hash_ids, input_length) == text  # deterministic


def test_synthesize_prompt_shared_blocks() -> None:
    a = TOK.encode(synthesize_prompt([1, 2, 3, 4], 2000))
    b = TOK.encode(synthesize_prompt([1, 2, 7, 8], 1800))
    c = TOK.encode(synthesize_prompt([9, 2, 3], 1100))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared == 2 * 512  # exactly the two shared blocks
    assert a[0] != c[0]  # a different first block shares nothing, even if later ids are equal
    assert a[1024:1100] == c[1024:1100]  # block content depends on the hash id only, not its position


@settings(deadline=None, max_examples=50)
@given(
    st.lists(st.integers(0, 2**63), min_size=1, max_size=6),
    st.lists(st.integers(0, 2**63), max_size=6),
    st.lists(st.integers(0, 2**63), max_size=6),
    st.integers(1, 40),
    st.integers(0, 39),
    st.integers(0, 39),
)
def test_synthesize_prompt_prefix_sharing(
    common: list[int], rest1: list[int], rest2: list[int], block: int, cut1: int, cut2: int
) -> None:
    ids1, ids2 = common + rest1, common + rest2
    len1 = len(ids1) * block - cut1 % block
    len2 = len(ids2) * block - cut2 % block
    tokens1 = TOK.encode(synthesize_prompt(ids1, len1, block_tokens=block))
    tokens2 = TOK.encode(synthesize_prompt(ids2, len2, block_tokens=block))
    assert (len(tokens1), len(tokens2)) == (len1, len2)
    shared = min(len(common) * block, len1, len2)
    assert tokens1[:shared] == tokens2[:shared]


def test_synthesize_prompt_rejects_bad_hash_ids() -> None:
    with pytest.raises(ValueError, match="hash_ids"):
        synthesize_prompt([1, 2], 512)
    with pytest.raises(ValueError, match="hash_ids"):
        synthesize_prompt([1], 513)
    with pytest.raises(ValueError, match="hash_ids"):
        synthesize_prompt([], 1)
    with pytest.raises(ValueError, match="hash_ids"):
        synthesize_prompt([1], 0)
    with pytest.raises(ValueError):
        synthesize_prompt([], -1)
    with pytest.raises(ValueError):
        synthesize_prompt([1], 10, block_tokens=0)
    assert synthesize_prompt([], 0) == ""


def test_blocks_concatenate_and_truncate() -> None:
    full = synthesize_block(42, 512)
    assert full.startswith(" ") and full == synthesize_block(42, 512)
    assert full.startswith(synthesize_block(42, 100))
    assert synthesize_prompt([42], 100) == synthesize_block(42, 100)
    assert synthesize_prompt([42, 43], 600) == full + synthesize_block(43, 88)
    joined = synthesize_block(1, 7) + synthesize_block(2, 5) + synthesize_text(3, seed=9)
    assert TOK.encode(joined) == (
        TOK.encode(synthesize_block(1, 7)) + TOK.encode(synthesize_block(2, 5)) + TOK.encode(synthesize_text(3, 9))
    )
    assert synthesize_block(1, 0) == synthesize_text(0, 1) == ""
    with pytest.raises(ValueError):
        synthesize_block(1, -1)


@settings_no_deadline
@given(st.integers(0, 3000), st.integers(-(2**70), 2**70))
def test_synthesize_text(num_tokens: int, seed: int) -> None:
    text = synthesize_text(num_tokens, seed)
    assert text == synthesize_text(num_tokens, seed)
    assert TOK.token_count(text) == num_tokens
    assert text != synthesize_text(num_tokens, seed + 1) or num_tokens == 0


# -- output tokens -------------------------------------------------------------------------------------------


@settings_no_deadline
@given(st.integers(-(2**80), 2**80), st.integers(0, 10_000), st.integers(0, 300))
def test_output_tokens_round_trip(seed: int, start: int, count: int) -> None:
    ids = [output_token_id(seed, i) for i in range(start, start + count)]
    assert ids == [output_token_id(seed, i) for i in range(start, start + count)]
    assert all(SPACE_WORD_BASE <= i < BARE_WORD_BASE for i in ids)
    assert TOK.eos_token_id not in ids and not any(TOK.is_special(i) for i in ids)
    assert TOK.encode(TOK.decode(ids)) == ids
    # A reply sent back as an assistant message costs exactly its ids plus the template.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TOK.decode(ids)}]
    rendered = TOK.render_chat(messages)
    assert rendered[-len(ids) - 2 : -2] == ids or count == 0


def test_output_tokens_spread() -> None:
    ids = [output_token_id(7, i) for i in range(20_000)]
    assert len(set(ids)) > 14_000  # ~15,300 distinct expected for uniform draws over 32,400 words
    assert ids[:100] != [output_token_id(8, i) for i in range(100)]


# -- chat template -------------------------------------------------------------------------------------------

roles = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
# (content, the text it stands for): a string, None, or a list of text parts.
contents: st.SearchStrategy[tuple[object, str]] = st.one_of(
    st.none().map(lambda c: (c, "")),
    tokenizer_text.map(lambda t: (t, t)),
    st.lists(tokenizer_text, max_size=3).map(lambda ts: ([{"type": "text", "text": t} for t in ts], "".join(ts))),
)


@settings_no_deadline
@given(st.lists(st.tuples(roles, contents), max_size=6), st.booleans())
def test_render_chat_overhead(drawn: list[tuple[str, tuple[object, str]]], add_generation_prompt: bool) -> None:
    """len(render_chat) == sum of the contents' own token counts + 2 per message + 1."""
    messages = [{"role": role, "content": content} for role, (content, _) in drawn]
    ids = TOK.render_chat(messages, add_generation_prompt=add_generation_prompt)
    text = TOK.render_chat_text(messages, add_generation_prompt=add_generation_prompt)
    assert ids == TOK.encode(text)
    content_tokens = sum(TOK.token_count(joined) for _, (_, joined) in drawn)
    overhead = chat_overhead_tokens(len(messages), add_generation_prompt=add_generation_prompt)
    assert overhead == 2 * len(messages) + int(add_generation_prompt)
    assert len(ids) == content_tokens + overhead


def test_render_chat_layout() -> None:
    sp = TOK.special_token_ids
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "ba"},
        {"role": "developer", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "ko"}, {"type": "text", "text": " be"}]},
        {"role": "tool", "content": "", "tool_call_id": "x"},
    ]
    ids = TOK.render_chat(messages)
    assert TOK.render_chat_text(messages) == (
        "<|system|>ba<|eot|><|developer|><|eot|><|user|>ko be<|eot|><|tool|><|eot|><|assistant|>"
    )
    assert ids[:3] == [sp["<|system|>"], TOK.encode("ba")[0], sp["<|eot|>"]]
    assert ids[3:5] == [sp["<|developer|>"], sp["<|eot|>"]]
    assert ids[5:9] == [sp["<|user|>"], *TOK.encode("ko be"), sp["<|eot|>"]]
    assert ids[-1] == sp["<|assistant|>"]
    assert TOK.render_chat([]) == [sp["<|assistant|>"]]
    assert TOK.render_chat([], add_generation_prompt=False) == []
    assert chat_overhead_tokens(0) == 1 and chat_overhead_tokens(3) == 7
    with pytest.raises(ValueError):
        chat_overhead_tokens(-1)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"role": "bot", "content": "x"}, "unknown chat role"),
        ({"role": "eot", "content": "x"}, "unknown chat role"),
        ({"content": "x"}, "unknown chat role"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "image_url"),
        ({"role": "user", "content": [{"type": "text"}]}, "text"),
        ({"role": "user", "content": ["plain string part"]}, "object"),
        ({"role": "user", "content": 5}, "content"),
    ],
)
def test_render_chat_errors(message: dict[str, object], match: str) -> None:
    ok: dict[str, object] = {"role": "user", "content": "ok"}
    with pytest.raises(ValueError, match=match):
        TOK.render_chat([ok, message])
    with pytest.raises(ValueError, match=match):
        TOK.render_chat_text([message])


def test_role_token_id() -> None:
    assert TOK.role_token_id("developer") == TOK.special_token_ids["<|developer|>"]
    with pytest.raises(ValueError):
        TOK.role_token_id("eos")


# -- determinism across processes ----------------------------------------------------------------------------

_DIGEST_SCRIPT = """
import hashlib, json
from emulator.tokenizer import get_tokenizer, output_token_id, synthesize_prompt, synthesize_text, WORDS
tok = get_tokenizer()
texts = ["Hello, world! baba  kobe", "<|user|>hi<|eot|>", "naïve 😀 日本", synthesize_text(300, 5)]
payload = {
    "words": hashlib.sha256("\\n".join(WORDS).encode()).hexdigest(),
    "encodings": [tok.encode(t) for t in texts],
    "prompt": tok.encode(synthesize_prompt([11, 22, 33], 1200)),
    "output": [output_token_id(123, i) for i in range(200)],
    "chat": tok.render_chat([{"role": "user", "content": "bakon"}]),
}
print(hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest())
"""

# Pinned so an accidental change to the vocabulary, the synthesis streams or output_token_id (which the
# emulator, router and load generator must agree on) fails loudly. Update only with docs/tokenizer.md.
GOLDEN_DIGEST = "4e493e993e81615fe58ef299b519f869c02f88174a43aae0dc4e3cc219210d89"


def _digest_in_subprocess(hash_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_deterministic_across_processes_and_hash_seeds() -> None:
    digests = {_digest_in_subprocess(seed) for seed in ("0", "1", "987654321")}
    assert digests == {GOLDEN_DIGEST}


def test_golden_values() -> None:
    assert synthesize_block(0, 6) == " kajin gebar takol najun zodun veba"
    block = hashlib.sha256(synthesize_block(0, 512).encode()).hexdigest()
    assert block == "e1663aa1e168b674a88441821edfe634a35b6185774062a52c8fa3e839470471"
    assert [output_token_id(1, i) for i in range(6)] == [23042, 32567, 18999, 14876, 1387, 10262]
