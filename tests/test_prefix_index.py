"""Prompt block hashing, chat rendering, and the memory-bounded prefix index."""

from __future__ import annotations

import gc
import itertools
import json
import os
import random
import subprocess
import sys
import tracemalloc
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from router.prefix_index import (
    _SHARD_BASE,
    PrefixIndex,
    _table_bytes,
    _table_slots,
    chat_prompt_bytes,
    completion_prompt_bytes,
    prompt_block_hashes,
)

MiB = 1 << 20


def random_hashes(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(64) for _ in range(n)]


def path_hashes(path: Sequence[int], block_bytes: int = 4) -> list[int]:
    """Chained hashes of a prompt whose blocks are the given symbols: equal leading symbols, equal hashes."""
    return prompt_block_hashes(b"".join(bytes([s]) * block_bytes for s in path), block_bytes)


# -- hashing ---------------------------------------------------------------------------------------------------


def test_hashes_are_chained_xxh3_over_full_blocks() -> None:
    data = bytes(range(256)) * 3 + b"tail"
    hashes = prompt_block_hashes(data, 256)
    assert len(hashes) == 3  # the 4-byte tail is not a full block
    h = 0
    for i, got in enumerate(hashes):
        h = xxhash.xxh3_64_intdigest(data[i * 256 : (i + 1) * 256], seed=h)
        assert got == h
    assert prompt_block_hashes(data[:255], 256) == []
    assert prompt_block_hashes(b"", 16) == []


def test_hashes_accept_any_bytes_like() -> None:
    data = os.urandom(1000)
    expected = prompt_block_hashes(data, 100)
    assert prompt_block_hashes(bytearray(data), 100) == expected
    assert prompt_block_hashes(memoryview(data), 100) == expected
    assert prompt_block_hashes(memoryview(b"xx" + data)[2:], 100) == expected
    with pytest.raises(ValueError):
        prompt_block_hashes(data, 0)


def test_equal_hashes_mean_equal_prefixes() -> None:
    a = b"S" * 512 + b"A" * 512
    b = b"S" * 512 + b"B" * 512
    ha, hb = prompt_block_hashes(a, 128), prompt_block_hashes(b, 128)
    assert ha[:4] == hb[:4]
    assert not set(ha[4:]) & set(hb[4:])
    # The same block content at another position hashes differently: a hash stands for the whole prefix.
    assert prompt_block_hashes(b"A" * 256, 128)[1] != prompt_block_hashes(b"A" * 256, 128)[0]


GOLDEN_SCRIPT = """
import json
from router.prefix_index import chat_prompt_bytes, completion_prompt_bytes, prompt_block_hashes
chat = [{"role": "system", "content": "You are helpful. " * 20}, {"role": "user", "content": "hi " * 100}]
print(json.dumps([
    prompt_block_hashes(b"fleetroute " * 100, 256),
    prompt_block_hashes(chat_prompt_bytes(chat), 128)[:3],
    prompt_block_hashes(completion_prompt_bytes(list(range(1000))), 64)[-1],
]))
"""

# Pinned so a change of algorithm, rendering or library shows up here: routers of different versions sharing
# one Redis index must agree on every hash.
GOLDEN_FLEETROUTE = [1561942969075171594, 5573616352763231590, 3085900155407858418, 15856884188094621566]
GOLDEN_CHAT = [3101107243717676864, 15912444800533572964, 17320102902892757720]


@pytest.mark.parametrize("hash_seed", ["0", "12345", "random"])
def test_hashes_are_stable_across_processes(hash_seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", GOLDEN_SCRIPT], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    fleet, chat, token_last = json.loads(out)
    assert fleet == GOLDEN_FLEETROUTE == prompt_block_hashes(b"fleetroute " * 100, 256)
    assert chat == GOLDEN_CHAT
    assert token_last == prompt_block_hashes(completion_prompt_bytes(list(range(1000))), 64)[-1]


# -- prompt rendering ------------------------------------------------------------------------------------------


def test_completion_prompt_bytes() -> None:
    assert completion_prompt_bytes("héllo") == "héllo".encode()
    assert completion_prompt_bytes([1, 256, 2**32 - 1]) == b"\x01\x00\x00\x00\x00\x01\x00\x00\xff\xff\xff\xff"
    assert completion_prompt_bytes("\ud800") == b"\xed\xa0\x80"  # a lone surrogate from JSON does not raise
    for bad in ([-1], [2**32], ["x"]):
        with pytest.raises(ValueError):
            completion_prompt_bytes(bad)  # type: ignore[arg-type]


def test_string_and_text_parts_render_the_same() -> None:
    as_string = [{"role": "user", "content": "Describe the plot."}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Describe the plot."}]}]
    assert chat_prompt_bytes(as_string) == chat_prompt_bytes(as_parts) == b"\x1euser\x1fDescribe the plot."
    # Several text parts join with a newline, as vLLM joins them for string-format chat templates.
    two_parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert chat_prompt_bytes(two_parts) == chat_prompt_bytes([{"role": "user", "content": "a\nb"}])


def test_non_text_parts_render_as_stable_markers() -> None:
    def image(url: str) -> list[dict[str, object]]:
        return [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, "what is it?"]},
        ]

    small = chat_prompt_bytes(image("data:image/png;base64," + "A" * 10))
    large = chat_prompt_bytes(image("data:image/png;base64," + "B" * 100_000))
    assert small == large == b"\x1euser\x1f\x1dimage_url" + b"what is it?"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "..."}}]}]
    assert chat_prompt_bytes(audio) != small


def test_roles_boundaries_and_tool_calls_are_unambiguous() -> None:
    one = [{"role": "user", "content": "ab"}]
    two = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    other_role = [{"role": "assistant", "content": "ab"}]
    assert len({chat_prompt_bytes(one), chat_prompt_bytes(two), chat_prompt_bytes(other_role)}) == 3
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"q": 1}'}}],
    }
    other_args = json.loads(json.dumps(call))
    other_args["tool_calls"][0]["function"]["arguments"] = '{"q": 2}'
    assert chat_prompt_bytes([call]) == b'\x1eassistant\x1f\x1dtool_call\x1fget\x1f{"q": 1}'
    assert chat_prompt_bytes([call]) != chat_prompt_bytes([other_args])


def test_malformed_messages_are_skipped_not_raised() -> None:
    messages = [
        "not a message",
        {"role": 3, "content": {"weird": True}},
        {"role": "user", "content": [None, 7, {"type": "text", "text": 5}, {"type": "text", "text": "ok"}]},
        {"role": "assistant", "tool_calls": [None, {"function": "x"}, {"function": {"name": None}}]},
        {"role": "user", "content": "\ud800 lone surrogate"},
    ]
    rendered = chat_prompt_bytes(messages)
    assert b"ok" in rendered
    assert rendered.startswith(b"\x1e\x1f")


text = st.text(max_size=20)
part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, text),
)
message = st.builds(
    lambda role, content: {"role": role, "content": content},
    st.sampled_from(["system", "user", "assistant", "tool"]),
    st.one_of(text, st.lists(part, max_size=3), st.none()),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(message, min_size=1, max_size=8))
def test_each_turn_extends_the_previous_rendering(conversation: list[dict[str, object]]) -> None:
    renderings = [chat_prompt_bytes(conversation[:k]) for k in range(len(conversation) + 1)]
    for shorter, longer in itertools.pairwise(renderings):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    # Hence the block hashes of a turn extend those of the turn before.
    for shorter, longer in itertools.pairwise(renderings):
        short_hashes = prompt_block_hashes(shorter, 8)
        assert prompt_block_hashes(longer, 8)[: len(short_hashes)] == short_hashes


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), text), max_size=5))
def test_string_content_equals_single_part_content(turns: list[tuple[str, str]]) -> None:
    as_strings = [{"role": r, "content": t} for r, t in turns]
    as_parts = [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns]
    assert chat_prompt_bytes(as_strings) == chat_prompt_bytes(as_parts)


# -- matching --------------------------------------------------------------------------------------------------


def test_shared_and_diverging_prefixes() -> None:
    index = PrefixIndex(4 * MiB, block_bytes=4, shards=4)
    system = [1, 1, 1, 1]
    a = path_hashes([*system, 2, 2, 2, 2, 2, 2])
    b = path_hashes([*system, 3, 3])
    c = path_hashes([9, 9, 9])
    index.record("r0", a)
    index.record("r1", b)
    index.record("r2", c)
    index.record("r3", a[:6])
    assert index.match(a) == {"r0": 10, "r1": 4, "r3": 6}
    assert index.match(b) == {"r0": 4, "r1": 6, "r3": 4}
    assert index.match(c) == {"r2": 3}
    assert index.match(path_hashes([*system, 2, 7])) == {"r0": 5, "r1": 4, "r3": 5}
    assert index.match(path_hashes([5, *system])) == {}
    assert index.match([]) == {}
    stats = index.stats()
    assert stats["queries"] == 6
    assert stats["query_blocks"] == 10 + 6 + 3 + 6 + 5
    assert stats["hit_blocks"] == 10 + 6 + 3 + 5


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([1, 4]),
    st.lists(
        st.tuples(
            st.sampled_from(["record", "record", "record", "forget", "remove", "purge"]),
            st.integers(0, 5),
            st.lists(st.integers(0, 3), max_size=10),
        ),
        max_size=40,
    ),
)
def test_match_agrees_with_a_model_of_sets(shards: int, ops: list[tuple[str, int, list[int]]]) -> None:
    index = PrefixIndex(4 * MiB, block_bytes=4, shards=shards)
    held: dict[str, set[int]] = {}
    for op, replica, path in ops:
        rid, hashes = f"r{replica}", path_hashes(path)
        if op == "record":
            index.record(rid, hashes)
            held.setdefault(rid, set()).update(hashes)
        elif op == "forget":
            index.forget(rid, hashes)
            held.get(rid, set()).difference_update(hashes)
        elif op == "remove":
            index.remove_replica(rid)
            held.pop(rid, None)
        else:
            index.purge_removed()
        expected = {}
        for other, blocks in held.items():
            n = 0
            while n < len(hashes) and hashes[n] in blocks:
                n += 1
            if n:
                expected[other] = n
        assert index.match(hashes, touch=bool(replica % 2)) == expected


class CountingSequence(Sequence[int]):
    """Counts how many elements a consumer pulls."""

    def __init__(self, items: list[int]) -> None:
        self.items = items
        self.pulled = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self.items[i]

    def __iter__(self) -> Iterator[int]:
        for item in self.items:
            self.pulled += 1
            yield item


@pytest.mark.parametrize("shards", [1, 8])
def test_a_miss_costs_one_lookup(shards: int) -> None:
    index = PrefixIndex(8 * MiB, shards=shards)
    rng = random.Random(1)
    held = random_hashes(rng, 5000)
    index.record("r0", held)
    miss = CountingSequence(random_hashes(rng, 5000))
    assert index.match(miss) == {}
    assert miss.pulled <= 2 * 2  # one lookup, plus at most one element read ahead per iterator
    partial = CountingSequence(held[:10] + random_hashes(rng, 5000))
    assert index.match(partial) == {"r0": 10}
    assert partial.pulled <= 2 * 12


def test_many_replicas_beyond_64() -> None:
    index = PrefixIndex(16 * MiB, block_bytes=4)
    shared = [7, 7, 7, 7, 7]
    for i in range(200):
        index.record(f"r{i}", path_hashes([*shared, *([i % 250] * (i % 7))]))
    got = index.match(path_hashes([*shared, *([3] * 6)]))
    assert got["r3"] == 5 + 3
    assert got["r0"] == 5 and got["r199"] == 5
    assert len(got) == 200
    assert index.approx_bytes <= index.max_bytes


def test_record_registers_and_add_replica_is_idempotent() -> None:
    index = PrefixIndex(MiB)
    assert index.add_replica("a") == 0
    assert index.add_replica("a") == 0
    index.record("b", [1, 2])
    assert index.replicas == ["a", "b"]
    assert index.match([1, 2, 3]) == {"b": 2}


def test_forget() -> None:
    index = PrefixIndex(MiB, shards=2)
    index.record("r0", [10, 11, 12, 13])
    index.record("r1", [10, 11])
    assert index.forget("r0", [11, 99]) == 1
    assert index.match([10, 11, 12, 13]) == {"r0": 1, "r1": 2}
    assert index.forget("r1", [11]) == 1
    assert index.num_entries == 3  # 11 is held by nobody now, so it is gone
    assert index.forget("nobody", [10]) == 0


# -- replica removal -------------------------------------------------------------------------------------------


def test_removed_replica_disappears_at_once_and_its_slot_is_reused_clean() -> None:
    index = PrefixIndex(MiB, shards=4)
    prompt = list(range(100, 140))
    for r in ("r0", "r1", "r2"):
        index.record(r, prompt)
    index.remove_replica("r1")
    index.remove_replica("unknown")  # no-op
    assert index.match(prompt) == {"r0": 40, "r2": 40}
    assert index.add_replica("r3") == 3  # slot 1 is still being swept
    for i in range(4):  # one shard is swept per record
        index.record("r0", [i])
    assert index.add_replica("r4") == 1
    assert index.match(prompt) == {"r0": 40, "r2": 40}  # r4 inherits nothing of r1's


def test_purge_removed_and_readding_a_removed_id() -> None:
    index = PrefixIndex(MiB, shards=8)
    prompt = list(range(50))
    index.record("r0", prompt)
    index.record("r1", prompt)
    index.remove_replica("r0")
    index.record("r0", prompt[:5])  # comes back as a new replica with only what it was sent since
    assert index.match(prompt) == {"r1": 50, "r0": 5}
    index.remove_replica("r1")
    index.remove_replica("r0")
    index.purge_removed()
    assert index.num_entries == 0
    assert index.add_replica("x") == 0


# -- LRU eviction and the memory bound -------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_tail_first() -> None:
    index = PrefixIndex(100_000, shards=1)
    cap = index.capacity_entries
    assert 100 < cap < 1000
    rng = random.Random(2)
    a, b = random_hashes(rng, cap // 2), random_hashes(rng, cap - cap // 2)
    index.record("r0", a)
    index.record("r0", b)
    assert index.num_entries == cap and index.evictions == 0
    index.match(a, touch=True)  # `a` becomes the most recently used
    index.record("r1", random_hashes(rng, 10))
    assert index.evictions == 10
    assert index.match(a) == {"r0": len(a)}
    assert index.match(b) == {"r0": len(b) - 10}  # b's last blocks went first; its leading ones stay

    index.record("r1", random_hashes(rng, 5))  # `b` was not refreshed by those matches: it loses 5 more
    assert index.match(b) == {"r0": len(b) - 15}
    index.match(b, touch=True)  # now refresh `b`: `a` is the least recently used
    index.record("r1", random_hashes(rng, 5))
    assert index.match(a) == {"r0": len(a) - 5}
    assert index.match(b) == {"r0": len(b) - 15}


def test_record_refreshes_and_oversized_prompts_keep_their_leading_blocks() -> None:
    index = PrefixIndex(60_000, shards=1)
    cap = index.capacity_entries
    assert 40 < cap < 1000
    rng = random.Random(3)
    a, b = random_hashes(rng, 20), random_hashes(rng, cap - 20)
    index.record("r0", a)
    index.record("r0", b)
    index.record("r1", a)  # re-recording refreshes `a`
    index.record("r0", random_hashes(rng, 3))
    assert index.match(a) == {"r0": 20, "r1": 20}
    huge = random_hashes(rng, 5 * cap)
    index.record("r2", huge)
    assert index.match(huge) == {"r2": cap}
    assert index.num_entries == cap


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="too small"):
        PrefixIndex(1000)
    with pytest.raises(ValueError, match="power of two"):
        PrefixIndex(MiB, shards=3)
    with pytest.raises(ValueError):
        PrefixIndex(MiB, block_bytes=0)
    assert PrefixIndex(MiB).capacity_entries > 0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=60_000, max_value=600_000),
    st.sampled_from([1, 2, 4, None]),
    st.lists(
        st.tuples(st.integers(0, 90), st.integers(0, 3), st.integers(1, 3000), st.integers(0, 2**32)),
        min_size=1,
        max_size=40,
    ),
)
def test_the_bound_holds_under_any_load(
    max_bytes: int, shards: int | None, ops: list[tuple[int, int, int, int]]
) -> None:
    index = PrefixIndex(max_bytes, block_bytes=4, shards=shards)
    for replica, shared, length, seed in ops:
        rng = random.Random(seed)
        hashes = random_hashes(random.Random(shared), 50) + random_hashes(rng, length)
        if replica == 90:
            index.remove_replica(f"r{seed % 90}")
        else:
            index.record(f"r{replica}", hashes)
            index.match(hashes[: length // 2])
        assert index.num_entries <= index.capacity_entries
        assert index.approx_bytes <= max_bytes
        model_table = _SHARD_BASE + _table_bytes(_table_slots(index.capacity_entries // len(index._shards)))
        for shard in index._shards:
            assert sys.getsizeof(shard) <= model_table + len(shard) * 32


def test_full_shard_size_matches_the_model_exactly() -> None:
    index = PrefixIndex(2 * MiB, shards=1)
    cap = index.capacity_entries
    rng = random.Random(4)
    for _ in range(6):  # churn through the table several times, forcing steady-state resizes
        index.record("r0", random_hashes(rng, cap))
    (shard,) = index._shards
    assert isinstance(shard, OrderedDict) and len(shard) == cap
    assert sys.getsizeof(shard) == _SHARD_BASE + _table_bytes(_table_slots(cap)) + 32 * cap
    assert index.approx_bytes <= index.max_bytes


def test_tracemalloc_agrees_with_the_estimate_for_a_large_index() -> None:
    rng = random.Random(5)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = PrefixIndex(16 * MiB, block_bytes=256)
        replicas = [f"replica-{i}" for i in range(16)]
        recorded = 0
        while recorded < 2 * index.capacity_entries:
            prompt = random_hashes(rng, rng.randint(100, 4000))
            index.record(rng.choice(replicas), prompt)
            index.record(rng.choice(replicas), prompt[: len(prompt) // 3])  # some entries held by two replicas
            recorded += len(prompt)
            del prompt
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    estimate = index.approx_bytes
    assert index.num_entries > 0.95 * index.capacity_entries > 50_000
    assert estimate <= index.max_bytes
    # The estimate is an upper bound (pymalloc rounds up what tracemalloc counts), and not a loose one.
    assert estimate / 1.5 <= traced <= estimate, (traced, estimate, traced / estimate)
