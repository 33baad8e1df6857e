"""Applies the configured engine-level scheduling policy to each replica group.

Emulated replicas take it through their admin endpoint. A real vLLM takes ``--scheduling-policy`` at
start-up, so nothing is pushed to it at run time: for the ``priority`` policy the router forwards each
request's ``priority`` field untouched, and for ``sjf`` (vLLM started with ``--scheduling-policy
priority``) it sets ``priority`` to the prompt's token count, so vLLM's ``(priority, arrival)`` order admits
the shortest prompt first. docs/policies.md lists which policies reach vLLM this way.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from router.fleet import ReplicaState

log = logging.getLogger(__name__)


#: Orders a vLLM started with ``--scheduling-policy priority`` follows when each request's ``priority`` is
#: set from the prompt's token count (lower runs first).
_PRIORITY_BY_PROMPT_TOKENS = frozenset({"sjf"})


def body_with_priority(raw: bytes, priority: int) -> bytes:
    """``raw`` (a JSON object, as parsed) with ``"priority": priority`` added as its last member.

    A client's own ``priority`` earlier in the body is overridden: JSON parsers in Python, vLLM's included,
    keep the last of duplicate keys. Appending costs a copy, where re-serialising a 100k-token prompt costs
    milliseconds.
    """
    members = raw[: raw.rfind(b"}")].rstrip()
    if not raw.lstrip().startswith(b"{") or not members:
        raise ValueError("the request body is not a JSON object")
    separator = b"" if members.endswith(b"{") else b","
    return b'%b%b"priority":%d}' % (members, separator, priority)


class EngineConfigurator:
    def __init__(self, session: aiohttp.ClientSession, schedulers: dict[str, str]) -> None:
        self._session = session
        self._schedulers = schedulers
        self._pending: set[asyncio.Task[None]] = set()
        #: Whether any group's order travels in the request's ``priority`` field (else the proxy skips asking).
        self.sets_priority = any(name in _PRIORITY_BY_PROMPT_TOKENS for name in schedulers.values())

    def scheduler_for(self, replica: ReplicaState) -> str | None:
        return self._schedulers.get(replica.spec.group) or self._schedulers.get("*")

    def request_priority(self, replica: ReplicaState, prompt_tokens: int) -> int | None:
        """The ``priority`` to send a vLLM replica whose group runs ``sjf``; None to forward the body as is.

        Emulated replicas run the policy itself (pushed by :meth:`apply`), so they get the body unchanged.
        """
        if replica.spec.kind != "vllm" or self.scheduler_for(replica) not in _PRIORITY_BY_PROMPT_TOKENS:
            return None
        return prompt_tokens

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
