"""The live emulated replica: vLLM's HTTP surface in front of an :class:`EngineCore`.

Serves the OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``), vLLM's
operational endpoints (``/health``, ``/ping``, ``/version``, ``/load``, ``/metrics``, ``/tokenize``,
``/detokenize``, ``/reset_prefix_cache``), the probes of the Rust peer routers, and an admin endpoint
that reads and switches the engine-level scheduling policy at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from emulator.engine import EngineCore, RequestOutput
from emulator.metrics import EngineMetrics
from emulator.openai_api import GenerationRequest, ResponseBuilder, parse_generation_request, usage
from emulator.profiles import EngineProfile
from emulator.request import EngineRequest, SamplingParams
from emulator.runner import EngineRunner, RequestStream
from emulator.tokenizer import Tokenizer, get_tokenizer, output_token_id
from policies.scheduling import available_scheduling_policies, make_scheduling_policy
from router.api_errors import ApiError, bad_request, load_json_object

log = logging.getLogger(__name__)

#: The vLLM release whose HTTP surface and metric names the emulator follows.
EMULATED_VLLM_VERSION = "0.11.0"
TENANT_HEADER = "X-Tenant-Id"
_JSON_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True)
class ReplicaConfig:
    """How one emulated replica is set up."""

    profile: EngineProfile
    models: list[str] = field(default_factory=list)
    speed: float = 1.0
    scheduler: str = "fcfs"
    seed: int = 0
    #: Position of this replica when one command serves several (logs only: each is its own vLLM).
    replica_index: int = 0
    #: Mean length of replies when the client neither forces a length (ignore_eos) nor caps it below.
    mean_output_tokens: int = 256
    max_body_bytes: int = 32 * 1024 * 1024

    @property
    def served_models(self) -> list[str]:
        return self.models or [self.profile.model]


class Faults:
    """Injected failures, so routers can be tested against a replica that misbehaves on purpose.

    ``error_status`` with ``error_rate`` fails that share of generation requests before any work;
    ``unhealthy`` makes /health answer 503; ``health_delay_s`` makes it slow.
    """

    def __init__(self) -> None:
        self.error_status = 503
        self.error_rate = 0.0
        self.unhealthy = False
        self.health_delay_s = 0.0
        self._debt = 0.0

    def should_fail(self) -> bool:
        # Deterministic: exactly error_rate of requests fail, evenly spread.
        self._debt += self.error_rate
        if self._debt >= 1.0:
            self._debt -= 1.0
            return True
        return False

    def update(self, body: dict[str, Any]) -> None:
        unknown = set(body) - {"error_status", "error_rate", "unhealthy", "health_delay_s"}
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        status = body.get("error_status", self.error_status)
        rate = body.get("error_rate", self.error_rate)
        delay = body.get("health_delay_s", self.health_delay_s)
        unhealthy = body.get("unhealthy", self.unhealthy)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError("error_status must be an HTTP error status (400-599)")
        if not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if not isinstance(delay, int | float) or delay < 0:
            raise ValueError("health_delay_s must be non-negative")
        if not isinstance(unhealthy, bool):
            raise ValueError("unhealthy must be a boolean")
        self.error_status, self.error_rate, self.health_delay_s, self.unhealthy = status, float(rate), delay, unhealthy
        self._debt = 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "error_status": self.error_status,
            "error_rate": self.error_rate,
            "unhealthy": self.unhealthy,
            "health_delay_s": self.health_delay_s,
        }


def natural_output_length(seed: int, mean: int) -> int:
    """Where the emulated model would stop on its own: exponentially distributed around ``mean``."""
    u = (output_token_id(seed, 1 << 20) * 2654435761 % 1_000_003 + 0.5) / 1_000_003
    return max(1, round(-mean * math.log(u)))


class Replica:
    """One emulated engine and its HTTP application."""

    def __init__(self, config: ReplicaConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer or get_tokenizer()
        self.models = config.served_models
        self.metrics = EngineMetrics(self.models[0], 0, config.profile.max_model_len)
        self.engine = EngineCore(
            config.profile,
            make_scheduling_policy(config.scheduler),
            token_source=output_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            observer=self.metrics,
            seed=config.seed,
        )
        self.metrics.attach(self.engine)
        self.runner = EngineRunner(self.engine, config.speed)
        self._ids = itertools.count()
        self.faults = Faults()
        self._http_in_flight = 0
        self.created = int(time.time())
        self.app = self._build_app()

    # ------------------------------------------------------------------ application
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._errors])
        r = app.router
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_get("/v1/models", self._models)
        for path in ("/health", "/ping"):
            r.add_get(path, self._health)
        r.add_post("/ping", self._health)
        r.add_get("/version", self._version)
        r.add_get("/load", self._load)
        r.add_get("/metrics", self._metrics)
        r.add_post("/tokenize", self._tokenize)
        r.add_post("/detokenize", self._detokenize)
        r.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        # Probed or proxied by the Rust peer routers (sglang-router 0.3, vllm-router 0.1).
        r.add_get("/health_generate", self._health)
        for path in ("/server_info", "/get_server_info"):
            r.add_get(path, self._server_info)
        for path in ("/model_info", "/get_model_info"):
            r.add_get(path, self._model_info)
        r.add_post("/v1/completions/render", self._render_completion)
        r.add_post("/v1/chat/completions/render", self._render_chat)
        r.add_get("/admin/scheduler", self._get_scheduler)
        r.add_put("/admin/scheduler", self._set_scheduler)
        r.add_post("/admin/scheduler", self._set_scheduler)
        r.add_get("/admin/state", self._state)
        r.add_get("/admin/faults", self._get_faults)
        r.add_put("/admin/faults", self._set_faults)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.runner.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.runner.stop()

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error_response(exc, request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = exc.text if exc.status != 404 else f"Not Found: {request.method} {request.path}"
            if exc.status == 413:
                message = f"request body too large: the limit is {self.config.max_body_bytes} bytes"
            return _error_response(ApiError(exc.status, message or exc.reason), request)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return _error_response(ApiError(500, "internal error in the emulated engine"), request)

    # ------------------------------------------------------------------ generation
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, http: web.Request, kind: str) -> web.StreamResponse:
        arrival = self.runner.now()
        self._http_in_flight += 1
        try:
            raw = await http.read()
            if self.faults.should_fail():
                raise ApiError(self.faults.error_status, "injected fault (emulator /admin/faults)")
            gen = parse_generation_request(kind, raw, self.tokenizer, self.models, http.headers.get(TENANT_HEADER))
            engine_request = self._engine_request(gen, http.headers.get("X-Request-Id"), arrival)
            # The profile's frontend overhead stands for vLLM's parsing and tokenisation; the time this
            # process already spent doing exactly that counts toward it.
            overhead = self.config.profile.frontend_overhead_ms / 1000.0 / self.runner.speed
            remaining = overhead - (self.runner.now() - arrival)
            if remaining > 0:
                await asyncio.sleep(remaining)
            if not self.runner.healthy:
                raise ApiError(503, "the engine is not healthy")
            stream = self.runner.submit(engine_request)
            try:
                builder = ResponseBuilder(kind, _public_id(http, engine_request.request_id), gen.model)
                if gen.stream:
                    return await self._stream_response(http, gen, stream, builder)
                return await self._full_response(http, gen, stream, builder)
            finally:
                # Client gone, write failed or handler cancelled: free the engine's resources.
                if not engine_request.is_finished:
                    self.runner.abort(engine_request.request_id)
        finally:
            self._http_in_flight -= 1

    def _engine_request(self, gen: GenerationRequest, header_id: str | None, arrival: float) -> EngineRequest:
        profile = self.config.profile
        ids = gen.prompt_token_ids
        max_tokens = gen.max_tokens if gen.max_tokens is not None else profile.max_model_len - len(ids)
        if max_tokens < 1:
            raise bad_request(
                f"This model's maximum context length is {profile.max_model_len} tokens. However, your request "
                f"has {len(ids)} input tokens. Please reduce the length of the input messages.",
                "messages" if gen.kind == "chat" else "prompt",
            )
        try:
            self.engine.check_fits(len(ids), max_tokens)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        seed = gen.seed if gen.seed is not None else hash((len(ids), tuple(ids[-64:])))
        eos_after = None if gen.ignore_eos else natural_output_length(seed, self.config.mean_output_tokens)
        # Internal ids stay unique even when clients reuse an X-Request-Id.
        internal_id = f"{header_id or uuid.uuid4().hex}#{next(self._ids)}"
        return EngineRequest(
            request_id=internal_id,
            num_prompt_tokens=len(ids),
            sampling=SamplingParams(
                max_tokens=max_tokens,
                min_tokens=min(gen.min_tokens, max_tokens),
                ignore_eos=gen.ignore_eos,
                eos_after=eos_after,
            ),
            arrival_time=arrival,
            block_size=profile.block_size,
            prompt_token_ids=ids,
            priority=gen.priority,
            tenant=gen.tenant,
            cache_salt=gen.cache_salt,
            seed=seed,
        )

    async def _outputs(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        while True:
            output = await stream.queue.get()
            if output.new_token_id is None and not output.finished:
                raise ApiError(500, "the engine failed while generating this request")
            yield output
            if output.finished:
                return

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None or self.tokenizer.is_special(token_id):
            return ""
        return self.tokenizer.decode((token_id,))

    async def _full_response(
        self, http: web.Request, gen: GenerationRequest, stream: RequestStream, builder: ResponseBuilder
    ) -> web.StreamResponse:
        texts: list[str] = []
        reason = "abort"
        async for output in self._outputs(stream):
            texts.append(self._token_text(output.new_token_id))
            if output.finish_reason is not None:
                reason = output.finish_reason.value
        req = stream.request
        body = builder.final(
            "".join(texts), reason, usage(req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens)
        )
        return web.Response(body=_JSON_DUMPS(body), content_type="application/json", headers=_echo_id(http))

    async def _stream_response(
        self, http: web.Request, gen: GenerationRequest, stream: RequestStream, builder: ResponseBuilder
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_echo_id(http)}
        )
        await response.prepare(http)
        req = stream.request
        first = True
        try:
            async for output in self._outputs(stream):
                parts: list[bytes] = []
                if first and gen.kind == "chat":
                    parts.append(_sse(builder.chunk(None, None, None)))
                first = False
                reason = output.finish_reason.value if output.finish_reason is not None else None
                running_usage = (
                    usage(req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens)
                    if gen.continuous_usage
                    else None
                )
                parts.append(_sse(builder.chunk(self._token_text(output.new_token_id), reason, running_usage)))
                if output.finished and gen.include_usage:
                    parts.append(
                        _sse(
                            builder.usage_chunk(
                                usage(req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens)
                            )
                        )
                    )
                await response.write(b"".join(parts))
        except ApiError as exc:
            # Headers are gone: report the failure in-band, the way vLLM does mid-stream.
            await response.write(_sse(exc.body()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ------------------------------------------------------------------ operational endpoints
    async def _models(self, http: web.Request) -> web.StreamResponse:
        data: list[dict[str, Any]] = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": self.models[0],
                "parent": None,
                "max_model_len": self.config.profile.max_model_len,
                "permission": [],
            }
            for name in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, http: web.Request) -> web.StreamResponse:
        if self.faults.health_delay_s:
            await asyncio.sleep(self.faults.health_delay_s)
        healthy = self.runner.healthy and not self.faults.unhealthy
        return web.Response(status=200 if healthy else 503)

    async def _version(self, http: web.Request) -> web.StreamResponse:
        return web.json_response({"version": EMULATED_VLLM_VERSION, "emulator": "fleetroute"})

    async def _load(self, http: web.Request) -> web.StreamResponse:
        return web.json_response({"server_load": self._http_in_flight})

    async def _metrics(self, http: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _json_body(self, http: web.Request) -> dict[str, Any]:
        return load_json_object(await http.read())

    async def _tokenize(self, http: web.Request) -> web.StreamResponse:
        body = await self._json_body(http)
        if "messages" in body:
            gen_kind = "chat"
        elif "prompt" in body:
            gen_kind = "completion"
        else:
            raise bad_request("'prompt' or 'messages' is required")
        body.pop("stream", None)
        body.pop("stream_options", None)
        gen = parse_generation_request(gen_kind, _JSON_DUMPS(body).encode(), self.tokenizer, self.models, None)
        ids = gen.prompt_token_ids
        return web.json_response(
            {"count": len(ids), "max_model_len": self.config.profile.max_model_len, "tokens": ids, "token_strs": None}
        )

    async def _detokenize(self, http: web.Request) -> web.StreamResponse:
        body = await self._json_body(http)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request("'tokens' must be a list of token ids", "tokens")
        try:
            return web.json_response({"prompt": self.tokenizer.decode(tokens)})
        except ValueError as exc:
            raise bad_request(str(exc), "tokens") from None

    async def _server_info(self, http: web.Request) -> web.StreamResponse:
        # No model_path: sglang-router would try to download a tokenizer for it.
        return web.json_response(
            {
                "served_model_name": self.models[0],
                "tp_size": 1,
                "dp_size": 1,
                "max_total_num_tokens": self.config.profile.kv_capacity_tokens,
                "max_model_len": self.config.profile.max_model_len,
                "version": EMULATED_VLLM_VERSION,
            }
        )

    async def _model_info(self, http: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "served_model_name": self.models[0]}
        )

    async def _render(self, http: web.Request, kind: str) -> web.StreamResponse:
        body = await self._json_body(http)
        body.pop("stream", None)
        body.pop("stream_options", None)
        gen = parse_generation_request(kind, _JSON_DUMPS(body).encode(), self.tokenizer, self.models, None)
        return web.json_response({"token_ids": gen.prompt_token_ids, "count": len(gen.prompt_token_ids)})

    async def _render_completion(self, http: web.Request) -> web.StreamResponse:
        return await self._render(http, "completion")

    async def _render_chat(self, http: web.Request) -> web.StreamResponse:
        return await self._render(http, "chat")

    async def _reset_prefix_cache(self, http: web.Request) -> web.StreamResponse:
        if not self.engine.reset_prefix_cache():
            raise ApiError(409, "cannot reset the prefix cache while requests are running", "ConflictError")
        return web.Response(status=200)

    # ------------------------------------------------------------------ admin
    async def _get_scheduler(self, http: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"policy": self.engine.scheduler.policy.name, "available": available_scheduling_policies()}
        )

    async def _set_scheduler(self, http: web.Request) -> web.StreamResponse:
        body = await self._json_body(http)
        name = body.get("policy")
        if not isinstance(name, str):
            raise bad_request("'policy' must be a string", "policy")
        try:
            policy = make_scheduling_policy(name)
        except ValueError as exc:
            raise bad_request(str(exc), "policy") from None
        self.engine.set_policy(policy)
        log.info("engine scheduling policy switched to %s", name)
        return await self._get_scheduler(http)

    async def _get_faults(self, http: web.Request) -> web.StreamResponse:
        return web.json_response(self.faults.describe())

    async def _set_faults(self, http: web.Request) -> web.StreamResponse:
        body = await self._json_body(http)
        try:
            self.faults.update(body)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        return web.json_response(self.faults.describe())

    async def _state(self, http: web.Request) -> web.StreamResponse:
        e = self.engine
        pool = e.kv.pool
        return web.json_response(
            {
                "profile": self.config.profile.name,
                "speed": self.runner.speed,
                "scheduler": e.scheduler.policy.name,
                "num_running": e.num_running,
                "num_waiting": e.num_waiting,
                "kv_usage": pool.usage,
                "num_free_blocks": pool.num_free_blocks,
                "num_gpu_blocks": pool.num_blocks,
                "num_cached_blocks": pool.num_cached_blocks,
                "num_preemptions": e.num_preemptions,
                "num_steps": e.num_steps,
                "open_streams": self.runner.num_streams,
                "lag_s": self.runner.lag_s,
                "max_lag_s": self.runner.max_lag_s,
                "healthy": self.runner.healthy,
            }
        )


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _JSON_DUMPS(obj).encode() + b"\n\n"


def _echo_id(http: web.Request) -> dict[str, str]:
    rid = http.headers.get("X-Request-Id")
    return {"X-Request-Id": rid} if rid else {}


def _public_id(http: web.Request, internal_id: str) -> str:
    return http.headers.get("X-Request-Id") or internal_id.split("#", 1)[0]


def _error_response(exc: ApiError, http: web.Request) -> web.Response:
    return web.Response(
        status=exc.status, body=_JSON_DUMPS(exc.body()), content_type="application/json", headers=_echo_id(http)
    )


async def serve_replicas(configs: list[ReplicaConfig], host: str, ports: list[int]) -> None:
    """Run replicas until cancelled (one event loop, one port each)."""
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # type: ignore[no-untyped-call]  # vLLM's exposition has no *_created series
    runners: list[web.AppRunner] = []
    try:
        for config, port in zip(configs, ports, strict=True):
            replica = Replica(config)
            runner = web.AppRunner(replica.app, handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            runners.append(runner)
            log.info("emulated replica %d (%s) on http://%s:%d", config.replica_index, config.profile.name, host, port)
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
