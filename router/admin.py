"""The admin API, on its own port: replicas and their live state, drain/undrain, policy switch.

Protected by a bearer token when one is configured.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from policies.routing import available_routing_policies, make_routing_policy
from policies.routing.registry import resolve_policy_name
from router.api_errors import ApiError, bad_request
from router.fleet import Fleet, ReplicaState
from router.proxy import PolicyHolder, error_response, json_error_middleware_factory

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def replica_state(r: ReplicaState, now: float) -> dict[str, Any]:
    s = r.signals
    return {
        "id": r.id,
        "index": r.index,
        "kind": r.spec.kind,
        "group": r.spec.group,
        "health": r.health.value,
        "eligible": r.eligible(now, None),
        "draining": r.draining,
        "ejected_for_s": max(0.0, r.ejected_until - now),
        "ejections": r.ejections,
        "models": sorted(r.models),
        "inflight_requests": r.inflight_requests,
        "inflight_prefill_tokens": r.inflight_prefill_tokens,
        "inflight_decode_tokens": r.inflight_decode_tokens,
        "engine": None
        if s is None
        else {
            "num_running": s.num_running,
            "num_waiting": s.num_waiting,
            "kv_usage": s.kv_usage,
            "kv_capacity_tokens": s.kv_capacity_tokens,
            "age_s": None if r.signals_time is None else now - r.signals_time,
        },
        "engine_scheduler": r.applied_scheduler,
    }


class AdminApi:
    def __init__(self, fleet: Fleet, policy: PolicyHolder, token: str | None) -> None:
        self._fleet = fleet
        self._policy = policy
        self._token = token

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth, json_error_middleware_factory()])
        r = app.router
        r.add_get("/admin/replicas", self._replicas)
        r.add_post("/admin/replicas/drain", self._drain)
        r.add_post("/admin/replicas/undrain", self._undrain)
        r.add_get("/admin/policy", self._get_policy)
        r.add_put("/admin/policy", self._set_policy)
        r.add_post("/admin/policy", self._set_policy)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
                return error_response(ApiError(401, "missing or wrong bearer token for the admin API"))
        return await handler(request)

    async def _replicas(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        return web.json_response({"replicas": [replica_state(r, now) for r in self._fleet.all()]})

    async def _target(self, request: web.Request) -> ReplicaState:
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("request body is not valid JSON") from None
        replica_id = body.get("replica") if isinstance(body, dict) else None
        if not isinstance(replica_id, str):
            raise bad_request("'replica' (the replica's URL) is required", "replica")
        replica = self._fleet.get(replica_id.rstrip("/"))
        if replica is None:
            raise ApiError(404, f"no replica {replica_id!r}", param="replica")
        return replica

    async def _drain(self, request: web.Request) -> web.StreamResponse:
        replica = await self._target(request)
        replica.draining = True
        return web.json_response(replica_state(replica, time.monotonic()))

    async def _undrain(self, request: web.Request) -> web.StreamResponse:
        replica = await self._target(request)
        replica.draining = False
        return web.json_response(replica_state(replica, time.monotonic()))

    async def _get_policy(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "policy": self._policy.name,
                "resolved": resolve_policy_name(self._policy.name),
                "params": self._policy.policy.describe(),
                "available": available_routing_policies(),
            }
        )

    async def _set_policy(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("request body is not valid JSON") from None
        name = body.get("policy") if isinstance(body, dict) else None
        params = body.get("params", {}) if isinstance(body, dict) else {}
        if not isinstance(name, str):
            raise bad_request("'policy' must be a string", "policy")
        if not isinstance(params, dict):
            raise bad_request("'params' must be an object", "params")
        try:
            policy = make_routing_policy(name, params)
        except ValueError as exc:
            raise bad_request(str(exc), "policy") from None
        self._policy.name = name
        self._policy.policy = policy
        return await self._get_policy(request)
