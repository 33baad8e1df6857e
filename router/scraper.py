"""Background scraping of each replica's ``/metrics``: queue depth, KV usage, prefix-cache counters.

The hot path never waits for a scrape: routing reads whatever the last scrape left, with its age. With a
shared state store, one router scrapes each replica (under a lease) and the others read its results from
the store, so a fleet of routers does not multiply the engines' scrape load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

import aiohttp

from router.engine_metrics import parse_engine_metrics
from router.fleet import ReplicaState
from router.state.base import StateStore

log = logging.getLogger(__name__)


class MetricsScraper:
    """One task per replica, started on discovery and stopped on removal."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        store: StateStore | None = None,
    ) -> None:
        self._session = session
        self._store = store
        self._interval = interval_s
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.scrapes = 0
        self.failures = 0

    def start(self, replica: ReplicaState) -> None:
        if replica.id not in self._tasks:
            self._tasks[replica.id] = asyncio.get_running_loop().create_task(
                self._loop(replica), name=f"scrape {replica.id}"
            )

    def stop(self, replica: ReplicaState) -> None:
        task = self._tasks.pop(replica.id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, replica: ReplicaState) -> None:
        # Spread replicas over the interval so scrapes do not arrive in bursts.
        await asyncio.sleep(random.uniform(0, self._interval))
        timeout = aiohttp.ClientTimeout(total=max(self._interval, 1.0))
        store = self._store
        while not replica.removed:
            if store is None or store.should_scrape(replica.id):
                await self.scrape(replica, timeout)
            await asyncio.sleep(self._interval)

    async def scrape(self, replica: ReplicaState, client_timeout: aiohttp.ClientTimeout | None = None) -> bool:
        try:
            async with self._session.get(f"{replica.id}/metrics", timeout=client_timeout) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.failures += 1
            log.debug("scrape failed", extra={"replica": replica.id, "error": str(exc)})
            return False
        replica.signals = parse_engine_metrics(body, replica.spec.kind)
        replica.signals_time = self._clock()
        self.scrapes += 1
        if self._store is not None:
            self._store.on_scraped(replica)
        return True
