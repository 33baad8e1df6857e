"""`fleetroute bench`: capacity by bisection, the report and its columns, on a small trace slice."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emulator.profiles import load_profile
from emulator.sim.bench import add_bench_arguments, run_bench
from emulator.sim.capacity import attainment, bisect_max, find_capacity
from emulator.sim.fleet import SimConfig
from loadgen.traces import read_trace

TRACE = Path(__file__).parent / "data" / "mooncake_conversation_head500.jsonl"


def test_bisection_stops_at_the_precision_between_pass_and_fail() -> None:
    probes: list[float] = []

    def passes(x: float) -> bool:
        probes.append(x)
        return x <= 3.3

    found = bisect_max(passes, 2.0, 4.0, 0.04, 20)
    assert found <= 3.3 < found * 1.04 * 1.04
    assert len(probes) < 10


def test_capacity_is_the_largest_probe_meeting_the_target() -> None:
    trace = read_trace(TRACE, limit=120)
    config = SimConfig(profile=load_profile("h100-llama3-8b"), replicas=4, policy="least_tokens")
    found = find_capacity(trace, config, max_probes=8)
    best = found.best_passing(0.9)
    assert best is not None and best.rate_scale == found.capacity_rate_scale
    assert all(p.attainment < 0.9 for p in found.probes if p.rate_scale > found.capacity_rate_scale)
    assert best.drain_s >= 0.0
    assert 0.0 <= attainment([], config.slos) <= 1.0


def test_bench_writes_a_report_with_capacity_drain_and_reference_load(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    common = ["--trace", str(TRACE), "--max-requests", "60", "--replicas", "8", "--jobs", "1"]
    args = parser.parse_args([*common, "--output", str(tmp_path), "--policies", "round_robin,least_tokens"])
    assert run_bench(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["policy"] for r in rows} == {"round_robin", "least_tokens"}
    rr = next(x for x in rows if x["policy"] == "round_robin")
    for r in rows:
        assert r["capacity_rate_scale"] > 0
        assert r["drain_s"] is not None and r["drain_s"] >= 0
        assert r["reference_rate_scale"] == 0.8 * rr["capacity_rate_scale"]
    report = (tmp_path / "report.md").read_text()
    assert "| drain s |" in report
    assert report.count("| mooncake_conversation_head500.jsonl |") == 2


def test_bench_rejects_unknown_policies(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--trace", str(TRACE), "--output", str(tmp_path), "--policies", "nope"])
    assert run_bench(args) == 2
