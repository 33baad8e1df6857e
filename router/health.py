"""Replica health: active checks with thresholds, and passive outlier ejection.

Active checks (``GET /health`` every ``interval_s``) decide HEALTHY/UNHEALTHY with hysteresis; a healthy
check also refreshes the replica's model list. Passive ejection reacts faster, from real traffic: after
``eject_after_failures`` consecutive failed attempts (connect error, 5xx, timeout) the replica is taken
out of rotation for ``ejection_s``, doubling on each repeat up to ``max_ejection_s``, then readmitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from router.config import HealthSettings
from router.fleet import Fleet, Health, ReplicaState

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(
        self,
        fleet: Fleet,
        session: aiohttp.ClientSession,
        settings: HealthSettings,
        on_healthy: Callable[[ReplicaState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fleet = fleet
        self._session = session
        self._s = settings
        self._on_healthy = on_healthy
        self._clock = clock
        self._wake = asyncio.Event()

    def check_soon(self) -> None:
        """Run a round of checks now (a replica was just discovered)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            replicas = self._fleet.all()
            if replicas:
                await asyncio.gather(*(self.check(r) for r in replicas))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._s.interval_s)

    async def check(self, replica: ReplicaState) -> None:
        ok = False
        models: frozenset[str] | None = None
        timeout = aiohttp.ClientTimeout(total=self._s.timeout_s)
        try:
            async with self._session.get(f"{replica.id}/health", timeout=timeout) as resp:
                ok = resp.status == 200
                await resp.read()
            if ok and (not replica.models or replica.health is not Health.HEALTHY):
                models = await self._fetch_models(replica, timeout)
                ok = models is not None
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        replica.last_check_time = self._clock()
        if models is not None:
            replica.models = models
        self._apply(replica, ok)

    async def _fetch_models(
        self, replica: ReplicaState, client_timeout: aiohttp.ClientTimeout
    ) -> frozenset[str] | None:
        async with self._session.get(f"{replica.id}/v1/models", timeout=client_timeout) as resp:
            if resp.status != 200:
                return None
            body = await resp.json(content_type=None)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            return None
        return frozenset(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)

    def _apply(self, replica: ReplicaState, ok: bool) -> None:
        if ok:
            replica.check_successes += 1
            replica.check_failures = 0
            if replica.health is not Health.HEALTHY and replica.check_successes >= self._s.healthy_threshold:
                replica.health = Health.HEALTHY
                log.info("replica healthy", extra={"replica": replica.id, "models": sorted(replica.models)})
                if self._on_healthy is not None:
                    self._on_healthy(replica)
        else:
            replica.check_failures += 1
            replica.check_successes = 0
            unknown = replica.health is Health.UNKNOWN
            if replica.health is not Health.UNHEALTHY and (
                unknown or replica.check_failures >= self._s.unhealthy_threshold
            ):
                replica.health = Health.UNHEALTHY
                log.warning("replica unhealthy", extra={"replica": replica.id})

    # ---------------------------------------------------------------- passive outlier detection
    def request_failed(self, replica: ReplicaState, reason: str) -> None:
        replica.request_failures += 1
        if replica.request_failures < self._s.eject_after_failures:
            return
        now = self._clock()
        length = min(self._s.max_ejection_s, self._s.ejection_s * (2 ** min(replica.ejections, 16)))
        replica.ejected_until = now + length
        replica.ejections += 1
        replica.request_failures = 0
        log.warning("replica ejected", extra={"replica": replica.id, "reason": reason, "seconds": length})

    def request_succeeded(self, replica: ReplicaState) -> None:
        replica.request_failures = 0
