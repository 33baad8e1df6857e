"""Llumnix-style migration planning: which running request should move from which replica to which.

Pure, like every policy: it reads per-replica load figures and returns hints. Executing a hint needs engine
support (a KV transfer between replicas); the router only plans.
"""

from policies.migration.planner import (
    InstanceLoad,
    MigrationHint,
    RunningRequest,
    freeness_load,
    plan_migrations,
)

__all__ = ["InstanceLoad", "MigrationHint", "RunningRequest", "freeness_load", "plan_migrations"]
