"""Fidelity benchmark of the engine emulator: does the emulated replica time iterations like a real one?

Two checks, both by driving the real :class:`~emulator.engine.EngineCore` (``fcfs`` policy) in virtual
time, never by evaluating the step-time formula by hand, so scheduler effects (chunked prefill, decodes
claiming the budget first, preemption) are part of what is measured:

1. Fidelity points: prefill TTFT and pure-decode step times on the H100 and A100 Llama-3-8B profiles,
   compared with the cross-check figures of shared/reference/sim-traces.md §1.10. The H100 prefill
   2048, prefill 8192 and decode batch 64 / context 2000 points are required to be within ±25 %.
2. A request-rate sweep on one H100 replica (Poisson arrivals, ISL 1024 / OSL 256), once with distinct
   prompts and once with a shared 768-token prefix, to show the latency knee and prefix caching at work.

Usage: ``python bench/fidelity.py --output DIR``. Exits 1 when a required H100 point fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from emulator.engine import EngineCore
from emulator.profiles import EngineProfile, load_profile
from emulator.request import EngineRequest, SamplingParams
from policies.scheduling.registry import make_scheduling_policy

H100 = "h100-llama3-8b"
A100 = "a100-llama3-8b"
EOS_TOKEN_ID = 2
TOLERANCE = 0.25
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "fidelity"

# Sweep workload (ISL/OSL) and the shared head of the prefix-shared variant.
ISL = 1024
OSL = 256
SHARED_PREFIX = 768


def token_source(seed: int, i: int) -> int:
    """Generated token ids; never EOS, so only max_tokens ends a request."""
    return 1000 + i % 30000


# ---------------------------------------------------------------------------------------------- references


@dataclass(frozen=True, slots=True)
class Case:
    """One fidelity point: a prefill of ``prompt`` tokens, or a decode step of ``batch`` seqs at ``context``."""

    key: str
    label: str
    prompt: int = 0
    batch: int = 0
    context: int = 0

    @property
    def is_prefill(self) -> bool:
        return self.prompt > 0


CASES = (
    Case("prefill_2048", "prefill 2048 (TTFT)", prompt=2048),
    Case("prefill_8192", "prefill 8192 (TTFT)", prompt=8192),
    Case("decode_b1_c1000", "decode b=1 ctx=1000", batch=1, context=1000),
    Case("decode_b64_c2000", "decode b=64 ctx=2000", batch=64, context=2000),
    Case("decode_b256_c1000", "decode b=256 ctx=1000", batch=256, context=1000),
)

#: The points the issue requires to be within ±25 % of the cross-check figures.
REQUIRED = {(H100, "prefill_2048"), (H100, "prefill_8192"), (H100, "decode_b64_c2000")}

# Cross-check figures (ms) copied from the "Worked values and cross-checks" table of
# shared/reference/sim-traces.md §1.10. Sources named there:
#   * "Dynamo mocker": NVIDIA Dynamo mocker's default polynomial perf model
#     (ai-dynamo/dynamo lib/mocker/src/common/perf_model.rs); H100 column only. Its decode figure depends on
#     KV utilisation u; the table gives u≈0 → "5.7–6" for batch 1 (we use the midpoint 5.85), u≈0.27 for
#     batch 64 / ctx 2000, u≈0.55 for batch 256 / ctx 1000.
#   * "BLIS blackbox": inference-sim/inference-sim historical defaults.yaml (commit 517fe652, fitted on
#     vLLM v0.8.4), Llama-3.1-8B TP1, H100 and A100 columns. §1.3 warns that some of these fits are
#     non-physical (the H100 decode slope of 304 µs/sequence, the A100 prefill slope below roofline).
REFERENCES: dict[str, dict[str, dict[str, float]]] = {
    H100: {
        "prefill_2048": {"Dynamo mocker": 49.4, "BLIS blackbox": 47.0},
        "prefill_8192": {"Dynamo mocker": 169.0, "BLIS blackbox": 168.7},
        "decode_b1_c1000": {"Dynamo mocker": 5.85, "BLIS blackbox": 6.8},
        "decode_b64_c2000": {"Dynamo mocker": 17.6, "BLIS blackbox": 26.0},
        "decode_b256_c1000": {"Dynamo mocker": 27.7, "BLIS blackbox": 84.4},
    },
    A100: {
        "prefill_2048": {"BLIS blackbox": 114.3},
        "prefill_8192": {"BLIS blackbox": 408.0},
        "decode_b1_c1000": {"BLIS blackbox": 16.5},
        "decode_b64_c2000": {"BLIS blackbox": 17.6},
        "decode_b256_c1000": {"BLIS blackbox": 21.1},
    },
}

# The same table's "A100 model" / "H100 model" columns: the §1.10 formula worked by hand for one step.
# Not a pass/fail reference; the ratio to it shows whether the engine's steps follow the formula (and what
# scheduling adds, e.g. chunking an 8192-token prompt into four 2048-token steps on A100).
DOC_MODEL: dict[str, dict[str, float]] = {
    H100: {
        "prefill_2048": 50.5,
        "prefill_8192": 210.0,
        "decode_b1_c1000": 7.4,
        "decode_b64_c2000": 13.9,
        "decode_b256_c1000": 24.7,
    },
    A100: {
        "prefill_2048": 144.6,
        "prefill_8192": 642.0,
        "decode_b1_c1000": 11.4,
        "decode_b64_c2000": 22.1,
        "decode_b256_c1000": 42.2,
    },
}
REF_COLUMNS = ("Dynamo mocker", "BLIS blackbox")

#: References shown but not used for the verdict: sim-traces.md §1.3 calls the BLIS blackbox H100 TP1 decode
#: slope (304 µs per sequence) "far too high" and says to use those fits only as a sanity range.
UNTRUSTED: set[tuple[str, str, str]] = {
    (H100, "decode_b1_c1000", "BLIS blackbox"),
    (H100, "decode_b64_c2000", "BLIS blackbox"),
    (H100, "decode_b256_c1000", "BLIS blackbox"),
}


def trusted_within(profile: str, case: str, ratios: dict[str, float]) -> bool:
    """PASS when within tolerance of every reference trusted for this point."""
    trusted = [r for k, r in ratios.items() if (profile, case, k) not in UNTRUSTED]
    return bool(trusted) and all(abs(r - 1.0) <= TOLERANCE for r in trusted)


# ---------------------------------------------------------------------------------------------- engine helpers


def make_engine(profile: EngineProfile) -> EngineCore:
    """A fresh replica engine: fcfs (vLLM's default), no observer, the profile's own (zero) jitter."""
    return EngineCore(profile, make_scheduling_policy("fcfs"), token_source, eos_token_id=EOS_TOKEN_ID)


def distinct_prompt(index: int, length: int) -> list[int]:
    """A prompt no other index shares: its first token is unique, so its whole block-hash chain is."""
    body = [10_000 + (index * 7919 + 31 * j) % 50_000 for j in range(length - 1)]
    return [100_000 + index, *body]


def shared_prompt(index: int, length: int, head: Sequence[int]) -> list[int]:
    """``head`` followed by a tail unique to ``index``."""
    return [*head, *distinct_prompt(index, length - len(head))]


def make_request(index: int, prompt: list[int], max_tokens: int, arrival: float, block_size: int) -> EngineRequest:
    return EngineRequest(
        request_id=f"r{index}",
        num_prompt_tokens=len(prompt),
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        arrival_time=arrival,
        block_size=block_size,
        prompt_token_ids=prompt,
        seed=index,
    )


@dataclass(frozen=True, slots=True)
class StepShape:
    """What the engine computed in one measured step, and how long it took."""

    duration_ms: float
    num_tokens: int
    num_seqs: int
    num_prefill_tokens: int
    num_decode_seqs: int
    context_tokens: int
    prefill_attention_units: float


def run_one_step(engine: EngineCore, now: float) -> tuple[StepShape, float]:
    """Plan and complete one iteration; returns its shape and the time it ends."""
    step = engine.schedule(now)
    if step is None:
        raise RuntimeError("engine has work but planned no step")
    plan = step.plan
    shape = StepShape(
        duration_ms=step.duration_s * 1000.0,
        num_tokens=plan.num_tokens,
        num_seqs=len(plan.requests),
        num_prefill_tokens=plan.num_prefill_tokens,
        num_decode_seqs=plan.num_decode_seqs,
        context_tokens=plan.context_tokens,
        prefill_attention_units=plan.prefill_attention_units,
    )
    end = now + step.duration_s
    engine.complete_step(step, end)
    return shape, end


# ---------------------------------------------------------------------------------------------- fidelity


@dataclass(slots=True)
class Measurement:
    value_ms: float
    steps: list[StepShape]
    note: str = ""


def measure_prefill(profile: EngineProfile, prompt: int) -> Measurement:
    """TTFT of one prompt on an empty engine: the sum of the steps up to the one that yields its first token."""
    engine = make_engine(profile)
    request = make_request(0, distinct_prompt(0, prompt), 1, 0.0, profile.block_size)
    engine.add_request(request, 0.0)
    now = 0.0
    steps: list[StepShape] = []
    while request.first_token_time is None:
        shape, now = run_one_step(engine, now)
        steps.append(shape)
    note = "" if len(steps) == 1 else f"chunked: {len(steps)} steps of ≤{profile.max_num_batched_tokens} tokens"
    return Measurement(request.first_token_time * 1000.0, steps, note)


def _decode_step(profile: EngineProfile, batch: int, prompt: int) -> StepShape:
    """Prefill ``batch`` distinct prompts, run until every one decodes, then take the next (pure decode) step."""
    engine = make_engine(profile)
    max_tokens = min(4096, profile.max_model_len - prompt)
    requests = [make_request(i, distinct_prompt(i, prompt), max_tokens, 0.0, profile.block_size) for i in range(batch)]
    for r in requests:
        engine.add_request(r, 0.0)
    now = 0.0
    while any(r.first_token_time is None for r in requests):
        _, now = run_one_step(engine, now)
    shape, _ = run_one_step(engine, now)
    if shape.num_prefill_tokens or shape.num_decode_seqs != batch or engine.num_preemptions:
        raise RuntimeError(f"expected a pure decode step of {batch} sequences, got {shape}")
    return shape


def measure_decode(profile: EngineProfile, batch: int, context: int) -> Measurement:
    """Duration of a pure decode step of ``batch`` sequences whose mean context is ``context`` tokens.

    Sequences admitted first decode while later ones still prefill, so they arrive at the measured step
    with longer contexts; re-running with prompts shortened by that excess centres the mean on ``context``.
    """
    prompt = context - 1  # the decode step reads the prompt plus the first generated token
    shape = _decode_step(profile, batch, prompt)
    for _ in range(3):  # shorter prompts chunk differently, so the excess shifts a little: iterate
        excess = round(shape.context_tokens / batch) - context
        if not excess:
            break
        prompt -= excess
        shape = _decode_step(profile, batch, prompt)
    mean_ctx = shape.context_tokens / batch
    return Measurement(shape.duration_ms, [shape], f"prompt {prompt}, mean ctx {mean_ctx:.0f}")


@dataclass(slots=True)
class FidelityRow:
    profile: str
    case: str
    label: str
    value_ms: float
    num_steps: int
    references_ms: dict[str, float]
    reference_mean_ms: float
    ratio: float
    ratios: dict[str, float]
    within_tolerance: bool
    required: bool
    doc_model_ms: float
    ratio_to_doc_model: float
    note: str
    steps: list[StepShape] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return ("PASS" if self.within_tolerance else "FAIL") + (" (req)" if self.required else "")


def run_fidelity() -> list[FidelityRow]:
    rows: list[FidelityRow] = []
    for name in (H100, A100):
        profile = load_profile(name)
        for case in CASES:
            if case.is_prefill:
                m = measure_prefill(profile, case.prompt)
            else:
                m = measure_decode(profile, case.batch, case.context)
            refs = REFERENCES[name][case.key]
            mean = sum(refs.values()) / len(refs)
            ratio = m.value_ms / mean
            doc = DOC_MODEL[name][case.key]
            rows.append(
                FidelityRow(
                    profile=name,
                    case=case.key,
                    label=case.label,
                    value_ms=m.value_ms,
                    num_steps=len(m.steps),
                    references_ms=dict(refs),
                    reference_mean_ms=mean,
                    ratio=ratio,
                    ratios={k: m.value_ms / v for k, v in refs.items()},
                    within_tolerance=trusted_within(name, case.key, {k: m.value_ms / v for k, v in refs.items()}),
                    required=(name, case.key) in REQUIRED,
                    doc_model_ms=doc,
                    ratio_to_doc_model=m.value_ms / doc,
                    note=m.note,
                    steps=m.steps,
                )
            )
    return rows


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


FIDELITY_HEADER = (
    "profile",
    "case",
    "ours ms",
    "steps",
    "Dynamo",
    "÷Dyn",
    "BLIS",
    "÷BLIS",
    "ref mean",
    "ratio",
    "verdict",
    "doc model",
    "÷doc",
    "note",
)


def fidelity_cells(row: FidelityRow) -> list[str]:
    refs, ratios = row.references_ms, row.ratios
    cells = [row.profile, row.label, _fmt(row.value_ms, ".2f"), str(row.num_steps)]
    for col in REF_COLUMNS:
        cells += [_fmt(refs.get(col), ".4g"), _fmt(ratios.get(col), ".2f")]
    cells += [
        _fmt(row.reference_mean_ms, ".2f"),
        _fmt(row.ratio, ".3f"),
        row.verdict,
        _fmt(row.doc_model_ms),
        _fmt(row.ratio_to_doc_model, ".3f"),
        row.note,
    ]
    return cells


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- rate sweep


@dataclass(slots=True)
class SweepPoint:
    rate: float
    num_requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    throughput_rps: float
    output_tok_s: float
    max_running: int
    max_kv_usage: float
    preemptions: int
    prefix_hit_rate: float
    virtual_s: float


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Arrival times; the same seed gives the same draws at every rate, scaled (common random numbers)."""
    gaps = np.random.default_rng(seed).exponential(1.0, n) / rate
    return [float(t) for t in np.cumsum(gaps)]


PromptMaker = Callable[[int], list[int]]


def drive(
    profile: EngineProfile, arrivals: Sequence[float], prompt_of: PromptMaker
) -> tuple[EngineCore, list[EngineRequest], int, float]:
    """Discrete-event driver: add requests at their arrival times, alternate schedule / complete_step.

    Requests arriving while a step is in flight are added at once (as the live runner does) and join
    the next plan; when the engine is idle, virtual time jumps to the next arrival.
    Returns the engine, the requests, the peak running batch and the peak KV usage.
    """
    engine = make_engine(profile)
    requests: list[EngineRequest] = []
    n = len(arrivals)
    i = 0
    now = 0.0
    max_running = 0
    max_kv = 0.0

    def arrive_until(t: float) -> None:
        nonlocal i
        while i < n and arrivals[i] <= t:
            r = make_request(i, prompt_of(i), OSL, arrivals[i], profile.block_size)
            engine.add_request(r, arrivals[i])
            requests.append(r)
            i += 1

    while i < n or engine.has_work():
        if not engine.has_work():
            now = max(now, arrivals[i])
        arrive_until(now)
        step = engine.schedule(now)
        if step is None:
            raise RuntimeError("engine has work but planned no step")
        max_running = max(max_running, engine.num_running)
        max_kv = max(max_kv, engine.kv_usage)
        end = now + step.duration_s
        arrive_until(end)
        engine.complete_step(step, end)
        now = end
    return engine, requests, max_running, max_kv


def summarize(
    rate: float, engine: EngineCore, requests: Sequence[EngineRequest], peaks: tuple[int, float]
) -> SweepPoint:
    """Per-request TTFT and TPOT from the engine's own timestamps (engine-side: no frontend overhead)."""
    ttft: list[float] = []
    tpot: list[float] = []
    for r in requests:
        if r.first_token_time is None or r.last_token_time is None or r.finished_time is None:
            raise RuntimeError(f"request {r.request_id} did not finish")
        ttft.append(r.first_token_time - r.arrival_time)
        tpot.append((r.last_token_time - r.first_token_time) / (r.num_output_tokens - 1))
    start = min(r.arrival_time for r in requests)
    end = max(r.finished_time for r in requests if r.finished_time is not None)
    stats = engine.kv.pool.stats
    t_ms, p_ms = np.array(ttft) * 1000.0, np.array(tpot) * 1000.0
    return SweepPoint(
        rate=rate,
        num_requests=len(requests),
        ttft_p50_ms=float(np.percentile(t_ms, 50)),
        ttft_p99_ms=float(np.percentile(t_ms, 99)),
        tpot_p50_ms=float(np.percentile(p_ms, 50)),
        tpot_p99_ms=float(np.percentile(p_ms, 99)),
        throughput_rps=len(requests) / (end - start),
        output_tok_s=sum(r.num_output_tokens for r in requests) / (end - start),
        max_running=peaks[0],
        max_kv_usage=peaks[1],
        preemptions=engine.num_preemptions,
        prefix_hit_rate=stats.prefix_hit_tokens / stats.prefix_queries_tokens if stats.prefix_queries_tokens else 0.0,
        virtual_s=end - start,
    )


def estimate_capacity(profile: EngineProfile, n: int) -> float:
    """Saturated throughput (req/s): ``n`` distinct requests at t=0, divided by the time to drain them all.

    A burst keeps the batch as large as KV allows, which is where a replica's throughput peaks; the ramp
    and drain make it a slight underestimate, which is all the rate grid needs.
    """
    _, requests, _, _ = drive(profile, [0.0] * n, lambda i: distinct_prompt(i, ISL))
    return n / max(r.finished_time or 0.0 for r in requests)


def pick_rates(capacity: float) -> list[float]:
    """From light load to well past the knee, as fractions of the measured capacity, on a 0.5 req/s grid."""
    fractions = (0.05, 0.2, 0.4, 0.6, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)
    rates = sorted({max(0.5, round(f * capacity * 2) / 2) for f in fractions})
    return rates


def run_sweep(
    profile: EngineProfile, rates: Sequence[float], n: int, seed: int, prompt_of: PromptMaker
) -> list[SweepPoint]:
    points: list[SweepPoint] = []
    for rate in rates:
        engine, requests, max_running, max_kv = drive(profile, poisson_arrivals(rate, n, seed), prompt_of)
        points.append(summarize(rate, engine, requests, (max_running, max_kv)))
    return points


SWEEP_HEADER = (
    "rate/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
    "TPOT p99 ms",
    "n/makespan",
    "out tok/s",
    "max run",
    "max KV",
    "preempt",
    "prefix hit",
)


def sweep_cells(p: SweepPoint) -> list[str]:
    return [
        _fmt(p.rate),
        _fmt(p.ttft_p50_ms),
        _fmt(p.ttft_p99_ms),
        _fmt(p.tpot_p50_ms, ".2f"),
        _fmt(p.tpot_p99_ms, ".2f"),
        _fmt(p.throughput_rps, ".2f"),
        _fmt(p.output_tok_s, ".0f"),
        str(p.max_running),
        _fmt(p.max_kv_usage * 100, ".0f") + "%",
        str(p.preemptions),
        _fmt(p.prefix_hit_rate * 100, ".1f") + "%",
    ]


def _major_tick(value: float, _pos: int | None) -> str:
    """Plain numbers on log axes: "60" reads better than "6×10¹"."""
    return f"{value:g}"


def _minor_tick(value: float, _pos: int | None) -> str:
    """Label only the 2× and 5× minor ticks, enough to read a log axis without clutter."""
    mantissa = f"{value:e}"[0]
    return f"{value:g}" if mantissa in "25" else ""


def _panels(
    fig: Figure,
    series: Sequence[tuple[str, Sequence[SweepPoint], str, float]],
    capacity: float,
) -> None:
    """Two panels (TTFT, TPOT vs rate); each series is (label, points, colour, alpha)."""
    axes: list[Axes] = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    metrics = (("ttft", "TTFT (ms, log scale)"), ("tpot", "TPOT (ms, log scale)"))
    for ax, (metric, ylabel) in zip(axes, metrics, strict=True):
        for label, points, colour, alpha in series:
            rates = [p.rate for p in points]
            p50 = [getattr(p, f"{metric}_p50_ms") for p in points]
            p99 = [getattr(p, f"{metric}_p99_ms") for p in points]
            ax.plot(rates, p50, "o-", color=colour, alpha=alpha, label=f"{label} p50")
            ax.plot(rates, p99, "s--", color=colour, alpha=alpha, label=f"{label} p99")
        ax.axvline(capacity, color="grey", linestyle=":", label=f"saturated throughput (distinct) ≈ {capacity:.1f}/s")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_major_tick))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_tick))
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("time to first token")
    axes[1].set_title("time per output token")


def save_plot(
    path: Path,
    title: str,
    series: Sequence[tuple[str, Sequence[SweepPoint], str, float]],
    capacity: float,
) -> None:
    fig = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(fig)
    _panels(fig, series, capacity)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="directory for JSON, Markdown, PNG")
    parser.add_argument("--requests", type=int, default=600, help="requests per sweep point (default 600)")
    parser.add_argument("--rates", type=str, default="", help="comma-separated req/s (default: from capacity)")
    parser.add_argument("--seed", type=int, default=1, help="arrival-process seed")
    args = parser.parse_args(argv)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()

    # 1. Fidelity points.
    rows = run_fidelity()
    cells = [fidelity_cells(r) for r in rows]
    print(
        f"Fidelity vs sim-traces.md §1.10 cross-checks (PASS = within ±{TOLERANCE:.0%} of every trusted reference; "
        "BLIS H100 decode shown, not trusted: §1.3)"
    )
    print(text_table(FIDELITY_HEADER, cells))
    failed = [r for r in rows if r.required and not r.within_tolerance]
    (out / "fidelity.json").write_text(
        json.dumps({"tolerance": TOLERANCE, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    md = [
        "# Engine emulator fidelity",
        "",
        "Measured by driving `EngineCore` (fcfs) in virtual time. Prefill = TTFT on an empty engine (sum of "
        "step durations up to the first token; A100's 2048-token budget chunks an 8192-token prompt). Decode "
        "= one pure decode step once every sequence decodes. References: sim-traces.md §1.10 cross-check "
        "table (Dynamo mocker polynomial; BLIS blackbox fits). `ratio` = ours / mean of references; PASS "
        f"= within ±{TOLERANCE:.0%} of every trusted reference (BLIS's H100 decode fits are shown but not trusted: "
        "sim-traces.md §1.3 calls their 304 µs/sequence slope far too high); `(req)` marks the points the issue "
        "requires. `doc model` = the table's "
        "hand-worked value of the same formula.",
        "",
        markdown_table(FIDELITY_HEADER, cells),
        "",
    ]
    (out / "fidelity.md").write_text("\n".join(md))

    # 2. Rate sweep on one H100 replica.
    profile = load_profile(H100)
    capacity = estimate_capacity(profile, min(args.requests, 400))
    rates = [float(x) for x in args.rates.split(",")] if args.rates else pick_rates(capacity)
    head = distinct_prompt(10**6, SHARED_PREFIX)
    workloads: dict[str, tuple[str, PromptMaker]] = {
        "distinct": ("distinct prompts", lambda i: distinct_prompt(i, ISL)),
        "prefix_shared": (f"shared {SHARED_PREFIX}-token prefix", lambda i: shared_prompt(i, ISL, head)),
    }
    results: dict[str, list[SweepPoint]] = {}
    print(f"\nRate sweep, one replica {H100}, ISL {ISL} / OSL {OSL} (ignore_eos), {args.requests} Poisson requests")
    print(f"per point, seed {args.seed}; saturated throughput (burst of 400 / drain time) ≈ {capacity:.2f} req/s")
    for key, (desc, prompt_of) in workloads.items():
        results[key] = run_sweep(profile, rates, args.requests, args.seed, prompt_of)
        print(f"\n[{desc}]")
        print(text_table(SWEEP_HEADER, [sweep_cells(p) for p in results[key]]))
    hit_rate = results["prefix_shared"][-1].prefix_hit_rate

    sweep_json: dict[str, Any] = {
        "profile": H100,
        "isl": ISL,
        "osl": OSL,
        "shared_prefix_tokens": SHARED_PREFIX,
        "requests_per_point": args.requests,
        "seed": args.seed,
        "capacity_estimate_rps": capacity,
        "rates": rates,
        "notes": [
            "TTFT/TPOT are engine-side: the profile's frontend_overhead_ms (added by the HTTP server) is excluded.",
            "Past saturation the figures depend on run length: about 400 requests fit in KV and are admitted at"
            " once, so only the later arrivals queue.",
        ],
        "workloads": {k: [asdict(p) for p in v] for k, v in results.items()},
    }
    (out / "rate_sweep.json").write_text(json.dumps(sweep_json, indent=2) + "\n")
    base_title = f"{H100}, one replica, ISL {ISL} / OSL {OSL}, Poisson, {args.requests} req/point"
    save_plot(
        out / "rate_sweep.png",
        f"{base_title}: distinct prompts",
        [("distinct", results["distinct"], "C0", 1)],
        capacity,
    )
    save_plot(
        out / "rate_sweep_prefix.png",
        f"{base_title}: shared {SHARED_PREFIX}-token prefix (hit rate {hit_rate:.1%}) vs distinct",
        [("shared prefix", results["prefix_shared"], "C1", 1.0), ("distinct", results["distinct"], "C0", 0.45)],
        capacity,
    )

    wall = time.perf_counter() - wall0
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    print(f"wall time {wall:.1f} s")
    if failed:
        print("FAILED required points: " + ", ".join(f"{r.profile} {r.label} (ratio {r.ratio:.3f})" for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
