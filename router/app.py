"""Wires the router together: discovery → fleet → health, scraping, engine configuration → proxy, and the
state store that keeps the fleet's routers in step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from policies.routing import make_routing_policy
from router.admin import AdminApi
from router.config import RouterSettings
from router.discovery.base import Discovery, ReplicaSpec
from router.discovery.dns import DnsDiscovery
from router.discovery.kubernetes import KubernetesDiscovery
from router.discovery.static import StaticDiscovery, parse_replica_arg, validate_kind
from router.engine_config import EngineConfigurator
from router.fleet import Fleet, ReplicaState
from router.health import HealthMonitor
from router.metrics import RouterMetrics
from router.prefix_index import PrefixIndex
from router.proxy import PolicyHolder, Proxy, json_error_middleware_factory
from router.residency import ResidencyModel
from router.state import StateStore, make_state_store

log = logging.getLogger(__name__)


def make_discovery(settings: RouterSettings) -> Discovery:
    kind = validate_kind(settings.replica_kind)
    if settings.dns_service is not None:
        return DnsDiscovery(settings.dns_service, settings.dns_port, kind=kind, interval_s=settings.dns_interval_s)
    if settings.k8s_service is not None:
        return KubernetesDiscovery(
            settings.k8s_service, settings.k8s_namespace, port_name=settings.k8s_port_name, kind=kind
        )
    return StaticDiscovery([parse_replica_arg(text, kind) for text in settings.replicas])


class RouterService:
    """The running router: its HTTP apps and background tasks."""

    def __init__(self, settings: RouterSettings, discovery: Discovery | None = None) -> None:
        self.settings = settings
        self._discovery = discovery or make_discovery(settings)
        self.metrics = RouterMetrics()
        self.policy = PolicyHolder(settings.policy, make_routing_policy(settings.policy, settings.policy_params))
        self.index = PrefixIndex(settings.prefix_index_max_bytes, settings.prefix_block_bytes)
        # Every prefix record, this router's and the others', goes through the model of the engines' caches.
        self.residency = ResidencyModel(self.index)
        self.fleet = Fleet(on_added=self._replica_added, on_removed=self._replica_removed)
        self.metrics.attach(self.fleet, self.index, lambda: self.policy.name, self.residency)
        self.state: StateStore = make_state_store(settings, self.fleet, self.index, self.metrics, self.residency)
        self.metrics.attach_state(self.state)
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None
        self.started_at = time.monotonic()
        self.port: int | None = None
        self.admin_port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=30, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        from router.scraper import MetricsScraper

        self.scraper = MetricsScraper(self._session, s.scrape_interval_s, store=self.state)
        self.engine_config = EngineConfigurator(self._session, s.engine_schedulers)
        self.health = HealthMonitor(self.fleet, self._session, s.health, on_healthy=self.engine_config.apply)
        self.proxy = Proxy(
            s,
            self.fleet,
            self.policy,
            self.index,
            self.health,
            self.metrics,
            self._session,
            store=self.state,
            residency=self.residency,
            engine_config=self.engine_config,
        )

        # The store first: it never blocks startup (an unreachable Redis only reads "down"), and replicas
        # discovered from here on get their scrape leases and prefix records shared from the start.
        await self.state.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._discovery.run(self._on_discovery), name="discovery"))
        self._tasks.append(loop.create_task(self.health.run(), name="health"))
        self._tasks.append(loop.create_task(self._residency_loop(), name="residency"))

        runner = web.AppRunner(self._main_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, s.host, s.port, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        self.port = runner.addresses[0][1]
        if s.admin_port is not None:
            token = s.admin_token.get_secret_value() if s.admin_token else None
            admin = web.AppRunner(AdminApi(self.fleet, self.policy, token).app(), access_log=None)
            await admin.setup()
            await web.TCPSite(admin, s.admin_host, s.admin_port, reuse_address=True).start()
            self._runners.append(admin)
            self.admin_port = admin.addresses[0][1]
        log.info(
            "fleetroute serving",
            extra={"port": self.port, "admin_port": self.admin_port, "policy": self.policy.name},
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        with contextlib.suppress(AttributeError):
            await self.scraper.close()
        await self.state.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        with contextlib.suppress(AttributeError):  # never started: no proxy, no pooled connections
            self.proxy.close()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ discovery callbacks
    def _on_discovery(self, specs: list[ReplicaSpec]) -> None:
        self.fleet.update(specs)

    def _replica_added(self, replica: ReplicaState) -> None:
        log.info("replica discovered", extra={"replica": replica.id, "kind": replica.spec.kind})
        self.index.add_replica(replica.id)
        self.state.replica_added(replica)
        if self._session is not None:
            self.scraper.start(replica)
            self.health.check_soon()

    def _replica_removed(self, replica: ReplicaState) -> None:
        log.info("replica removed", extra={"replica": replica.id})
        self.index.remove_replica(replica.id)
        self.residency.remove_replica(replica.id)
        self.state.replica_removed(replica)
        self.scraper.stop(replica)

    # ------------------------------------------------------------------ residency model
    def size_residency(self) -> None:
        """Size each replica's modelled cache, in index blocks, from its KV capacity in tokens.

        The capacity is the engine's own (vLLM: ``num_gpu_blocks`` x ``block_size`` from
        ``vllm:cache_config_info``; SGLang: ``max_total_num_tokens``), from this router's scrape or the one
        another router shared. Index blocks are ``prefix_block_bytes`` of prompt text, so a block is worth
        ``prefix_block_bytes`` x the proxy's tokens per byte: ``1 / bytes_per_token`` (4, typical of English
        under Llama-3 tokenizers) until the engines' usage reports calibrate it. A replica that exports no
        capacity keeps being recorded without bound.
        """
        tokens_per_block = self.proxy.tokens_per_block
        for replica in self.fleet.all():
            signals = replica.signals
            if signals is not None and signals.kv_capacity_tokens:
                self.residency.set_capacity(replica.id, signals.kv_capacity_tokens, tokens_per_block)

    async def _residency_loop(self) -> None:
        """Resize at the scrape rate: capacities arrive with scrapes, and tokens per byte drifts as it learns."""
        while True:
            self.size_residency()
            await asyncio.sleep(self.settings.scrape_interval_s)

    # ------------------------------------------------------------------ the main app
    def _main_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes, middlewares=[json_error_middleware_factory()]
        )
        r = app.router
        r.add_post("/v1/completions", self.proxy.completions)
        r.add_post("/v1/chat/completions", self.proxy.chat)
        r.add_get("/v1/models", self.proxy.models)
        r.add_get("/health", self._health)
        r.add_get("/ready", self._ready)
        r.add_get("/metrics", self._metrics)
        return app

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "alive"})

    async def _ready(self, request: web.Request) -> web.StreamResponse:
        ready = self.fleet.has_healthy()
        return web.json_response({"ready": ready, "replicas": len(self.fleet)}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(settings: RouterSettings) -> None:
    service = RouterService(settings)
    await service.start()
    try:
        await asyncio.Event().wait()
    finally:
        await service.stop()
