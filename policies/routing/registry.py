"""Name → routing policy factory; ``default`` aliases the policy the router uses by default."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from policies.routing.base import RoutingPolicy
from policies.routing.basic import LeastRequests, RandomChoice, RoundRobin
from policies.routing.chwbl import Chwbl
from policies.routing.dynamo_cost import DynamoCost
from policies.routing.kv_freeness import KvFreeness
from policies.routing.least_tokens import LeastTokens
from policies.routing.llmd_scorer import LlmdScorer
from policies.routing.pipeline import WeightedPolicy
from policies.routing.power_of_two import PowerOfTwo
from policies.routing.preble_e2 import PrebleE2
from policies.routing.prefix_affinity import PrefixAffinity
from policies.routing.session_affinity import SessionAffinity
from policies.routing.sglang_cache_aware import SglangCacheAware

_FACTORIES: dict[str, Callable[..., RoutingPolicy]] = {
    RoundRobin.name: RoundRobin,
    RandomChoice.name: RandomChoice,
    LeastRequests.name: LeastRequests,
    LeastTokens.name: LeastTokens,
    PowerOfTwo.name: PowerOfTwo,
    KvFreeness.name: KvFreeness,
    SessionAffinity.name: SessionAffinity,
    Chwbl.name: Chwbl,
    WeightedPolicy.name: WeightedPolicy,
    # Ours (docs/policies.md): minimum estimated TTFT plus the fleet's prefill work, SLO-aware.
    PrefixAffinity.name: PrefixAffinity,
    # Re-implementations of the anchors' algorithms, for side-by-side comparison.
    SglangCacheAware.name: SglangCacheAware,
    LlmdScorer.name: LlmdScorer,
    DynamoCost.name: DynamoCost,
    PrebleE2.name: PrebleE2,
}

#: The policy behind the name ``default``.
DEFAULT_POLICY = PrefixAffinity.name


def available_routing_policies() -> list[str]:
    return sorted([*_FACTORIES, "default"])


def resolve_policy_name(name: str) -> str:
    return DEFAULT_POLICY if name == "default" else name


def make_routing_policy(name: str, params: Mapping[str, Any] | None = None, seed: int | None = None) -> RoutingPolicy:
    """A fresh policy; ``params`` are its keyword parameters (ValueError on unknown ones). ``seed`` reaches
    policies that draw random numbers, unless ``params`` sets one."""
    real = resolve_policy_name(name)
    factory = _FACTORIES.get(real)
    if factory is None:
        known = ", ".join(available_routing_policies())
        raise ValueError(f"unknown routing policy {name!r}; available: {known}")
    kwargs = dict(params or {})
    if seed is not None and "seed" not in kwargs and "seed" in inspect.signature(factory).parameters:
        kwargs["seed"] = seed
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"invalid parameters for routing policy {real!r}: {exc}") from None
