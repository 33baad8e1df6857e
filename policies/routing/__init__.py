"""Routing policies: which replica serves a request, as a pure function of a fleet snapshot.

The router builds a :class:`FleetView` from its own accounting, scraped engine metrics and its prefix
index, then asks a :class:`RoutingPolicy`. The simulator builds the same snapshot from emulated engines
(with the same signal delays) and asks the same code.
"""

from policies.routing.base import (
    Decision,
    FleetView,
    NoEligibleReplica,
    ReplicaView,
    RequestFeatures,
    RoutingPolicy,
)
from policies.routing.registry import DEFAULT_POLICY, available_routing_policies, make_routing_policy

__all__ = [
    "DEFAULT_POLICY",
    "Decision",
    "FleetView",
    "NoEligibleReplica",
    "ReplicaView",
    "RequestFeatures",
    "RoutingPolicy",
    "available_routing_policies",
    "make_routing_policy",
]
