"""The OpenAI reverse proxy: parse what routing needs, decide, forward bytes.

Per request: parse the body once; hash the prompt into prefix blocks and look them up; build the fleet
snapshot; ask the policy; take a :class:`~router.fleet.Lease` on the chosen replica; forward the
original bytes over a pooled upstream connection (:mod:`router.upstream`). A failed attempt (connect
error, timeout, 5xx or 429) before any byte reached the client is retried on another replica; after the
first byte it is not, and a broken stream ends with an in-band error event. Stream chunks pass through
untouched, relayed from the upstream connection's protocol callback: accounting counts SSE events in the
raw bytes. The lease is released in a ``finally``, so client disconnects, timeouts and errors cannot leak
accounting; a client disconnect cancels the handler, which closes the upstream connection, which makes
the engine abort the request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.typedefs import Middleware

from policies.routing.base import NoEligibleReplica, RequestFeatures, RoutingPolicy, prefill_work
from router.api_errors import ApiError
from router.config import RouterSettings
from router.engine_config import EngineConfigurator, body_with_priority
from router.fleet import Fleet, Lease, ReplicaState
from router.health import HealthMonitor
from router.logs import request_id_var
from router.metrics import RouterMetrics
from router.prefix_index import PrefixIndex, prompt_block_hashes
from router.request_parse import ParsedRequest, parse_request
from router.residency import ResidencyModel
from router.state import InMemoryStateStore, StateStore
from router.upstream import Upstream, UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
REPLICA_HEADER = "X-Fleetroute-Replica"
#: Request headers not forwarded: hop-by-hop ones, those the upstream request sets itself, and ``Expect``
#: (the router already holds the whole body).
_NOT_FORWARDED = frozenset(
    h.lower().encode()
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
        "Expect",
        REQUEST_ID_HEADER,
    )
)
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_NOTHING_TRIED: frozenset[str] = frozenset()


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


def _forward_head(raw_headers: Iterable[tuple[bytes, bytes]], request_id: str, body_bytes: int) -> bytes:
    """The upstream request's headers after its request line: the client's, minus those in
    ``_NOT_FORWARDED``, plus the request id and the body length (and a JSON content type if none was sent)."""
    parts: list[bytes] = []
    typed = False
    for name, value in raw_headers:
        lower = name.lower()
        if lower in _NOT_FORWARDED:
            continue
        if lower == b"content-type":
            typed = True
        parts.append(b"%b: %b\r\n" % (name, value))
    if not typed:
        parts.append(b"Content-Type: application/json\r\n")
    parts.append(
        b"X-Request-Id: %b\r\nContent-Length: %d\r\n\r\n" % (request_id.encode("utf-8", "surrogateescape"), body_bytes)
    )
    return b"".join(parts)


class _EventStream(web.StreamResponse):
    """A streamed reply whose headers go out with its first chunk, in one write (aiohttp sends a
    ``StreamResponse``'s headers on their own unless told otherwise, as it does for ``Response``)."""

    _send_headers_immediately = False


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
        engine_config: EngineConfigurator | None = None,
    ) -> None:
        self._s = settings
        # Consulted per attempt only when some group's engine order travels in the request's ``priority``.
        self._engine_config = engine_config if engine_config is not None and engine_config.sets_priority else None
        self._store = store or InMemoryStateStore()
        self._fleet = fleet
        self._policy = policy
        self._index = index
        # Dispatched prompts are recorded through the residency model, so what a replica is believed to hold
        # stays bounded by its cache.
        self._residency = residency if residency is not None else ResidencyModel(index)
        self._health = health
        self._metrics = metrics
        # The session serves health checks and scrapes; requests go through the leaner upstream pool.
        self._session = session
        self._pool = UpstreamPool(settings.timeouts.connect_s)
        self._tpb = TokensPerByte(settings.bytes_per_token)
        # Request ids: unique per process start, cheaper than a uuid4 per request.
        self._id_prefix = uuid.uuid4().hex[:12] + "-"
        self._ids = itertools.count(1)

    @property
    def tokens_per_block(self) -> float:
        """Prompt tokens per prefix-index block (``prefix_block_bytes`` of prompt text) at the proxy's tokens per
        byte: ``1 / bytes_per_token`` at first, then learned from usage reports."""
        return self._s.prefix_block_bytes * self._tpb.value

    def close(self) -> None:
        """Close the idle upstream connections (those in use close when their request ends)."""
        self._pool.close()

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
            metrics = self._metrics
            metrics.requests.labels(replica_label, policy_name, status).inc()
            metrics.duration.labels(replica_label).observe(time.perf_counter() - arrival)

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
        hashes = features.block_hashes
        matched = self._index.match(hashes) if hashes else {}
        if matched:
            tokens_per_block = self.tokens_per_block
            cached = {rid: round(n * tokens_per_block) for rid, n in matched.items()}
            view = self._fleet.snapshot(candidates, cached)
        else:
            view = self._fleet.snapshot(candidates)
        policy = self._policy
        try:
            decision = policy.policy.choose(features, view)
        except NoEligibleReplica:
            return None
        chosen = self._fleet.get(decision.replica.replica_id)
        metrics = self._metrics
        metrics.decision.labels(policy.name).observe(time.perf_counter() - started)
        if chosen is None:
            return None
        metrics.decisions.labels(policy.name, chosen.id).inc()
        metrics.prefix_match.labels("matched").inc(matched.get(chosen.id, 0))
        metrics.prefix_match.labels("looked_up").inc(len(hashes))
        return chosen, decision.replica.prefix_match_tokens

    def _no_replica_error(self, model: str | None) -> ApiError:
        if model is not None and not self._fleet.serves(model):
            return ApiError(404, f"The model `{model}` does not exist.", param="model")
        return ApiError(503, "no healthy replica can serve this request right now; retry later")

    async def _route_and_forward(
        self, request: web.Request, parsed: ParsedRequest, raw: bytes, path: str, request_id: str, arrival: float
    ) -> tuple[web.StreamResponse, str]:
        s = self._s
        hashes = prompt_block_hashes(parsed.prompt_bytes, s.prefix_block_bytes)
        features = self._features(parsed, request_id, hashes)
        head = _forward_head(request.raw_headers, request_id, len(raw))
        tried: set[str] = set()
        last_failure: _UpstreamFailed | None = None
        for attempt in range(s.max_attempts):
            chosen = self._choose(parsed, features, frozenset(tried) if tried else _NOTHING_TRIED)
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
            upstream: Upstream | None = None
            try:
                try:
                    target = self._pool.target(replica.id, path)
                except ValueError:
                    raise _UpstreamFailed("connect: InvalidURL") from None
                forward_head, body = head, raw
                if self._engine_config is not None:
                    priority = self._engine_config.request_priority(replica, features.prompt_tokens)
                    if priority is not None:
                        body = body_with_priority(raw, priority)
                        forward_head = _forward_head(request.raw_headers, request_id, len(body))
                try:
                    upstream = await self._pool.open(
                        target,
                        target.prefix + forward_head + body,
                        stream=parsed.stream,
                        first_byte_s=s.timeouts.first_byte_s,
                        inter_chunk_s=s.timeouts.inter_chunk_s,
                        on_tokens=lease.tokens_generated,
                        itl=self._metrics.inter_chunk.labels(replica.id),
                    )
                except UpstreamError as exc:
                    raise _UpstreamFailed(exc.reason) from None
                status = upstream.status
                if status in _RETRY_STATUSES:
                    raise _UpstreamFailed(f"http_{status}", (status, upstream.take(), upstream.content_type))
                if status == 200:
                    if hashes and not replica.removed:  # a removed replica must not come back in the index
                        self._residency.record(replica.id, hashes)
                    if parsed.session_id is not None:
                        self._store.on_session(parsed.session_id, replica.id)
                response = await self._relay(request, upstream, replica, lease, parsed, arrival)
                if status == 200:
                    self._store.on_served(parsed.tenant, features.prompt_tokens + lease.generated)
                return response, replica.id
            except _UpstreamFailed as failure:
                lease.release()
                last_failure = failure
                kind = failure.reason.split(":")[0]
                self._health.request_failed(replica, failure.reason)
                self._metrics.upstream_errors.labels(replica.id, kind).inc()
                if attempt + 1 < s.max_attempts:
                    self._metrics.retries.labels(kind).inc()
                log.warning("attempt failed", extra={"replica": replica.id, "reason": failure.reason})
            finally:
                if upstream is not None:
                    upstream.release()
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
        upstream: Upstream,
        replica: ReplicaState,
        lease: Lease,
        parsed: ParsedRequest,
        arrival: float,
    ) -> web.StreamResponse:
        """Answer the client from a ready upstream response: whole, or streamed on from its first payload."""
        status = upstream.status
        out_headers = {
            "Content-Type": upstream.content_type,
            REQUEST_ID_HEADER: request_id_var.get() or "",
            REPLICA_HEADER: replica.id,
        }
        if not (parsed.stream and status == 200):
            body = upstream.take()  # the whole body: the upstream waits for it unless streaming a 200
            lease.first_token()
            self._store.on_load(replica, urgent=False)
            self._metrics.ttft.labels(replica.id).observe(time.perf_counter() - arrival)
            self._health.request_succeeded(replica)
            if status == 200:
                self._learn_usage(parsed, body)
                lease.generated = _usage_int(body, b'"completion_tokens":') or 0
            return web.Response(status=status, body=body, headers=out_headers)

        # The client's response was held until the first payload arrived: until then nothing had reached
        # the client, so a replica slow to produce its first token could still be retried elsewhere.
        first = upstream.take()
        if not first:
            raise _UpstreamFailed("stream: empty response")
        lease.first_token()
        self._store.on_load(replica, urgent=False)
        self._metrics.ttft.labels(replica.id).observe(time.perf_counter() - arrival)
        self._health.request_succeeded(replica)

        out_headers["Cache-Control"] = "no-cache"
        response = _EventStream(status=status, headers=out_headers)
        writer = await response.prepare(request)
        if upstream.complete:
            # The whole stream is already here: headers, body and end in one write.
            rest = upstream.take()
            await response.write_eof(first + rest if rest else first)
            self._learn_usage(parsed, upstream.tail)
            return response
        await response.write(first)
        transport = request.transport
        if transport is None or not isinstance(writer, StreamWriter):
            raise ConnectionResetError("the client connection is gone")
        try:
            await upstream.relay(transport, request.protocol, writer, writer.chunked)
        except UpstreamError as exc:
            # Bytes already reached the client: no retry. End its stream with an in-band error.
            reason = exc.reason
            self._health.request_failed(replica, reason)
            self._metrics.upstream_errors.labels(replica.id, reason.split(":")[0]).inc()
            log.warning("stream broken", extra={"replica": replica.id, "reason": reason})
            err = ApiError(502, f"the replica failed mid-stream ({reason})")
            await response.write(b"data: " + err.body_bytes() + b"\n\ndata: [DONE]\n\n")
        else:
            self._learn_usage(parsed, upstream.tail)
            if upstream.sent_last_chunk:
                writer.chunked = False  # the upstream's last chunk went out with its final read
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
