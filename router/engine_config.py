"""Applies the configured engine-level scheduling policy to each replica group.

Emulated replicas take it through their admin endpoint. A real vLLM takes ``--scheduling-policy`` at
start-up; for the ``priority`` policy the router forwards each request's ``priority`` field untouched,
so nothing is pushed at run time (docs/policies.md lists which policies reach vLLM this way).
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from router.fleet import ReplicaState

log = logging.getLogger(__name__)


class EngineConfigurator:
    def __init__(self, session: aiohttp.ClientSession, schedulers: dict[str, str]) -> None:
        self._session = session
        self._schedulers = schedulers
        self._pending: set[asyncio.Task[None]] = set()

    def scheduler_for(self, replica: ReplicaState) -> str | None:
        return self._schedulers.get(replica.spec.group) or self._schedulers.get("*")

    def apply(self, replica: ReplicaState) -> None:
        """Push the group's scheduler to an emulated replica that just became healthy (fire and forget)."""
        name = self.scheduler_for(replica)
        if name is None or replica.spec.kind != "emulator" or replica.applied_scheduler == name:
            return
        task = asyncio.get_running_loop().create_task(self._push(replica, name))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _push(self, replica: ReplicaState, name: str) -> None:
        try:
            async with self._session.put(
                f"{replica.id}/admin/scheduler", json={"policy": name}, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status == 200:
                    replica.applied_scheduler = name
                    log.info("engine scheduler applied", extra={"replica": replica.id, "scheduler": name})
                else:
                    log.warning(
                        "engine scheduler rejected",
                        extra={"replica": replica.id, "scheduler": name, "status": resp.status},
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("engine scheduler not applied", extra={"replica": replica.id, "error": str(exc)})
