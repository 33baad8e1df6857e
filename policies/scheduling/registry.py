"""Name → engine scheduling policy. One place to register a policy."""

from __future__ import annotations

from collections.abc import Callable

from policies.scheduling.base import EngineSchedulingPolicy
from policies.scheduling.fcfs import FcfsPolicy
from policies.scheduling.larry import LarryPolicy
from policies.scheduling.priority import PriorityPolicy
from policies.scheduling.sjf import SjfPolicy
from policies.scheduling.slai import SlaiPolicy
from policies.scheduling.vtc import VtcPolicy

_FACTORIES: dict[str, Callable[[], EngineSchedulingPolicy]] = {
    FcfsPolicy.name: FcfsPolicy,
    PriorityPolicy.name: PriorityPolicy,
    SjfPolicy.name: SjfPolicy,
    LarryPolicy.name: LarryPolicy,
    VtcPolicy.name: VtcPolicy,
    SlaiPolicy.name: SlaiPolicy,
}


def available_scheduling_policies() -> list[str]:
    return sorted(_FACTORIES)


def make_scheduling_policy(name: str) -> EngineSchedulingPolicy:
    """A fresh policy instance (policies may keep per-engine state)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        known = ", ".join(available_scheduling_policies())
        raise ValueError(f"unknown engine scheduling policy {name!r}; available: {known}") from None
    return factory()
