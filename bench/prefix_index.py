"""Micro-benchmark of prompt hashing and the prefix index: the router's per-request prefix work.

Run: ``.venv/bin/python bench/prefix_index.py`` (``--quick`` for fewer repetitions). Prints three tables:

1. Per block size: hashing a ~100k-token prompt (600 KB of text), matching it fully against 64 replicas in a
   full 64 MiB index (with and without the LRU refresh), a miss, and recording it (already held, and new).
2. Memory per entry at steady state: the index's estimate, and what tracemalloc sees.
3. ``record`` latency under steady churn, sharded (as built) against one big dict, showing the resize stall
   that sharding bounds.

Times are the median of repeated runs (min in brackets); nothing here asserts.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable

import xxhash

from router.prefix_index import PrefixIndex, prompt_block_hashes

MiB = 1 << 20
PROMPT_BYTES = 600_000  # ~100k tokens of English text at ~6 bytes per token
REPLICAS = 64


def text_prompt(n_bytes: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    out = bytearray()
    while len(out) < n_bytes:
        out += rng.choice(words) + b" "
    return bytes(out[:n_bytes])


def timed(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> tuple[float, float]:
    """(median, min) seconds of ``fn``; ``setup`` runs untimed before each call."""
    samples = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), min(samples)


def us(t: tuple[float, float]) -> str:
    return f"{t[0] * 1e6:8.0f} [{t[1] * 1e6:6.0f}]"


def hashes_memoryview_loop(data: bytes, block_bytes: int) -> list[int]:
    """The straightforward alternative: memoryview slices in a Python loop (kept for comparison)."""
    view = memoryview(data)
    h, out = 0, []
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        h = xxhash.xxh3_64_intdigest(view[start : start + block_bytes], h)
        out.append(h)
    return out


def per_block_size(repeat: int) -> None:
    data = text_prompt(PROMPT_BYTES)
    other = text_prompt(PROMPT_BYTES, seed=1)
    print(f"\n1. One {PROMPT_BYTES // 1000} KB prompt (~100k tokens), {REPLICAS} replicas all holding it")
    print("   times in us: median [min]")
    header = (
        f"{'block B':>7} {'blocks':>6} | {'hash':>15} {'hash (mv loop)':>15} | {'match':>15} {'match+touch':>15}"
        f" {'miss':>8} | {'hash+match':>10} {'+touch':>8} | {'record held':>15} {'record new':>15}"
    )
    print(header)
    print("-" * len(header))
    for block_bytes in (128, 256, 512):
        hashes = prompt_block_hashes(data, block_bytes)
        assert hashes == hashes_memoryview_loop(data, block_bytes)
        new_prompts = iter([prompt_block_hashes(text_prompt(PROMPT_BYTES, seed=s), block_bytes) for s in range(2, 40)])
        index = PrefixIndex(64 * MiB, block_bytes)
        for r in range(REPLICAS):
            index.record(f"replica-{r}", hashes)
        # Fill the rest of the budget so "record new" pays for evictions.
        rng = random.Random(0)
        while index.num_entries < index.capacity_entries:
            index.record(f"replica-{rng.randrange(REPLICAS)}", [rng.getrandbits(64) for _ in range(5000)])
        for r in range(REPLICAS):
            index.record(f"replica-{r}", hashes)
        assert index.match(hashes) == {f"replica-{r}": len(hashes) for r in range(REPLICAS)}
        miss = prompt_block_hashes(other, block_bytes)

        t_hash = timed(lambda: prompt_block_hashes(data, block_bytes), repeat)  # noqa: B023
        t_mv = timed(lambda: hashes_memoryview_loop(data, block_bytes), repeat)  # noqa: B023
        t_match = timed(lambda: index.match(hashes), repeat)  # noqa: B023
        t_touch = timed(lambda: index.match(hashes, touch=True), repeat)  # noqa: B023
        t_miss = timed(lambda: index.match(miss), repeat * 10)  # noqa: B023
        t_held = timed(lambda: index.record("replica-0", hashes), repeat)  # noqa: B023
        t_new = timed(lambda: index.record("replica-1", next(new_prompts)), min(repeat, 30))  # noqa: B023
        print(
            f"{block_bytes:>7} {len(hashes):>6} | {us(t_hash)} {us(t_mv)} | {us(t_match)} {us(t_touch)}"
            f" {t_miss[0] * 1e6:8.1f} | {(t_hash[0] + t_match[0]) * 1e6:10.0f} {(t_hash[0] + t_touch[0]) * 1e6:8.0f}"
            f" | {us(t_held)} {us(t_new)}"
        )
    print("   'match' walks all blocks (the default); 'match+touch' also refreshes their LRU position;")
    print("   'record new' inserts a prompt of new blocks into a full index, evicting as many entries.")


def memory(quick: bool) -> None:
    print("\n2. Memory at steady state (index filled to 3x its capacity with random prompts)")
    header = (
        f"{'budget':>8} {'replicas':>8} {'shards':>6} {'entries':>9} | {'estimate B/entry':>16}"
        f" {'tracemalloc B/entry':>19} {'traced/estimate':>15} | {'approx/max':>10}"
    )
    print(header)
    print("-" * len(header))
    cases = (
        [(8 * MiB, 8), (32 * MiB, 64)] if quick else [(8 * MiB, 8), (32 * MiB, 16), (32 * MiB, 64), (128 * MiB, 200)]
    )
    rng = random.Random(1)
    for budget, replicas in cases:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        index = PrefixIndex(budget)
        for r in range(replicas):
            index.add_replica(f"replica-{r}")
        recorded = 0
        while recorded < 3 * index.capacity_entries:
            prompt = [rng.getrandbits(64) for _ in range(rng.randint(100, 4000))]
            index.record(f"replica-{rng.randrange(replicas)}", prompt)
            index.record(f"replica-{rng.randrange(replicas)}", prompt[: len(prompt) // 4])
            recorded += len(prompt)
        del prompt
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        n = index.num_entries
        print(
            f"{budget // MiB:>5}MiB {replicas:>8} {len(index._shards):>6} {n:>9} | {index.approx_bytes / n:>16.0f}"
            f" {traced / n:>19.0f} {traced / index.approx_bytes:>15.2f} | {index.approx_bytes / budget:>10.3f}"
        )
    print("   tracemalloc counts requested sizes; pymalloc rounds a 36-byte key int up to a 48-byte block,")
    print("   which the estimate includes, and it assumes every mask is its own int object.")


def stalls(quick: bool) -> None:
    budget = 64 * MiB if quick else 192 * MiB
    print(f"\n3. Single record() latency at steady state, {budget // MiB} MiB budget, prompts of 2,000 new blocks")
    header = f"{'layout':>22} {'entries':>9} | {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>8} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    for label, shards in (("sharded (default)", None), ("one OrderedDict", 1)):
        index = PrefixIndex(budget, shards=shards)
        rng = random.Random(2)
        while index.evictions < index.capacity_entries:  # fill, then churn through it once, untimed
            index.record("replica-0", [rng.getrandbits(64) for _ in range(5000)])
        samples: list[float] = []
        while len(samples) * 2000 < 4 * index.capacity_entries:  # one big table refills every ~2.7x
            prompt = [rng.getrandbits(64) for _ in range(2000)]
            t0 = time.perf_counter()
            index.record("replica-0", prompt)
            samples.append(time.perf_counter() - t0)
        samples.sort()
        p50, p99, p999 = (samples[int(len(samples) * q)] * 1e6 for q in (0.5, 0.99, 0.999))
        name = f"{label} x{len(index._shards)}"
        print(f"{name:>22} {index.num_entries:>9} | {p50:>8.0f} {p99:>8.0f} {p999:>8.0f} {samples[-1] * 1e3:>8.1f}")
    print("   A dict rehashes its whole table when churn uses up its free slots; shards bound that stall.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller indexes")
    args = parser.parse_args()
    repeat = 20 if args.quick else 100
    print(f"Python {sys.version.split()[0]}, xxhash {xxhash.VERSION}, {os.cpu_count()} CPUs")
    per_block_size(repeat)
    memory(args.quick)
    stalls(args.quick)


if __name__ == "__main__":
    main()
