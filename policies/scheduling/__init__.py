"""Engine-level scheduling policies: how one replica orders its waiting and running requests.

The emulator runs them; the router configures them per replica. Register new policies in
:mod:`policies.scheduling.registry`.
"""

from policies.scheduling.base import (
    EngineSchedulingPolicy,
    RequestQueue,
    SchedulableRequest,
    SchedulingContext,
)
from policies.scheduling.registry import available_scheduling_policies, make_scheduling_policy

__all__ = [
    "EngineSchedulingPolicy",
    "RequestQueue",
    "SchedulableRequest",
    "SchedulingContext",
    "available_scheduling_policies",
    "make_scheduling_policy",
]
