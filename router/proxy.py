"""The OpenAI reverse proxy: parse what routing needs, decide, forward bytes.

Per request: parse the body once; hash the prompt into prefix blocks and look them up; build the fleet
snapshot; ask the policy; take a :class:`~router.fleet.Lease` on the chosen replica; forward the
original bytes. A failed attempt (connect error, timeout, 5xx or 429) before any byte reached the
client is retried on another replica; after the first byte it is not, and a broken stream ends with an
in-band error event. Stream chunks pass through untouched: accounting counts SSE events in the raw
bytes. The lease is released in a ``finally``, so client disconnects, timeouts and errors cannot leak
accounting; a client disconnect cancels the handler, which closes the upstream connection, which
makes the engine abort the request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict

from policies.routing.base import NoEligibleReplica, RequestFeatures, RoutingPolicy, prefill_work
from router.api_errors import ApiError
from router.config import RouterSettings
from router.fleet import Fleet, Lease, ReplicaState
from router.health import HealthMonitor
from router.logs import request_id_var
from router.metrics import RouterMetrics
from router.prefix_index import PrefixIndex, prompt_block_hashes
from router.request_parse import ParsedRequest, parse_request
from router.residency import ResidencyModel
from router.state import InMemoryStateStore, StateStore

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
REPLICA_HEADER = "X-Fleetroute-Replica"
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
_SSE_EVENT = b"data: {"
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class PolicyHolder:
    """The active routing policy; the admin API swaps it at run time."""

    def __init__(self, name: str, policy: RoutingPolicy) -> None:
        self.name = name
        self.policy = policy


class TokensPerByte:
    """Learns how many prompt tokens a prompt byte is worth from the engines' usage reports."""

    def __init__(self, bytes_per_token: float) -> None:
        self.value = 1.0 / bytes_per_token

    def observe(self, prompt_bytes: int, prompt_tokens: int) -> None:
        if prompt_bytes > 64 and prompt_tokens > 0:
            self.value += 0.05 * (prompt_tokens / prompt_bytes - self.value)

    def tokens(self, prompt_bytes: int) -> int:
        return max(1, round(prompt_bytes * self.value))


@dataclass(slots=True)
class _Attempt:
    replica: ReplicaState
    lease: Lease


class _UpstreamFailed(Exception):
    def __init__(self, reason: str, response: tuple[int, bytes, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


def _forward_headers(headers: Iterable[tuple[str, str]], request_id: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers:
        if key.lower() not in _HOP_BY_HOP:
            out.add(key, value)
    out[REQUEST_ID_HEADER] = request_id
    return out


def error_response(exc: ApiError, request_id: str | None = None) -> web.Response:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return web.Response(status=exc.status, body=exc.body_bytes(), content_type="application/json", headers=headers)


class Proxy:
    def __init__(
        self,
        settings: RouterSettings,
        fleet: Fleet,
        policy: PolicyHolder,
        index: PrefixIndex,
        health: HealthMonitor,
        metrics: RouterMetrics,
        session: aiohttp.ClientSession,
        store: StateStore | None = None,
        residency: ResidencyModel | None = None,
    ) -> None:
        self._s = settings
        self._store = store or InMemoryStateStore()
        self._fleet = fleet
        self._policy = policy
        self._index = index
        # Dispatched prompts are recorded through the residency model, so what a replica is believed to hold
        # stays bounded by its cache.
        self._residency = residency if residency is not None else ResidencyModel(index)
        self._health = health
        self._metrics = metrics
        self._session = session
        self._tpb = TokensPerByte(settings.bytes_per_token)
        self._connect_timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeouts.connect_s)
        # Request ids: unique per process start, cheaper than a uuid4 per request.
        self._id_prefix = uuid.uuid4().hex[:12] + "-"
        self._ids = itertools.count(1)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    @property
    def tokens_per_byte(self) -> float:
        """Prompt tokens per prompt byte: ``1 / bytes_per_token`` at first, then learned from usage reports."""
        return self._tpb.value

    def _child(self, metric: Any, *values: str) -> Any:
        """A labelled metric child, looked up once per label set instead of once per request."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # ------------------------------------------------------------------ handlers
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion", "/v1/completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat", "/v1/chat/completions")

    async def models(self, request: web.Request) -> web.StreamResponse:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "fleetroute"} for name in self._fleet.models()
        ]
        return web.json_response({"object": "list", "data": data})

    # ------------------------------------------------------------------ the request path
    async def _generate(self, request: web.Request, kind: str, path: str) -> web.StreamResponse:
        arrival = time.perf_counter()
        request_id = request.headers.get(REQUEST_ID_HEADER) or f"{self._id_prefix}{next(self._ids):x}"
        request_id_var.set(request_id)
        policy_name = self._policy.name
        status = "error"
        replica_label = "none"
        try:
            raw = await request.read()
            parsed = parse_request(kind, raw, request.headers)
            response, replica_label = await self._route_and_forward(request, parsed, raw, path, request_id, arrival)
            status = str(response.status)
            return response
        except ApiError as exc:
            status = str(exc.status)
            return error_response(exc, request_id)
        except asyncio.CancelledError:
            status = "client_closed"
            self._metrics.client_disconnects.inc()
            raise
        finally:
            self._child(self._metrics.requests, replica_label, policy_name, status).inc()
            self._child(self._metrics.duration, replica_label).observe(time.perf_counter() - arrival)

    def _features(self, parsed: ParsedRequest, request_id: str, hashes: list[int]) -> RequestFeatures:
        return RequestFeatures(
            request_id=request_id,
            prompt_tokens=self._tpb.tokens(len(parsed.prompt_bytes)),
            max_tokens=parsed.max_tokens or self._s.default_max_tokens,
            model=parsed.model or "",
            block_hashes=hashes,
            block_size=self._s.prefix_block_bytes,
            tenant=parsed.tenant,
            session_id=parsed.session_id,
            priority=parsed.priority,
        )

    def _choose(
        self, parsed: ParsedRequest, features: RequestFeatures, exclude: frozenset[str]
    ) -> tuple[ReplicaState, int] | None:
        """The chosen replica and the prompt tokens it is believed to have cached."""
        started = time.perf_counter()
        candidates = self._fleet.eligible(parsed.model, exclude)
        if not candidates:
            return None
        matched = self._index.match(features.block_hashes) if features.block_hashes else {}
        tokens_per_block = self._s.prefix_block_bytes * self._tpb.value
        view = self._fleet.snapshot(candidates, {rid: round(n * tokens_per_block) for rid, n in matched.items()})
        try:
            decision = self._policy.policy.choose(features, view)
        except NoEligibleReplica:
            return None
        chosen = self._fleet.get(decision.replica.replica_id)
        elapsed = time.perf_counter() - started
        self._child(self._metrics.decision, self._policy.name).observe(elapsed)
        if chosen is None:
            return None
        self._child(self._metrics.decisions, self._policy.name, chosen.id).inc()
        self._child(self._metrics.prefix_match, "matched").inc(matched.get(chosen.id, 0))
        self._child(self._metrics.prefix_match, "looked_up").inc(len(features.block_hashes))
        return chosen, decision.replica.prefix_match_tokens

    def _no_replica_error(self, model: str | None) -> ApiError:
        if model is not None and not self._fleet.serves(model):
            return ApiError(404, f"The model `{model}` does not exist.", param="model")
        return ApiError(503, "no healthy replica can serve this request right now; retry later")

    async def _route_and_forward(
        self, request: web.Request, parsed: ParsedRequest, raw: bytes, path: str, request_id: str, arrival: float
    ) -> tuple[web.StreamResponse, str]:
        hashes = prompt_block_hashes(parsed.prompt_bytes, self._s.prefix_block_bytes)
        features = self._features(parsed, request_id, hashes)
        headers = _forward_headers(request.headers.items(), request_id)
        tried: set[str] = set()
        last_failure: _UpstreamFailed | None = None
        for attempt in range(self._s.max_attempts):
            chosen = self._choose(parsed, features, frozenset(tried))
            if chosen is None:
                break
            replica, cached = chosen
            tried.add(replica.id)
            new_tokens, attention = prefill_work(features.prompt_tokens, cached)
            lease = Lease(replica, features.prompt_tokens, features.max_tokens, new_tokens, attention)
            self._store.on_load(replica)
            if hashes:
                # Shared at dispatch, not at the 200 like the local record: the engine holds the prompt from
                # now on, and a reply that arrives whole (non-streamed) would otherwise race the next turn to
                # the other routers.
                self._store.on_record(replica.id, hashes)
            try:
                upstream_cm = self._session.post(
                    replica.id + path, data=raw, headers=headers, timeout=self._connect_timeout
                )
                try:
                    async with asyncio.timeout(self._s.timeouts.first_byte_s):
                        upstream = await upstream_cm.__aenter__()
                except TimeoutError:
                    raise _UpstreamFailed("first_byte_timeout") from None
                except (aiohttp.ClientError, OSError) as exc:
                    raise _UpstreamFailed(f"connect: {type(exc).__name__}") from None
                try:
                    if upstream.status in _RETRY_STATUSES:
                        body = await upstream.read()
                        raise _UpstreamFailed(
                            f"http_{upstream.status}",
                            (upstream.status, body, upstream.headers.get("Content-Type", "application/json")),
                        )
                    if upstream.status == 200:
                        if hashes and not replica.removed:  # a removed replica must not come back in the index
                            self._residency.record(replica.id, hashes)
                        if parsed.session_id is not None:
                            self._store.on_session(parsed.session_id, replica.id)
                    response = await self._relay(request, upstream, replica, lease, parsed, arrival)
                    if upstream.status == 200:
                        self._store.on_served(parsed.tenant, features.prompt_tokens + lease.generated)
                    return response, replica.id
                finally:
                    upstream.release()
            except _UpstreamFailed as failure:
                lease.release()
                last_failure = failure
                self._health.request_failed(replica, failure.reason)
                self._metrics.upstream_errors.labels(replica.id, failure.reason.split(":")[0]).inc()
                if attempt + 1 < self._s.max_attempts:
                    self._metrics.retries.labels(failure.reason.split(":")[0]).inc()
                log.warning("attempt failed", extra={"replica": replica.id, "reason": failure.reason})
            finally:
                lease.release()
                self._store.on_load(replica)
        if last_failure is not None and last_failure.response is not None:
            status, body, content_type = last_failure.response
            return web.Response(status=status, body=body, headers={"Content-Type": content_type}), "none"
        if last_failure is not None:
            raise ApiError(502, f"no replica answered ({len(tried)} tried; last: {last_failure.reason})")
        raise self._no_replica_error(parsed.model)

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        replica: ReplicaState,
        lease: Lease,
        parsed: ParsedRequest,
        arrival: float,
    ) -> web.StreamResponse:
        out_headers = {
            "Content-Type": upstream.headers.get("Content-Type", "application/json"),
            REQUEST_ID_HEADER: request_id_var.get() or "",
            REPLICA_HEADER: replica.id,
        }
        is_stream = parsed.stream and upstream.status == 200
        if not is_stream:
            try:
                async with asyncio.timeout(self._s.timeouts.first_byte_s):
                    body = await upstream.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise _UpstreamFailed(f"read: {type(exc).__name__}") from None
            lease.first_token()
            self._store.on_load(replica, urgent=False)
            self._child(self._metrics.ttft, replica.id).observe(time.perf_counter() - arrival)
            self._health.request_succeeded(replica)
            if upstream.status == 200:
                self._learn_usage(parsed, body)
                lease.generated = _usage_int(body, b'"completion_tokens":') or 0
            return web.Response(status=upstream.status, body=body, headers=out_headers)

        # Hold the client's response until the first chunk arrives: until then nothing has reached the
        # client, so a replica that is slow to produce its first token can still be retried elsewhere.
        chunks = upstream.content.iter_any()
        try:
            async with asyncio.timeout(self._s.timeouts.first_byte_s):
                first = await anext(chunks, b"")
        except TimeoutError:
            raise _UpstreamFailed("first_token_timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _UpstreamFailed(f"stream: {type(exc).__name__}") from None
        if not first:
            raise _UpstreamFailed("stream: empty response")
        lease.first_token()
        self._store.on_load(replica, urgent=False)
        self._child(self._metrics.ttft, replica.id).observe(time.perf_counter() - arrival)
        self._health.request_succeeded(replica)

        response = web.StreamResponse(status=upstream.status, headers=out_headers)
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        itl = self._child(self._metrics.inter_chunk, replica.id)
        content = upstream.content
        inter_chunk_s = self._s.timeouts.inter_chunk_s
        loop = asyncio.get_running_loop()
        last = time.perf_counter()
        lease.tokens_generated(first.count(_SSE_EVENT))
        await response.write(first)
        tail = first[-2048:]
        try:
            async with asyncio.timeout(inter_chunk_s) as deadline:
                async for chunk in chunks:
                    now = time.perf_counter()
                    itl.observe(now - last)
                    last = now
                    # Events that arrived meanwhile go out in the same write: one syscall, no delay.
                    more = content.read_nowait()
                    if more:
                        chunk += more
                    lease.tokens_generated(chunk.count(_SSE_EVENT))
                    await response.write(chunk)
                    tail = chunk[-2048:]
                    deadline.reschedule(loop.time() + inter_chunk_s)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Bytes already reached the client: no retry. End its stream with an in-band error.
            reason = "inter_chunk_timeout" if isinstance(exc, TimeoutError) else f"stream: {type(exc).__name__}"
            self._health.request_failed(replica, reason)
            self._metrics.upstream_errors.labels(replica.id, reason.split(":")[0]).inc()
            log.warning("stream broken", extra={"replica": replica.id, "reason": reason})
            err = ApiError(502, f"the replica failed mid-stream ({reason})")
            await response.write(b"data: " + err.body_bytes() + b"\n\ndata: [DONE]\n\n")
        else:
            self._learn_usage(parsed, tail)
        await response.write_eof()
        return response

    def _learn_usage(self, parsed: ParsedRequest, body: bytes) -> None:
        """Calibrate tokens-per-byte from ``usage.prompt_tokens`` when the response carries it."""
        prompt_tokens = _usage_int(body, b'"prompt_tokens":')
        if prompt_tokens is not None:
            self._tpb.observe(len(parsed.prompt_bytes), prompt_tokens)


def _usage_int(body: bytes, key: bytes) -> int | None:
    """The integer after the last ``key`` in ``body`` (a usage field), found without parsing the JSON."""
    at = body.rfind(key)
    if at < 0:
        return None
    digits = bytearray()
    for byte in body[at + len(key) : at + len(key) + 16]:
        if 48 <= byte <= 57:
            digits.append(byte)
        elif digits:
            break
    return int(digits) if digits else None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error_middleware_factory() -> Middleware:
    """Turn aiohttp's own HTTP errors (404, 405, 413, …) into OpenAI-format errors."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                message = f"Not Found: {request.method} {request.path}"
            elif exc.status == 413:
                message = "request body too large"
            else:
                message = exc.reason
            return error_response(ApiError(exc.status, message), request.headers.get(REQUEST_ID_HEADER))
        except ApiError as exc:
            return error_response(exc, request.headers.get(REQUEST_ID_HEADER))

    return middleware
