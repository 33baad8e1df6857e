"""A deterministic, lossless tokenizer shared by the emulator, the router and the load generator.

There is no real model behind the emulator, so token ids only have to be *consistent*: the load generator
must be able to write a prompt that is exactly ``input_length`` tokens long, texts with a common prefix
must have common leading token ids (so prefix caching and prefix-aware routing see the sharing that the
trace describes), and a reply the emulator generated must re-tokenise to the same ids when a client sends
it back. This module defines such a tokenizer with fixed, documented properties (see ``docs/tokenizer.md``).

Id layout (``VOCAB_SIZE`` = 65,072, so every id fits in a ``uint16``):

* ``0..255``         raw UTF-8 bytes; ``0..127`` double as the single ASCII characters.
* ``256..271``       special tokens (``SPECIAL_TOKENS`` in order, the rest reserved and never produced).
* ``272..32671``     the 32,400 pseudo-words with one leading space (``" baba"``).
* ``32672..65071``   the same words without the space (``"baba"``).

Only the standard library is used and nothing depends on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

__all__ = [
    "BARE_WORD_BASE",
    "NUM_WORDS",
    "ROLES",
    "SPACE_WORD_BASE",
    "SPECIAL_BASE",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "WORDS",
    "Tokenizer",
    "chat_overhead_tokens",
    "get_tokenizer",
    "output_token_id",
    "synthesize_block",
    "synthesize_prompt",
    "synthesize_text",
]

# ---------------------------------------------------------------------------------------------------------
# Vocabulary (pure constants: the same on every machine, process and Python version)
# ---------------------------------------------------------------------------------------------------------

_CONSONANTS: Final = "bdfghjklmnprstvz"  # 16, sorted
_VOWELS: Final = "aeiou"  # 5
_FINALS: Final = "lnrs"  # 4, sorted


def _build_words() -> tuple[str, ...]:
    """Enumerate consonant-vowel pseudo-words by shape (CV, CVC, CVCV, CVCVC), each shape in lexicographic
    order; shapes have distinct lengths, so the list is sorted by (length, text) and free of duplicates."""
    c, v, f = _CONSONANTS, _VOWELS, _FINALS
    shapes: tuple[tuple[str, ...], ...] = ((c, v), (c, v, f), (c, v, c, v), (c, v, c, v, f))
    return tuple("".join(letters) for shape in shapes for letters in itertools.product(*shape))


WORDS: Final[tuple[str, ...]] = _build_words()
NUM_WORDS: Final = len(WORDS)  # 80 + 320 + 6,400 + 25,600 = 32,400
_SPACE_WORDS: Final[tuple[str, ...]] = tuple(" " + w for w in WORDS)

SPECIAL_TOKENS: Final[tuple[str, ...]] = (
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|developer|>",
    "<|eot|>",
    "<|eos|>",
)
SPECIAL_BASE: Final = 256
_SPECIAL_SLOTS: Final = 16
SPACE_WORD_BASE: Final = SPECIAL_BASE + _SPECIAL_SLOTS
BARE_WORD_BASE: Final = SPACE_WORD_BASE + NUM_WORDS
VOCAB_SIZE: Final = BARE_WORD_BASE + NUM_WORDS

ROLES: Final[tuple[str, ...]] = ("system", "user", "assistant", "tool", "developer")

# Pre-tokeniser. Every alternative is decided by the text up to one character past the piece's end, except
# a special marker, which needs its full length; this is what gives the prefix property (docs/tokenizer.md).
# Word pieces come first because they are by far the most common. Where two alternatives can start on the
# same character (a space: word or whitespace; "<": special or single character) the earlier one wins.
_PIECE_RE: Final = re.compile(
    r" ?[A-Za-z]+"
    r"|(?:" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + r")"
    r"|[0-9]+"
    r"|\s+(?!\S)"
    r"|\s+"
    r"|[^\x00-\x7f\s]+"
    r"|.",
    re.DOTALL,
)

_MASK64: Final = (1 << 64) - 1
_GOLDEN64: Final = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """splitmix64 finaliser: a cheap, well-distributed, platform-independent 64-bit integer hash."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


class Tokenizer:
    """The fixed fleetroute tokenizer. Immutable; build it once through ``get_tokenizer()``."""

    __slots__ = ("_decode_table", "_piece_to_id", "_special_ids")

    _piece_to_id: dict[str, int]
    _decode_table: tuple[bytes | None, ...]
    _special_ids: Mapping[str, int]

    def __init__(self) -> None:
        piece_to_id: dict[str, int] = {chr(b): b for b in range(128)}
        table: list[bytes | None] = [bytes((b,)) for b in range(256)]
        table.extend([None] * _SPECIAL_SLOTS)  # reserved slots stay None: decode rejects them
        specials = {}
        for offset, marker in enumerate(SPECIAL_TOKENS):
            specials[marker] = SPECIAL_BASE + offset
            table[SPECIAL_BASE + offset] = marker.encode("ascii")
        piece_to_id.update(specials)
        piece_to_id.update(zip(_SPACE_WORDS, range(SPACE_WORD_BASE, BARE_WORD_BASE), strict=True))
        piece_to_id.update(zip(WORDS, range(BARE_WORD_BASE, VOCAB_SIZE), strict=True))
        table.extend(w.encode("ascii") for w in _SPACE_WORDS)
        table.extend(w.encode("ascii") for w in WORDS)
        assert len(table) == VOCAB_SIZE and len(piece_to_id) == 128 + len(SPECIAL_TOKENS) + 2 * NUM_WORDS
        object.__setattr__(self, "_piece_to_id", piece_to_id)
        object.__setattr__(self, "_decode_table", tuple(table))
        object.__setattr__(self, "_special_ids", MappingProxyType(specials))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={VOCAB_SIZE}, words={NUM_WORDS})"

    # -- ids ------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, including the reserved special slots (ids are ``0 <= id < vocab_size``)."""
        return VOCAB_SIZE

    @property
    def eos_token_id(self) -> int:
        """``<|eos|>``: end of a whole sequence (never produced by ``output_token_id``)."""
        return self._special_ids["<|eos|>"]

    @property
    def eot_token_id(self) -> int:
        """``<|eot|>``: closes every chat message; a chat reply ends here."""
        return self._special_ids["<|eot|>"]

    @property
    def special_token_ids(self) -> Mapping[str, int]:
        """Read-only map from special marker text (``"<|user|>"``) to its id."""
        return self._special_ids

    def role_token_id(self, role: str) -> int:
        """Id of the ``<|role|>`` marker that opens a chat message; ValueError for an unknown role."""
        token_id = self._special_ids.get(f"<|{role}|>")
        if token_id is None or role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        return token_id

    def is_special(self, token_id: int) -> bool:
        """True for ids in the special range (including the reserved, never-produced slots)."""
        return SPECIAL_BASE <= token_id < SPACE_WORD_BASE

    # -- encode / decode ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: one id per pre-tokeniser piece found in the vocabulary, UTF-8 byte ids
        (``surrogatepass``, so even lone surrogates survive) for any other piece. Total and lossless."""
        pieces = _PIECE_RE.findall(text)
        ids: list[int | None] = list(map(self._piece_to_id.get, pieces))
        if None not in ids:  # common path: everything was in the vocabulary
            return ids  # type: ignore[return-value]
        out: list[int] = []
        for piece, token_id in zip(pieces, ids, strict=True):
            if token_id is None:
                out.extend(piece.encode("utf-8", "surrogatepass"))
            else:
                out.append(token_id)
        return out

    def token_count(self, text: str) -> int:
        """``len(encode(text))``; the router's hot path, so it avoids building the fallback list."""
        pieces = _PIECE_RE.findall(text)
        get = self._piece_to_id.get
        count = len(pieces)
        ids = list(map(get, pieces))
        if None in ids:
            for piece, token_id in zip(pieces, ids, strict=True):
                if token_id is None:
                    count += len(piece.encode("utf-8", "surrogatepass")) - 1
        return count

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Byte ids that do not form valid UTF-8 (only possible for id lists that
        ``encode`` did not produce) decode with U+FFFD replacement; invalid ids raise ValueError."""
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if not SPECIAL_BASE <= i < SPACE_WORD_BASE]
        if ids and (min(ids) < 0 or max(ids) >= VOCAB_SIZE):
            raise ValueError(f"token id out of range [0, {VOCAB_SIZE})")
        try:
            data = b"".join(map(self._decode_table.__getitem__, ids))  # type: ignore[arg-type]
        except TypeError:
            bad = next(i for i in ids if self._decode_table[i] is None)
            raise ValueError(f"token id {bad} is a reserved special slot") from None
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return data.decode("utf-8", "replace")

    def stable_boundary(self, text: str) -> int:
        """Character index ``b`` such that, for every string ``s``, ``encode(text + s)`` starts with
        ``encode(text[:b])`` (and so does ``encode(text)``): the start of the last piece, moved back to the
        start of a trailing partial special marker (``"<|us"``) if there is one. The prefix property."""
        pieces = _PIECE_RE.findall(text)
        if not pieces:
            return 0
        boundary = len(text) - len(pieces[-1])
        for marker in SPECIAL_TOKENS:
            for k in range(len(marker) - 1, 1, -1):
                if text.endswith(marker[:k]):
                    boundary = min(boundary, len(text) - k)
                    break
        return boundary

    # -- chat template --------------------------------------------------------------------------------------

    def render_chat_text(self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True) -> str:
        """The chat template as text: ``<|role|>content<|eot|>`` per message, then ``<|assistant|>``."""
        parts: list[str] = []
        for index, message in enumerate(messages):
            role, content = _message_fields(message, index)
            parts.extend((f"<|{role}|>", content, "<|eot|>"))
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)

    def render_chat(self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template: equal to ``encode(render_chat_text(...))`` (a special marker always
        ends a piece) and exactly ``chat_overhead_tokens(len(messages))`` ids longer than the contents."""
        ids: list[int] = []
        eot = self.eot_token_id
        for index, message in enumerate(messages):
            role, content = _message_fields(message, index)
            ids.append(self.role_token_id(role))
            ids.extend(self.encode(content))
            ids.append(eot)
        if add_generation_prompt:
            ids.append(self._special_ids["<|assistant|>"])
        return ids


def _message_fields(message: Mapping[str, object], index: int) -> tuple[str, str]:
    """Validated ``(role, content text)`` of one OpenAI-style message; other keys are ignored."""
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"messages[{index}]: unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None:
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, Sequence):
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise ValueError(f"messages[{index}].content[{j}]: a content part must be an object")
            part_type = part.get("type")
            if part_type != "text":
                raise ValueError(
                    f"messages[{index}].content[{j}]: unsupported content part type {part_type!r}; "
                    "only 'text' parts are supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"messages[{index}].content[{j}]: a text part needs a string 'text'")
            texts.append(text)
        return role, "".join(texts)
    raise ValueError(
        f"messages[{index}].content must be a string, null or a list of parts, not {type(content).__name__}"
    )


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (built on first use, ~0.1 s)."""
    return Tokenizer()


def chat_overhead_tokens(num_messages: int, add_generation_prompt: bool = True) -> int:
    """Template tokens added to the message contents: 2 per message (role marker, ``<|eot|>``) + 1."""
    if num_messages < 0:
        raise ValueError("num_messages must be >= 0")
    return 2 * num_messages + int(add_generation_prompt)


# ---------------------------------------------------------------------------------------------------------
# Text synthesis (load generator) and output tokens (emulator)
# ---------------------------------------------------------------------------------------------------------


def _space_words(tag: str, num_tokens: int) -> str:
    """``num_tokens`` space-led words drawn from a SHAKE-128 stream keyed by ``tag``; an extendable-output
    function, so the words for ``n`` tokens are a prefix of those for ``m > n`` (truncated blocks)."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_tokens == 0:
        return ""
    stream = hashlib.shake_128(tag.encode("ascii")).digest(4 * num_tokens)
    words = _SPACE_WORDS
    # Modulo bias is ~1e-5 relative, irrelevant for synthetic text.
    return "".join([words[x % NUM_WORDS] for x in struct.unpack(f"<{num_tokens}I", stream)])


def synthesize_block(block_id: int, num_tokens: int) -> str:
    """Deterministic text of exactly ``num_tokens`` tokens for one trace block (``" word"`` pieces only, so
    blocks concatenate without merging). Equal ``block_id``s give equal text; a shorter block is a prefix."""
    return _space_words(f"fleetroute/block/{int(block_id)}", num_tokens)


def synthesize_text(num_tokens: int, seed: int) -> str:
    """Deterministic filler text of exactly ``num_tokens`` tokens, independent of any trace block."""
    return _space_words(f"fleetroute/text/{int(seed)}", num_tokens)


def synthesize_prompt(hash_ids: Sequence[int], input_length: int, block_tokens: int = 512) -> str:
    """Prompt text of exactly ``input_length`` tokens for a Mooncake trace row: one block per hash id, the
    last one truncated, so rows with equal leading ``hash_ids`` get equal leading token ids."""
    if input_length < 0:
        raise ValueError(f"input_length must be >= 0, got {input_length}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    expected = -(-input_length // block_tokens)
    if len(hash_ids) != expected:
        raise ValueError(
            f"{len(hash_ids)} hash_ids do not fit input_length={input_length}: "
            f"{block_tokens}-token blocks need exactly {expected}"
        )
    last = input_length - block_tokens * (expected - 1)
    return "".join(synthesize_block(h, block_tokens if i < expected - 1 else last) for i, h in enumerate(hash_ids))


def output_token_id(seed: int, index: int) -> int:
    """The ``index``-th generated token of a request seeded with ``seed``: a space-led word id (never a
    special, never EOS), so any reply re-tokenises to the same ids. Element ``index`` of a splitmix64
    stream whose state is ``mix(seed)``; no allocation per call."""
    z = (_mix64(seed & _MASK64) + (index + 1) * _GOLDEN64) & _MASK64
    return SPACE_WORD_BASE + _mix64(z) % NUM_WORDS
