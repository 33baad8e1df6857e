"""The contract between replica discovery and the router's fleet registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

ReplicaKind = Literal["vllm", "sglang", "emulator"]
REPLICA_KINDS: tuple[ReplicaKind, ...] = ("vllm", "sglang", "emulator")


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """A replica as discovery sees it: where it is and what kind of engine it runs."""

    url: str  # base URL without a trailing slash, e.g. "http://10.0.0.7:8000"
    kind: ReplicaKind = "vllm"
    #: Replica group: engine-scheduler settings are configured per group.
    group: str = "default"


class Discovery(ABC):
    """Produces the current set of replicas, and every change to it."""

    @abstractmethod
    async def run(self, on_update: Callable[[list[ReplicaSpec]], None]) -> None:
        """Run until cancelled, calling ``on_update`` with the *complete* current set on every change.

        Transient failures (DNS timeout, API server unreachable) must not empty the set: keep the last
        known set and retry with backoff.
        """
