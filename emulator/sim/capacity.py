"""Capacity at SLO: the largest arrival-rate scale of a trace at which ≥ 90 % of requests meet the SLO.

Found by bracketing (doubling or halving the rate scale from 1) then bisecting, each probe a full
simulation. Failed requests count as missing the SLO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from emulator.sim.fleet import FleetSimulator, SimConfig, SimResult
from loadgen.arrivals import scale_arrivals
from loadgen.records import RequestRecord
from loadgen.traces import TraceRequest


def attainment(records: Sequence[RequestRecord], slos: dict[str, float]) -> float:
    """Share of *all* requests (failed included) that completed within every SLO (ms)."""
    if not records:
        return 0.0
    good = 0
    for r in records:
        if not r.ok or r.ttft is None:
            continue
        if "ttft" in slos and r.ttft * 1000.0 > slos["ttft"]:
            continue
        tpot = r.tpot
        if "tpot" in slos and tpot is not None and tpot * 1000.0 > slos["tpot"]:
            continue
        if "e2el" in slos and r.e2e * 1000.0 > slos["e2el"]:
            continue
        good += 1
    return good / len(records)


@dataclass
class Probe:
    rate_scale: float
    attainment: float
    summary: dict[str, Any]
    replicas: list[dict[str, Any]]
    drain_s: float = 0.0


@dataclass
class CapacityResult:
    capacity_rate_scale: float
    probes: list[Probe]

    def best_passing(self, target: float) -> Probe | None:
        passing = [p for p in self.probes if p.attainment >= target]
        return max(passing, key=lambda p: p.rate_scale) if passing else None


def run_at(trace: Sequence[TraceRequest], config: SimConfig, rate_scale: float) -> tuple[SimResult, float]:
    result = FleetSimulator(config).run(scale_arrivals(trace, rate_scale) if rate_scale != 1.0 else list(trace))
    return result, attainment(result.records, config.slos)


def bisect_max(passes: Callable[[float], bool], lo: float, hi: float, precision: float, probes_left: int) -> float:
    """Narrow ``lo`` (passes) and ``hi`` (fails) by geometric bisection until ``hi/lo <= 1 + precision`` or the
    probe budget is spent; returns the last passing load. Assumes pass/fail is monotone in load."""
    while lo > 0 and hi > 0 and hi / lo > 1 + precision and probes_left > 0:
        mid = (lo * hi) ** 0.5
        probes_left -= 1
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo


def find_capacity(
    trace: Sequence[TraceRequest],
    config: SimConfig,
    target: float = 0.9,
    precision: float = 0.04,
    start: float = 1.0,
    max_probes: int = 14,
    on_probe: Callable[[Probe], None] | None = None,
) -> CapacityResult:
    """Bisection on the rate scale to a relative ``precision``."""
    probes: list[Probe] = []

    def probe(scale: float) -> bool:
        result, att = run_at(trace, config, scale)
        p = Probe(scale, att, result.summary, result.replicas, result.drain_s)
        probes.append(p)
        if on_probe is not None:
            on_probe(p)
        return att >= target

    lo, hi = 0.0, 0.0
    scale = start
    if probe(scale):
        lo = scale
        while len(probes) < max_probes:
            scale *= 2
            if not probe(scale):
                hi = scale
                break
            lo = scale
    else:
        hi = scale
        while len(probes) < max_probes:
            scale /= 2
            if probe(scale):
                lo = scale
                break
            hi = scale
    return CapacityResult(bisect_max(probe, lo, hi, precision, max_probes - len(probes)), probes)


def with_policy(config: SimConfig, policy: str) -> SimConfig:
    return replace(config, policy=policy)
