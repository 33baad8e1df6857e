"""Llumnix-style migration hints: freeness, source/destination pairing, request choice."""

from __future__ import annotations

import math

from policies.migration import InstanceLoad, RunningRequest, freeness_load, plan_migrations


def inst(rid: str, free: int, contexts: list[int], preempted: int = 0, waiting: int = 0) -> InstanceLoad:
    running = [RunningRequest(f"{rid}-{i}", c, float(i)) for i, c in enumerate(contexts)]
    return InstanceLoad(rid, free, 10, running, waiting, waiting > 0, preempted)


def test_freeness_load() -> None:
    assert freeness_load(inst("a", 110, [])) == -math.inf
    assert freeness_load(inst("a", 110, [100, 100])) == -50.0  # (110 - 10) / 2 steps of headroom, negated
    assert freeness_load(inst("a", 110, [100], waiting=40)) == -30.0  # (100 - 40) / (1 + 1)


def test_pressured_instance_sheds_its_newest_request_to_the_freest() -> None:
    busy = inst("busy", 14, [800, 800, 800, 160])  # 1 step of headroom
    calm = inst("calm", 2000, [160])
    mid = inst("mid", 400, [160, 160])
    hints = plan_migrations([busy, calm, mid])
    assert len(hints) == 1
    h = hints[0]
    assert (h.source, h.destination, h.request_id) == ("busy", "calm", "busy-3")  # LCFS: last admitted


def test_preemptions_make_a_source_and_bar_a_destination() -> None:
    a = inst("a", 1000, [160, 160], preempted=2)
    b = inst("b", 3000, [160], preempted=1)
    c = inst("c", 3000, [160])
    hints = plan_migrations([a, b, c])
    assert [(h.source, h.destination) for h in hints] == [("a", "c")]


def test_balanced_policy_refuses_moves_that_do_not_narrow_the_gap() -> None:
    src = inst("src", 12, [16_000])  # one huge request: moving it just moves the problem
    dst = inst("dst", 600, [160])
    assert plan_migrations([src, dst], policy="balanced") == []
    assert len(plan_migrations([src, dst], policy="prefill_constrained")) == 1


def test_request_choice() -> None:
    busy = inst("busy", 14, [300, 900, 500])
    calm = inst("calm", 5000, [])
    assert plan_migrations([busy, calm], choice="sjf")[0].request_id == "busy-0"
    assert plan_migrations([busy, calm], choice="ljf", policy="prefill_constrained")[0].request_id == "busy-1"


def test_nothing_to_do_on_a_calm_fleet() -> None:
    assert plan_migrations([inst("a", 5000, [160]), inst("b", 5000, [160])]) == []
