"""The embedded default: one router, nothing shared. Local session and tenant state still answer reads."""

from __future__ import annotations

from router.state.base import StateStore


class InMemoryStateStore(StateStore):
    backend = "memory"

    @property
    def up(self) -> bool:
        return True

    @property
    def staleness_s(self) -> float:
        return 0.0
