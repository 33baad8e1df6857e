"""Shared state across router replicas: one interface, an in-memory and a Redis backend (docs/state.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from router.state.base import SessionMap, StateStore, TenantCounters
from router.state.memory import InMemoryStateStore

if TYPE_CHECKING:
    from router.config import RouterSettings
    from router.fleet import Fleet
    from router.metrics import RouterMetrics
    from router.prefix_index import PrefixIndex
    from router.residency import ResidencyModel

__all__ = ["InMemoryStateStore", "SessionMap", "StateStore", "TenantCounters", "make_state_store"]


def make_state_store(
    settings: RouterSettings,
    fleet: Fleet,
    index: PrefixIndex,
    metrics: RouterMetrics | None = None,
    residency: ResidencyModel | None = None,
) -> StateStore:
    """Redis when ``redis_url`` is set, else the in-memory store (one router: no records arrive from others,
    so only Redis takes ``residency``, the model the other routers' prefix records go through)."""
    if settings.redis_url is None:
        return InMemoryStateStore(settings.state_session_ttl_s, settings.state_tenant_window_s)
    from router.state.redis_store import RedisStateStore  # imports redis-py only when used

    return RedisStateStore(
        settings.redis_url.get_secret_value(),
        fleet,
        index,
        namespace=settings.fleet,
        sync_interval_s=settings.state_sync_interval_s,
        publish_gap_s=settings.state_publish_interval_s,
        ttl_s=settings.state_ttl_s,
        prefix_max_entries=settings.redis_prefix_max_entries,
        scrape_interval_s=settings.scrape_interval_s,
        session_ttl_s=settings.state_session_ttl_s,
        tenant_window_s=settings.state_tenant_window_s,
        metrics=metrics,
        residency=residency,
    )
