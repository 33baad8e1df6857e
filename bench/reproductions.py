"""Simulator reproductions of four scheduling papers' headline results, each as a table next to the paper's figure.

The point is not to match absolute numbers (different model, GPU and trace) but to check that the policies we
ship, run on our engine model, move the same metric in the same direction and by a comparable factor:

1. Sarathi-Serve (Agrawal et al., OSDI'24): capacity with chunked prefill vs vLLM's prefill-prioritising
   scheduler (no chunking), under a strict and a relaxed P99 TBT SLO.
2. SLAI (Bari et al., arXiv 2508.01002): ``slai`` vs Sarathi-style ``fcfs`` (and ``sjf``) at a 512-token
   budget: median TTFT across loads and capacity at median TTFT <= 0.5 s.
3. VTC (Sheng et al., OSDI'24, Fig. 3a): service difference between two backlogged clients, ``vtc`` vs ``fcfs``.
4. Llumnix (Sun et al., OSDI'24): ``kv_freeness`` vs ``least_requests`` (and queue-size) dispatch over 16
   replicas with tight KV memory.

Everything runs in the fleet simulator's virtual time and is deterministic for a seed. Method and measured
tables: docs/reproductions.md. Usage: ``python bench/reproductions.py [--output DIR] [--quick] [--only N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from emulator.profiles import EngineProfile, StepTimeCoefficients, load_profile
from emulator.sim.capacity import bisect_max
from emulator.sim.fleet import FleetSimulator, SimConfig, SimResult
from loadgen.arrivals import retime
from loadgen.records import RequestRecord
from loadgen.report import percentile
from loadgen.traces import TraceError, TraceRequest, read_azure
from policies.scheduling import EngineSchedulingPolicy
from policies.scheduling.slai import SlaiPolicy

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "reproductions"
AZURE_CONV = Path(__file__).resolve().parents[2] / "shared" / "data" / "AzureLLMInferenceTrace_conv_2023.csv"

#: (prompt tokens, output tokens) pairs that requests draw from.
Lengths = list[tuple[int, int]]
#: An engine scheduling policy by registry name, or a factory (for policies with non-default parameters).
SchedulerSpec = str | Callable[[], EngineSchedulingPolicy]

# ------------------------------------------------------------------------------------------------ hardware

#: Llama-2-7B on one A10(G) 24 GB, the GPU of the VTC and Llumnix evaluations. No measured profile exists, so
#: it is the A100 profile's model rescaled: weights 12.6 GiB at ~480 GB/s effective (28 ms floor), ~75 TFLOPS
#: effective (0.18 ms/token), 512 KiB of KV per token (no GQA) read at the same bandwidth, attention units at
#: ~60 TFLOPS. Our estimate, not a fit; the experiments that use it compare policies on the same hardware.
A10_LLAMA2_7B = StepTimeCoefficients(
    weight_floor_ms=28.0,
    linear_base_ms=2.0,
    linear_ms_per_token=0.18,
    attn_ms_per_context_token=1.09e-3,
    attn_ms_per_prefill_unit=8.7e-6,
    step_overhead_ms=1.2,
    seq_overhead_ms=0.0044,
)


def a10_profile(num_gpu_blocks: int, **overrides: Any) -> EngineProfile:
    """An A10-class Llama-2-7B replica with ``num_gpu_blocks`` 16-token KV blocks."""
    fields: dict[str, Any] = {
        "name": "a10-llama2-7b",
        "description": "Llama-2-7B on one A10 24 GB (rescaled estimate, bench/reproductions.py)",
        "model": "meta-llama/Llama-2-7b-hf",
        "max_model_len": 4096,
        "num_gpu_blocks": num_gpu_blocks,
        "max_num_batched_tokens": 2048,
        "max_num_seqs": 256,
        "step_time": A10_LLAMA2_7B,
    }
    fields.update(overrides)
    return EngineProfile(**fields)


def a100_profile(budget: int, chunked: bool = True) -> EngineProfile:
    """Our A100 Llama-3-8B profile set up as in Sarathi-Serve's runs: 128 sequences, 8k context.

    Without chunking the prefill batch is capped at ``max_model_len`` tokens, as in Sarathi's vLLM baseline.
    """
    return load_profile("a100-llama3-8b").model_copy(
        update={
            "max_num_seqs": 128,
            "max_model_len": 8192,
            "max_num_batched_tokens": budget,
            "enable_chunked_prefill": chunked,
        }
    )


# ------------------------------------------------------------------------------------------------ workload


def trace_lengths(path: Path, max_total: int) -> Lengths:
    """Prompt and output lengths of an Azure LLM inference trace, without requests over ``max_total`` tokens."""
    return [
        (r.input_length, r.output_length) for r in read_azure(path) if r.input_length + r.output_length <= max_total
    ]


def synthetic_lengths(count: int, max_total: int, seed: int = 0) -> Lengths:
    """Lognormal lengths with the Azure conversation trace's medians (prompt 1020, output 129 tokens).

    The fallback when the trace is not available, and the tests' workload.
    """
    rng = random.Random(seed)
    out: Lengths = []
    while len(out) < count:
        prompt = max(1, round(rng.lognormvariate(math.log(1020), 0.8)))
        output = max(1, round(rng.lognormvariate(math.log(129), 1.0)))
        if prompt + output <= max_total:
            out.append((prompt, output))
    return out


def poisson_trace(lengths: Sequence[tuple[int, int]], count: int, qps: float, seed: int) -> list[TraceRequest]:
    """``count`` requests with Poisson arrivals at ``qps`` and lengths drawn from ``lengths``.

    The same seed gives the same lengths and the same arrival pattern scaled to any rate, so every load and
    every policy sees the same requests (common random numbers keep comparisons tight).
    """
    rng = random.Random(seed)
    drawn = (lengths[rng.randrange(len(lengths))] for _ in range(count))
    return retime([TraceRequest(arrival=0.0, input_length=p, output_length=o) for p, o in drawn], qps, seed=seed)


def client_trace(
    tenant: str, rate: float, duration_s: float, prompt: int, output: int, seed: int
) -> list[TraceRequest]:
    """One client's Poisson requests of fixed lengths over ``duration_s`` seconds."""
    count = int(rate * duration_s * 1.5) + 10
    request = TraceRequest(arrival=0.0, input_length=prompt, output_length=output, tenant=tenant)
    return [r for r in retime([request] * count, rate, seed=seed) if r.arrival <= duration_s]


# ------------------------------------------------------------------------------------------------ running


def simulate(
    profile: EngineProfile,
    trace: Sequence[TraceRequest],
    scheduler: SchedulerSpec = "fcfs",
    replicas: int = 1,
    routing: str = "round_robin",
    routing_params: dict[str, Any] | None = None,
    seed: int = 0,
) -> SimResult:
    """One fleet-simulator run; a scheduler factory replaces each engine's policy before the run."""
    config = SimConfig(
        profile=profile,
        replicas=replicas,
        policy=routing,
        policy_params=dict(routing_params or {}),
        engine_scheduler=scheduler if isinstance(scheduler, str) else "fcfs",
        seed=seed,
    )
    sim = FleetSimulator(config)
    if not isinstance(scheduler, str):
        for engine in sim.engines:
            engine.set_policy(scheduler())
    return sim.run(trace)


@dataclass(frozen=True)
class Stats:
    """Latency summary of one run. TBT is pooled over every inter-token gap of every request (Sarathi's P99)."""

    qps: float
    requests: int
    completed: int
    ttft_p50_s: float
    ttft_mean_s: float
    ttft_p99_s: float
    tbt_p99_s: float
    tbt_max_s: float
    preemptions: int
    output_tok_s: float

    @classmethod
    def of(cls, qps: float, records: Sequence[RequestRecord], preemptions: int) -> Stats:
        ttft = sorted(r.ttft for r in records if r.ok and r.ttft is not None)
        tbt = sorted(g for r in records if r.ok for g in r.itls)
        done = [r for r in records if r.ok and r.ttft is not None]
        span = max((r.end for r in done), default=0.0)
        return cls(
            qps=qps,
            requests=len(records),
            completed=len(done),
            ttft_p50_s=percentile(ttft, 50),
            ttft_mean_s=statistics.fmean(ttft) if ttft else 0.0,
            ttft_p99_s=percentile(ttft, 99),
            tbt_p99_s=percentile(tbt, 99),
            tbt_max_s=tbt[-1] if tbt else 0.0,
            preemptions=preemptions,
            output_tok_s=sum(r.output_len for r in done) / span if span > 0 else 0.0,
        )

    @classmethod
    def of_result(cls, qps: float, result: SimResult) -> Stats:
        return cls.of(qps, result.records, sum(int(r["preemptions"]) for r in result.replicas))


def max_qps(
    measure: Callable[[float], Stats], ok: Callable[[Stats], bool], lo: float, hi: float, precision: float
) -> tuple[float, list[Stats]]:
    """The largest load in ``[lo, hi]`` that passes ``ok``, by geometric bisection to a relative ``precision``.

    Like Sarathi-Serve's capacity search it assumes pass/fail is monotone in load. Returns 0 when even ``lo``
    fails and ``hi`` when ``hi`` passes; also returns the probes, in order.
    """
    probes: list[Stats] = []

    def passes(qps: float) -> bool:
        stats = measure(qps)
        probes.append(stats)
        return ok(stats)

    if not passes(lo):
        return 0.0, probes
    if passes(hi):
        return hi, probes
    return bisect_max(passes, lo, hi, precision, probes_left=1_000), probes


def fmt_capacity(qps: float, ceiling: float) -> str:
    """A capacity for a table: ``>= ceiling`` when the search never found a failing load."""
    return f">= {ceiling:g}" if qps >= ceiling else f"{qps:.2f}"


class Runner:
    """Caches runs by (variant, load), so capacity searches under several SLOs share their probes."""

    def __init__(self, run: Callable[[str, float], Stats]) -> None:
        self._run = run
        self._cache: dict[tuple[str, float], Stats] = {}
        self.runs = 0

    def __call__(self, variant: str, qps: float) -> Stats:
        key = (variant, round(qps, 9))
        if key not in self._cache:
            self._cache[key] = self._run(variant, qps)
            self.runs += 1
        return self._cache[key]


@dataclass(frozen=True)
class Settings:
    """Sizes of one reproduction run; ``quick`` shrinks every experiment."""

    quick: bool
    seed: int
    lengths: Lengths
    lengths_a10: Lengths
    lengths_source: str

    @property
    def requests(self) -> int:
        return 384 if self.quick else 2048  # Sarathi-Serve's capacity search: 2048 requests per trial

    @property
    def precision(self) -> float:
        return 0.08 if self.quick else 0.025


# ------------------------------------------------------------------------------------------------ 1. Sarathi

SARATHI_VARIANTS: dict[str, tuple[int, bool]] = {
    "vLLM-like (no chunking)": (8192, False),
    "Sarathi, budget 512": (512, True),
    "Sarathi, budget 2048": (2048, True),
}
#: P99 TBT SLOs for Mistral-7B on an A100 (Sarathi-Serve artifact, papers.md §4.3) and the budget Sarathi
#: uses under each.
SARATHI_SLOS: dict[str, tuple[float, str]] = {
    "strict": (0.1, "Sarathi, budget 512"),
    "relaxed": (0.5, "Sarathi, budget 2048"),
}
SARATHI_TTFT_P50_S = 2.0
SARATHI_QPS_RANGE = (0.1, 16.0)


def sarathi_ok(slo_s: float) -> Callable[[Stats], bool]:
    return lambda s: s.ttft_p50_s <= SARATHI_TTFT_P50_S and s.tbt_p99_s <= slo_s


def run_sarathi(settings: Settings) -> dict[str, Any]:
    """Capacity (max QPS with P50 TTFT <= 2 s and P99 TBT <= SLO), per scheduler and SLO."""
    profiles = {name: a100_profile(budget, chunked) for name, (budget, chunked) in SARATHI_VARIANTS.items()}

    def run(variant: str, qps: float) -> Stats:
        trace = poisson_trace(settings.lengths, settings.requests, qps, settings.seed)
        return Stats.of_result(qps, simulate(profiles[variant], trace))

    runner = Runner(run)
    capacity: dict[str, dict[str, float]] = {}
    probes: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for slo_name, (slo_s, _) in SARATHI_SLOS.items():
        capacity[slo_name] = {}
        probes[slo_name] = {}
        for variant in SARATHI_VARIANTS:
            cap, found = max_qps(partial(runner, variant), sarathi_ok(slo_s), *SARATHI_QPS_RANGE, settings.precision)
            capacity[slo_name][variant] = cap
            probes[slo_name][variant] = [asdict(p) for p in found]
    # The mechanism: latency of every scheduler at one load, just below the vLLM-like relaxed capacity.
    load = round(0.9 * capacity["relaxed"]["vLLM-like (no chunking)"], 2) or 1.0
    at_load = {variant: asdict(runner(variant, load)) for variant in SARATHI_VARIANTS}
    return {"capacity_qps": capacity, "at_load_qps": load, "at_load": at_load, "probes": probes, "runs": runner.runs}


def sarathi_markdown(r: dict[str, Any]) -> list[str]:
    cap = r["capacity_qps"]
    vllm = "vLLM-like (no chunking)"
    lines = [
        "## 1. Chunked prefill vs none (Sarathi-Serve)",
        "",
        f"Capacity = max QPS with P50 TTFT <= {SARATHI_TTFT_P50_S:g} s and P99 TBT <= SLO; "
        "a100-llama3-8b, 128 sequences, 8k context.",
        "",
        "| P99 TBT SLO | vLLM-like (no chunking) | Sarathi, budget 512 | Sarathi, budget 2048 | "
        "gain (Sarathi at the paper's budget) | paper (Mistral-7B, 1x A100) |",
        "|---|---|---|---|---|---|",
    ]
    for slo_name, (slo_s, best) in SARATHI_SLOS.items():
        row = cap[slo_name]
        gain = f"{row[best] / row[vllm]:.2f}x" if row[vllm] > 0 else "vLLM-like never meets it"
        cells = " | ".join(fmt_capacity(row[v], SARATHI_QPS_RANGE[1]) for v in SARATHI_VARIANTS)
        lines.append(
            f"| {slo_name} ({slo_s:g} s) | {cells} | {gain} ({best}) | 2.6x (abstract; one figure for both SLOs) |"
        )
    lines += [
        "",
        f"Latency at {r['at_load_qps']:g} QPS (0.9x the vLLM-like relaxed capacity):",
        "",
        "| scheduler | P50 TTFT (s) | P99 TTFT (s) | P99 TBT (s) | max TBT (s) | output tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for variant, s in r["at_load"].items():
        lines.append(
            f"| {variant} | {s['ttft_p50_s']:.3f} | {s['ttft_p99_s']:.2f} | {s['tbt_p99_s']:.3f} | "
            f"{s['tbt_max_s']:.3f} | {s['output_tok_s']:.0f} |"
        )
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------ 2. SLAI

SLAI_TTFT_P50_S = 0.5
SLAI_DEADLINE_S = 0.5  # the relaxed tier's TBT deadline; 95 % of the paper's requests are relaxed
SLAI_GUARD_TTFT_P99_S = 10.0
SLAI_VARIANTS: dict[str, tuple[SchedulerSpec, float]] = {
    "Sarathi-FCFS (fcfs)": ("fcfs", SLAI_DEADLINE_S),
    "Sarathi-SPF (sjf)": ("sjf", SLAI_DEADLINE_S),
    "SLAI (slai, 0.5 s deadline)": (lambda: SlaiPolicy(tbt_s=SLAI_DEADLINE_S), SLAI_DEADLINE_S),
    "SLAI (slai, 0.2 s deadline)": (lambda: SlaiPolicy(tbt_s=0.2), 0.2),
}
SLAI_BASE = "Sarathi-FCFS (fcfs)"
SLAI_MAIN = "SLAI (slai, 0.5 s deadline)"
SLAI_LOAD_FRACTIONS = (0.5, 0.75, 0.9, 1.0)
SLAI_QPS_RANGE = (0.5, 16.0)


def slai_ok(deadline_s: float, guard: bool) -> Callable[[Stats], bool]:
    def ok(s: Stats) -> bool:
        met = s.ttft_p50_s <= SLAI_TTFT_P50_S and s.tbt_p99_s <= deadline_s
        return met and (not guard or s.ttft_p99_s <= SLAI_GUARD_TTFT_P99_S)

    return ok


def run_slai(settings: Settings) -> dict[str, Any]:
    """Median TTFT across loads and capacity at median TTFT <= 0.5 s, at a 512-token budget."""
    profile = a100_profile(512)

    def run(variant: str, qps: float) -> Stats:
        trace = poisson_trace(settings.lengths, settings.requests, qps, settings.seed)
        return Stats.of_result(qps, simulate(profile, trace, SLAI_VARIANTS[variant][0]))

    runner = Runner(run)
    capacity: dict[str, dict[str, float]] = {"paper": {}, "guarded": {}}
    for variant, (_, deadline) in SLAI_VARIANTS.items():
        for kind, guard in (("paper", False), ("guarded", True)):
            cap, _ = max_qps(partial(runner, variant), slai_ok(deadline, guard), *SLAI_QPS_RANGE, settings.precision)
            capacity[kind][variant] = cap
    base = capacity["paper"][SLAI_BASE]
    loads = [round(f * base, 2) for f in SLAI_LOAD_FRACTIONS]
    at_load = {f"{q:g}": {v: asdict(runner(v, q)) for v in SLAI_VARIANTS} for q in loads}
    return {"capacity_qps": capacity, "loads_qps": loads, "at_load": at_load, "runs": runner.runs}


def slai_markdown(r: dict[str, Any]) -> list[str]:
    lines = [
        "## 2. SLAI vs Sarathi-style FCFS",
        "",
        "a100-llama3-8b at a 512-token budget, 128 sequences. Median TTFT by load (load as a fraction of "
        "Sarathi-FCFS's capacity below); change vs Sarathi-FCFS in brackets.",
        "",
        "| QPS (x FCFS capacity) | " + " | ".join(SLAI_VARIANTS) + " | paper |",
        "|---|" + "---|" * (len(SLAI_VARIANTS) + 1),
    ]
    for (q, row), frac in zip(r["at_load"].items(), SLAI_LOAD_FRACTIONS, strict=True):
        base = row[SLAI_BASE]["ttft_p50_s"]
        cells = []
        for v in SLAI_VARIANTS:
            p50 = row[v]["ttft_p50_s"]
            cells.append(f"{p50:.3f}" if v == SLAI_BASE else f"{p50:.3f} ({(p50 / base - 1) * 100:+.0f}%)")
        lines.append(f"| {q} ({frac:g}x) | " + " | ".join(cells) + " | -53% (SLAI vs Sarathi, abstract) |")
    lines += [
        "",
        "Tails at the same loads (P99 TTFT s / P99 TBT s):",
        "",
        "| QPS | " + " | ".join(SLAI_VARIANTS) + " |",
        "|---|" + "---|" * len(SLAI_VARIANTS),
    ]
    for q, row in r["at_load"].items():
        cells = [f"{row[v]['ttft_p99_s']:.2f} / {row[v]['tbt_p99_s']:.3f}" for v in SLAI_VARIANTS]
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    cap = r["capacity_qps"]
    lines += [
        "",
        f"Capacity (max QPS) with median TTFT <= {SLAI_TTFT_P50_S:g} s and P99 TBT <= the deadline; 'guarded' "
        f"adds P99 TTFT <= {SLAI_GUARD_TTFT_P99_S:g} s (ours, see docs):",
        "",
        "| scheduler | capacity | vs FCFS | guarded capacity | vs FCFS | paper |",
        "|---|---|---|---|---|---|",
    ]
    for v in SLAI_VARIANTS:
        paper = "+26% (SLAI vs Sarathi, abstract)" if v == SLAI_MAIN else ""
        p, g = cap["paper"][v], cap["guarded"][v]
        pb, gb = cap["paper"][SLAI_BASE], cap["guarded"][SLAI_BASE]
        hi = SLAI_QPS_RANGE[1]
        lines.append(
            f"| {v} | {fmt_capacity(p, hi)} | {(p / pb - 1) * 100:+.0f}%{' or more' if p >= hi else ''} | "
            f"{fmt_capacity(g, hi)} | {(g / gb - 1) * 100:+.0f}% | {paper} |"
        )
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------ 3. VTC

VTC_INPUT_WEIGHT = 1.0
VTC_OUTPUT_WEIGHT = 2.0
VTC_KV_TOKENS = 10_000  # the artifact's --num-token 10000
VTC_CLIENTS = (("A", 1.5), ("B", 3.0))  # 90 and 180 requests per minute
VTC_LENGTH = 256


def vtc_trace(duration_s: float, seed: int) -> list[TraceRequest]:
    trace: list[TraceRequest] = []
    for i, (tenant, rate) in enumerate(VTC_CLIENTS):
        trace += client_trace(tenant, rate, duration_s, VTC_LENGTH, VTC_LENGTH, seed + i)
    return sorted(trace, key=lambda r: r.arrival)


def service_curves(records: Iterable[RequestRecord], times: Sequence[float]) -> dict[str, list[float]]:
    """Each tenant's accumulated service at ``times``: its prompt (weight 1) counts when its first token
    arrives, each output token (weight 2) when it is generated. Recomputation after preemption is not service.
    """
    events: list[tuple[float, str, float]] = []
    for r in records:
        if r.ttft is None:
            continue
        t = r.start + r.ttft
        events.append((t, r.tenant, VTC_INPUT_WEIGHT * r.input_len + VTC_OUTPUT_WEIGHT))
        for gap in r.itls:
            t += gap
            events.append((t, r.tenant, VTC_OUTPUT_WEIGHT))
    events.sort()
    tenants = sorted({e[1] for e in events})
    served = dict.fromkeys(tenants, 0.0)
    curves: dict[str, list[float]] = {t: [] for t in tenants}
    k = 0
    for mark in times:
        while k < len(events) and events[k][0] <= mark:
            served[events[k][1]] += events[k][2]
            k += 1
        for tenant in tenants:
            curves[tenant].append(served[tenant])
    return curves


def service_gap(records: Sequence[RequestRecord], times: Sequence[float]) -> list[float]:
    """Service of client B minus client A at ``times``."""
    curves = service_curves(records, times)
    a = curves.get("A", [0.0] * len(times))
    b = curves.get("B", [0.0] * len(times))
    return [y - x for x, y in zip(a, b, strict=True)]


def run_vtc(settings: Settings) -> dict[str, Any]:
    """Service difference over time between two backlogged clients under fcfs and vtc."""
    duration = 150.0 if settings.quick else 600.0
    profile = a10_profile(VTC_KV_TOKENS // 16)
    trace = vtc_trace(duration, settings.seed)
    times = [float(t) for t in range(10, int(duration) + 1, 10)]
    out: dict[str, Any] = {"duration_s": duration, "times_s": times, "requests": len(trace), "policies": {}}
    for policy in ("fcfs", "vtc"):
        result = simulate(profile, trace, policy)
        gap = service_gap(result.records, times)
        curves = service_curves(result.records, times)
        out["policies"][policy] = {
            "gap": gap,
            "max_abs_gap": max(abs(g) for g in gap),
            "service_A": curves.get("A", []),
            "service_B": curves.get("B", []),
            "preemptions": sum(int(r["preemptions"]) for r in result.replicas),
        }
    # VTC's bound for two backlogged clients: |W_f - W_g| <= 2U, U = max(w_p * L_input, w_q * M).
    out["bound_2U"] = 2 * max(VTC_INPUT_WEIGHT * VTC_LENGTH, VTC_OUTPUT_WEIGHT * VTC_KV_TOKENS)
    return out


def vtc_markdown(r: dict[str, Any]) -> list[str]:
    times: list[float] = r["times_s"]
    fcfs, vtc = r["policies"]["fcfs"], r["policies"]["vtc"]
    marks = [t for t in (30, 60, 120, 240, 360, 480, 600) if t <= r["duration_s"]]
    lines = [
        "## 3. VTC vs FCFS: service difference between two backlogged clients",
        "",
        f"Clients at 90 and 180 req/min, {VTC_LENGTH}/{VTC_LENGTH} tokens, one A10-class replica with a "
        f"{VTC_KV_TOKENS:,}-token KV pool; service = input x{VTC_INPUT_WEIGHT:g} + output x{VTC_OUTPUT_WEIGHT:g}; "
        "difference = W(180 req/min client) - W(90 req/min client).",
        "",
        "| time (s) | FCFS | VTC | paper, Fig. 3a |",
        "|---|---|---|---|",
    ]
    for t in marks:
        i = times.index(float(t))
        paper = "FCFS grows ~linearly to ~3e5 by ~500 s; VTC flat" if t == marks[-1] else ""
        lines.append(f"| {t} | {fcfs['gap'][i]:,.0f} | {vtc['gap'][i]:,.0f} | {paper} |")
    lines += [
        "",
        f"Max |difference|: FCFS {fcfs['max_abs_gap']:,.0f}, VTC {vtc['max_abs_gap']:,.0f} "
        f"(VTC's bound 2U = {r['bound_2U']:,.0f}). Preemptions: FCFS {fcfs['preemptions']}, VTC {vtc['preemptions']}.",
        "",
    ]
    return lines


# ------------------------------------------------------------------------------------------------ 4. Llumnix

LLUMNIX_REPLICAS = 16
#: KV of Llama-2-7B on an A10 24 GB at gpu_memory_utilization 0.9: ~20.1 GiB - 12.6 GiB weights - ~1 GiB
#: activations = ~6.5 GiB at 512 KiB per token = ~13.3k tokens.
LLUMNIX_BLOCKS = 832
LLUMNIX_POLICIES: dict[str, tuple[str, dict[str, Any]]] = {
    "queue size (Llumnix's baseline)": ("weighted", {"scorers": {"queue": 1}}),
    "least_requests": ("least_requests", {}),
    "kv_freeness": ("kv_freeness", {}),
}


def run_llumnix(settings: Settings) -> dict[str, Any]:
    """TTFT and TBT of queue-size, least-requests and freeness dispatch over 16 replicas, by arrival rate."""
    profile = a10_profile(LLUMNIX_BLOCKS)
    rates = [14.0] if settings.quick else [12.0, 13.0, 14.0, 15.0, 16.0]
    seeds = [settings.seed] if settings.quick else [settings.seed, settings.seed + 1]
    count = 1500 if settings.quick else 4000
    out: dict[str, Any] = {"rates": rates, "seeds": seeds, "requests_per_seed": count, "results": {}}
    for rate in rates:
        row: dict[str, Any] = {}
        for name, (routing, params) in LLUMNIX_POLICIES.items():
            records: list[RequestRecord] = []
            preemptions = 0
            for seed in seeds:
                trace = poisson_trace(settings.lengths_a10, count, rate, seed)
                result = simulate(profile, trace, replicas=LLUMNIX_REPLICAS, routing=routing, routing_params=params)
                records += result.records
                preemptions += sum(int(r["preemptions"]) for r in result.replicas)
            row[name] = asdict(Stats.of(rate, records, preemptions))
        out["results"][f"{rate:g}"] = row
    return out


def llumnix_markdown(r: dict[str, Any]) -> list[str]:
    lines = [
        "## 4. Freeness dispatch vs least-requests (Llumnix)",
        "",
        f"{LLUMNIX_REPLICAS} A10-class Llama-2-7B replicas ({LLUMNIX_BLOCKS * 16:,}-token KV each), Poisson "
        f"arrivals, {r['requests_per_seed']} requests x {len(r['seeds'])} seed(s) per point. "
        "TTFT mean / P99 in seconds; the ratio is the baseline's over kv_freeness's (higher = freeness better).",
        "",
        "| rate (req/s) | queue size | least_requests | kv_freeness | vs least_requests (mean / P99) | "
        "vs queue size (mean / P99) | preemptions (q / lr / kv) | paper vs queue size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    q_name, lr_name, kv_name = LLUMNIX_POLICIES
    for rate, row in r["results"].items():
        q, lr, kv = row[q_name], row[lr_name], row[kv_name]

        def ratio(base: dict[str, Any], key: str, kv: dict[str, Any] = kv) -> str:
            return f"{base[key] / kv[key]:.2f}x" if kv[key] > 0 else "n/a"

        lines.append(
            f"| {rate} | {q['ttft_mean_s']:.3f} / {q['ttft_p99_s']:.2f} | {lr['ttft_mean_s']:.3f} / "
            f"{lr['ttft_p99_s']:.2f} | {kv['ttft_mean_s']:.3f} / {kv['ttft_p99_s']:.2f} | "
            f"{ratio(lr, 'ttft_mean_s')} / {ratio(lr, 'ttft_p99_s')} | {ratio(q, 'ttft_mean_s')} / "
            f"{ratio(q, 'ttft_p99_s')} | {q['preemptions']} / {lr['preemptions']} / {kv['preemptions']} | "
            "up to 1.8x / 7.7x |"
        )
    lines += ["", "P99 TBT (s), queue size / least_requests / kv_freeness (paper: 1.4x better than queue size):", ""]
    for rate, row in r["results"].items():
        lines.append(f"* {rate} req/s: " + " / ".join(f"{row[n]['tbt_p99_s']:.3f}" for n in LLUMNIX_POLICIES))
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------ main

EXPERIMENTS: dict[str, tuple[Callable[[Settings], dict[str, Any]], Callable[[dict[str, Any]], list[str]]]] = {
    "sarathi": (run_sarathi, sarathi_markdown),
    "slai": (run_slai, slai_markdown),
    "vtc": (run_vtc, vtc_markdown),
    "llumnix": (run_llumnix, llumnix_markdown),
}


def load_settings(quick: bool, seed: int, lengths_path: Path) -> Settings:
    """Lengths from the Azure conversation trace, or the synthetic fallback when it is missing."""
    try:
        lengths = trace_lengths(lengths_path, 8192)
        lengths_a10 = trace_lengths(lengths_path, 4096)
        source = f"{lengths_path.name} ({len(lengths)} requests <= 8192 tokens; {len(lengths_a10)} <= 4096)"
    except (OSError, TraceError) as exc:
        print(f"reproductions: {exc}; using synthetic lengths", file=sys.stderr)
        lengths = synthetic_lengths(20_000, 8192, seed)
        lengths_a10 = synthetic_lengths(20_000, 4096, seed)
        source = "synthetic lognormal (medians 1020 / 129 tokens)"
    return Settings(quick, seed, lengths, lengths_a10, source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="directory for reproductions.{md,json}")
    parser.add_argument("--quick", action="store_true", help="small, fast runs (a smoke test, not the tables)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", type=Path, default=AZURE_CONV, help="Azure 2023 CSV to draw request lengths from")
    parser.add_argument("--only", nargs="*", choices=list(EXPERIMENTS), help="run only these experiments")
    args = parser.parse_args(argv)
    settings = load_settings(args.quick, args.seed, args.lengths)
    results: dict[str, Any] = {
        "quick": args.quick,
        "seed": args.seed,
        "lengths": settings.lengths_source,
        "profiles": {
            "a100-llama3-8b (Sarathi, SLAI; budget and chunking vary)": a100_profile(2048).model_dump(),
            "a10-llama2-7b (VTC: 625 blocks; Llumnix: 832 blocks)": a10_profile(LLUMNIX_BLOCKS).model_dump(),
        },
        "experiments": {},
    }
    report = [
        "# Simulator reproductions" + (" (quick mode: small runs, not the tables)" if args.quick else ""),
        "",
        f"Seed {args.seed}; request lengths from {settings.lengths_source}. Method: docs/reproductions.md.",
        "",
    ]
    for name in args.only or list(EXPERIMENTS):
        run, render = EXPERIMENTS[name]
        started = time.perf_counter()
        data = run(settings)
        data["wall_s"] = round(time.perf_counter() - started, 1)
        results["experiments"][name] = data
        report += render(data)
        print(f"reproductions: {name} done in {data['wall_s']} s", file=sys.stderr, flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "reproductions.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.output / "reproductions.md").write_text("\n".join(report))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
