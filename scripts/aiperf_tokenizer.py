#!/usr/bin/env python3
"""Build an offline Hugging Face tokenizer that speaks fleetroute's words, for AIPerf (docs/aiperf.md).

    /tmp/aiperf-venv/bin/python scripts/aiperf_tokenizer.py OUTDIR [--name local/simtok] [--no-check]

AIPerf synthesises prompts by tokenising a text corpus (Shakespeare) with the benchmark's tokenizer, cutting
windows of token ids (one per Mooncake ``hash_id``) and *decoding* them; it then counts input and output
tokens with the same tokenizer. It can load a tokenizer only from the Hugging Face hub or cache. This script
writes one into ``OUTDIR`` laid out as a hub cache (use ``HF_HUB_CACHE=OUTDIR HF_HUB_OFFLINE=1 --tokenizer
local/simtok``)::

    OUTDIR/models--local--simtok/refs/main                      -> <40-hex>
    OUTDIR/models--local--simtok/snapshots/<40-hex>/tokenizer.json, tokenizer_config.json, config.json

The tokenizer (``tokenizers`` WordLevel model):

* vocabulary: ``emulator.tokenizer.WORDS`` (32,400 pseudo-words, id ``i`` = ``WORDS[i]``) plus ``[UNK]``
  (id 32,400, special, never produced for normalised text);
* decoder: joins the words with single spaces, so any id sequence decodes to ``"w1 w2 ... wn"``, which
  ``emulator.tokenizer`` counts as exactly ``n`` tokens (a bare first word, then space-led words) -- the
  emulator's ``usage.prompt_tokens`` equals AIPerf's ISL for completions (+3 chat-template tokens for chat);
* normaliser: folds any text into our alphabet so that *English* (AIPerf's corpus) also becomes our words:
  NFKD, strip accents, lowercase, ``c,q -> k``, ``w -> v``, ``x -> s``, ``y -> i``, anything else -> one
  space; then a consonant not followed by a vowel gets an ``a`` (except a word-final ``l,n,r,s`` after a
  vowel) and a vowel not preceded by a consonant gets an ``h``. Every word is then ``(CV)+[lnrs]?``, and
  text already made of our words is unchanged;
* pre-tokeniser: split on whitespace, then cut each word into ``(CV){1,2}`` chunks with an optional final
  ``l,n,r,s`` -- every chunk is in the vocabulary (all four shapes are enumerated in full).

So "Thou art more lovely" -> ``ta ho hu ar ta mo re lo ve li``; each id still decodes to one of our words.

Needs ``tokenizers`` and ``transformers`` (both come with ``pip install aiperf``); ``emulator.tokenizer`` is
standard-library only and is imported from this repository, so run it with the AIPerf venv's Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emulator.tokenizer import WORDS, chat_overhead_tokens, get_tokenizer  # noqa: E402

CONSONANTS = "bdfghjklmnprstvz"
VOWELS = "aeiou"
FINALS = "lnrs"
UNK = "[UNK]"

# Word-level chunks: one or two consonant-vowel pairs and an optional final l/n/r/s that ends the word
# (not followed by a vowel, so it is not the consonant of the next pair).
CHUNK_RE = f"(?:[{CONSONANTS}][{VOWELS}]){{1,2}}(?:[{FINALS}](?![{VOWELS}]))?"


def build_backend():  # -> tokenizers.Tokenizer
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    assert len(WORDS) == 32_400 and len(set(WORDS)) == len(WORDS)
    vocab = {word: i for i, word in enumerate(WORDS)}
    vocab[UNK] = len(WORDS)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    non_final = "".join(c for c in CONSONANTS if c not in FINALS)
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex("[cq]"), "k"),
            normalizers.Replace("w", "v"),
            normalizers.Replace("x", "s"),
            normalizers.Replace("y", "i"),
            normalizers.Replace(Regex("[^a-z]+"), " "),
            # a consonant must be followed by a vowel ...
            normalizers.Replace(Regex(f"(?<=[{non_final}])(?![{VOWELS}])"), "a"),
            # ... except l/n/r/s that end a word after a vowel (our CVC / CVCVC words)
            normalizers.Replace(Regex(f"(?<=[{FINALS}])(?![{VOWELS}])(?:(?<![{VOWELS}][{FINALS}])|(?=[a-z]))"), "a"),
            # a vowel must follow a consonant
            normalizers.Replace(Regex(f"(?<![{CONSONANTS}])(?=[{VOWELS}])"), "h"),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(CHUNK_RE), behavior="isolated")]
    )
    # WordPiece's decoder without "##" pieces and without cleanup = join the tokens with one space.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([UNK])
    return tok


def write_cache(outdir: Path, name: str) -> tuple[Path, str]:
    """Save the tokenizer with ``save_pretrained`` and install it as ``name`` in a hub-cache layout."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(),
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,  # Mooncake prompts reach 126k tokens; no truncation warnings
    )
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    files.setdefault("config.json", b"{}")  # tokenizer-only repo: what AIPerf would stub anyway
    digest = hashlib.sha1()
    for fname, data in sorted(files.items()):
        digest.update(fname.encode() + b"\0" + hashlib.sha1(data).digest())
    commit = digest.hexdigest()  # 40 hex, deterministic for the same content

    repo_dir = outdir / ("models--" + name.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    snapshot.mkdir(parents=True)
    for fname, data in files.items():
        (snapshot / fname).write_bytes(data)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot, commit


def aiperf_corpus_lines() -> tuple[list[str], str]:
    """The corpus AIPerf tokenises (its bundled Shakespeare) when aiperf is importable; else a fallback."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("aiperf")
        if spec and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "dataset/generator/assets/shakespeare.txt"
            if path.is_file():
                return path.read_text(encoding="utf-8").splitlines(), str(path)
    except Exception:  # pragma: no cover - diagnostics only
        pass
    text = (
        "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
        "Rough winds do shake the darling buds of May, And summer's lease hath all too short a date; "
    ) * 200
    return [text], "built-in sample"


def check(outdir: Path, name: str) -> bool:
    """Load the tokenizer back offline and compare its counts with ``emulator.tokenizer``. ``main`` sets
    HF_HUB_CACHE / HF_HUB_OFFLINE before ``huggingface_hub`` is first imported (it reads them at import)."""
    ours = get_tokenizer()
    ok = True

    try:  # exactly the loader AIPerf uses, when run from the AIPerf venv
        from aiperf.common.tokenizer import Tokenizer as AIPerfTokenizer

        hf = AIPerfTokenizer.from_pretrained(name)
        loader = "aiperf.common.tokenizer.Tokenizer.from_pretrained"
    except ImportError:
        from huggingface_hub import snapshot_download
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(snapshot_download(name, local_files_only=True))
        loader = "transformers.AutoTokenizer (aiperf not importable)"
    print(
        f"loaded {name!r} offline via {loader}: vocab_size={hf.vocab_size} bos={hf.bos_token_id} eos={hf.eos_token_id}"
    )

    def encode(text: str) -> list[int]:
        return list(hf.encode(text, add_special_tokens=False))

    def decode(ids: list[int]) -> str:
        return hf.decode(ids, skip_special_tokens=False)

    # 1. round trip on our words
    rng = random.Random(0)
    ids = [rng.randrange(len(WORDS)) for _ in range(5000)] + [0, len(WORDS) - 1]
    text = decode(ids)
    rt_ids = encode(text) == ids
    rt_text = decode(encode(text)) == text
    exact = ours.token_count(text) == len(ids)
    print(
        f"round trip: encode(decode(ids)) == ids: {rt_ids}; decode(encode(text)) == text: {rt_text}; "
        f"our token_count == {len(ids)}: {exact}"
    )
    ok &= rt_ids and rt_text and exact
    sample = "".join(" " + w for w in ("ba", "bal", "baba", "babal", "zuzus"))
    print(f"  {sample!r} -> {encode(sample)} -> {decode(encode(sample))!r}")
    ok &= decode(encode(sample)) == sample.lstrip(" ")

    # 2. English (AIPerf's corpus) becomes our words, with no [UNK]
    english = "Shall I compare thee to a summer's day? Thou art more lovely, and more temperate: 1609 Qxyw!"
    eng_ids = encode(english)
    unk = len(WORDS)  # the id of [UNK]
    print(f"  {english!r}\n  -> {decode(eng_ids)!r} ({len(eng_ids)} tokens, [UNK]: {eng_ids.count(unk)})")
    ok &= unk not in eng_ids

    # 3. AIPerf-style Mooncake synthesis: tokenise the corpus as AIPerf does (lines joined by " " in
    # ~10k-character chunks), cut one window per hash_id (a 512-token block; the last block partial),
    # decode, then count with both tokenizers (and the chat template's +3 on the emulator side).
    lines, source = aiperf_corpus_lines()
    t0 = time.perf_counter()
    corpus: list[int] = []
    chunk: list[str] = []
    size = 0
    for line in (x.strip() for x in lines):
        if not line:
            continue
        chunk.append(line)
        size += len(line)
        if size >= 10_000:
            corpus += encode(" ".join(chunk))
            chunk, size = [], 0
    if chunk:
        corpus += encode(" ".join(chunk))
    dt = time.perf_counter() - t0
    n_unk = corpus.count(unk)
    print(
        f"corpus {source}: {len(corpus):,} tokens, {len(set(corpus)):,} distinct ids, "
        f"[UNK] {n_unk}, tokenised in {dt:.1f} s"
    )
    ok &= n_unk == 0

    trace = REPO / "tests/data/mooncake_conversation_head500.jsonl"
    rows = [json.loads(x) for x in trace.read_text().splitlines()[:100] if x.strip()]
    blocks: dict[int, list[int]] = {}
    brng = random.Random(1)
    totals = {"isl": 0, "hf": 0, "ours": 0, "mismatch": 0}
    for row in rows:
        hash_ids, isl = row["hash_ids"], row["input_length"]
        last = isl - 512 * (len(hash_ids) - 1)
        toks: list[int] = []
        for i, h in enumerate(hash_ids):
            n = last if i == len(hash_ids) - 1 else 512
            if h not in blocks:
                start = brng.randrange(len(corpus))
                blocks[h] = (
                    (corpus + corpus)[start : start + n] if start + n > len(corpus) else corpus[start : start + n]
                )
            toks += blocks[h][:n]
        prompt = decode(toks)
        n_hf, n_ours = len(encode(prompt)), ours.token_count(prompt)
        totals["isl"] += isl
        totals["hf"] += n_hf
        totals["ours"] += n_ours
        totals["mismatch"] += int(n_hf != n_ours or n_hf != isl)
    chat = ours.token_count(prompt) + chat_overhead_tokens(1)
    print(
        f"AIPerf-style prompts for the first {len(rows)} Mooncake rows: trace ISL {totals['isl']:,}, "
        f"HF tokenizer {totals['hf']:,}, emulator.tokenizer {totals['ours']:,}, rows differing {totals['mismatch']} "
        f"(chat adds {chat_overhead_tokens(1)} template tokens per request on the emulator side, "
        f"e.g. last row {isl} -> {chat})"
    )
    ok &= totals["mismatch"] == 0

    # 4. the emulator's replies (space-led words) count the same with both tokenizers
    from emulator.tokenizer import output_token_id

    reply = ours.decode(output_token_id(7, i) for i in range(300))
    print(f"emulator reply of 300 tokens: HF counts {len(encode(reply))}, ours {ours.token_count(reply)}")
    ok &= len(encode(reply)) == 300
    print("CHECK", "OK" if ok else "FAILED")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="directory to use as HF_HUB_CACHE")
    parser.add_argument("--name", default="local/simtok", help="repo id to install as (default local/simtok)")
    parser.add_argument("--no-check", action="store_true", help="skip the offline load and token-count checks")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    # before transformers / huggingface_hub are imported: they read these once, at import time
    os.environ["HF_HUB_CACHE"] = str(args.outdir.resolve())
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    snapshot, commit = write_cache(args.outdir.resolve(), args.name)
    print(f"wrote {snapshot} ({', '.join(sorted(p.name for p in snapshot.iterdir()))}); refs/main = {commit}")
    print(f"use: HF_HUB_CACHE={args.outdir.resolve()} HF_HUB_OFFLINE=1 aiperf profile --tokenizer {args.name} ...")
    if args.no_check:
        return 0
    return 0 if check(args.outdir.resolve(), args.name) else 1


if __name__ == "__main__":
    sys.exit(main())
