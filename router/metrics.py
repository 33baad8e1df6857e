"""The router's own Prometheus metrics (prefix ``fleetroute_``, base units).

Per-replica gauges (in-flight accounting, health, signal age) are read from the fleet at scrape time,
so the hot path only increments counters and observes histograms. The counters and histograms the request
path touches (several per request, one per streamed chunk) are :class:`FastCounter` and
:class:`FastHistogram`: plain Python numbers, exported under the same names and in the same form as
``prometheus_client``'s, without its per-update lock and validation, which cost more than the proxying
work around them. The event loop is their only writer, and scrapes run on the same loop.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar, cast

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from router.fleet import Fleet, Health
from router.prefix_index import PrefixIndex

if TYPE_CHECKING:
    from router.residency import ResidencyModel
    from router.state.base import StateStore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2)
SYNC_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)


_go_float = cast(Callable[[float], str], floatToGoString)  # how prometheus_client writes ``le`` labels


def _use_created() -> bool:
    """``prometheus_client``'s own switch for the ``_created`` series (``PROMETHEUS_DISABLE_CREATED_SERIES`` at
    import, ``disable_created_metrics()`` at run time), read where its metrics read it."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class CounterChild:
    """One label set of a :class:`FastCounter`."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    """One label set of a :class:`FastHistogram`: per-bucket counts (made cumulative at scrape) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # le is inclusive: the first bound >= amount
        self.sum += amount


_Child = TypeVar("_Child", CounterChild, HistogramChild)


class _Fast(Collector, Generic[_Child]):
    """A labelled metric whose children are plain objects: no lock per update, since only the event loop
    updates them and a scrape reads whole numbers."""

    _type = "untyped"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        new_child: Callable[[], _Child],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._new_child: Callable[[], _Child] = new_child
        self._children: dict[tuple[str, ...], _Child] = {}
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        yield Metric(self.name, self.documentation, self._type)

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child


class FastCounter(_Fast[CounterChild]):
    """A labelled counter exported like ``prometheus_client.Counter`` (``_total`` and ``_created``)."""

    _type = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames, registry, CounterChild)

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.documentation, "counter")
        add = family.samples.append
        created = _use_created()
        for values, child in list(self._children.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            add(Sample(self.name + "_total", labels, child.value))
            if created:
                add(Sample(self.name + "_created", labels, child.created))
        yield family


class FastHistogram(_Fast[HistogramChild]):
    """A labelled histogram exported like ``prometheus_client.Histogram`` (``_bucket``, ``_count``, ``_sum``,
    ``_created``)."""

    _type = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.bounds = tuple(bounds)
        self._le = [_go_float(b) for b in self.bounds]
        super().__init__(name, documentation, labelnames, registry, lambda: HistogramChild(self.bounds))

    def collect(self) -> Iterator[Metric]:
        family = Metric(self.name, self.documentation, "histogram")
        add = family.samples.append
        created = _use_created()
        for values, child in list(self._children.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            total = 0
            for le, count in zip(self._le, list(child.counts), strict=True):
                total += count
                add(Sample(self.name + "_bucket", {**labels, "le": le}, total))
            add(Sample(self.name + "_count", labels, total))
            add(Sample(self.name + "_sum", labels, child.sum))
            if created:
                add(Sample(self.name + "_created", labels, child.created))
        yield family


class _FleetCollector(Collector):
    """Scrape-time gauges of every replica's state."""

    def __init__(
        self,
        fleet: Fleet,
        index: PrefixIndex,
        policy_name: Callable[[], str],
        clock: Callable[[], float],
        residency: ResidencyModel | None = None,
    ) -> None:
        self._fleet = fleet
        self._index = index
        self._residency = residency
        self._policy_name = policy_name
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        label = ["replica"]
        inflight = GaugeMetricFamily("fleetroute_replica_inflight_requests", "Requests in flight.", labels=label)
        tokens = GaugeMetricFamily(
            "fleetroute_replica_inflight_tokens",
            "Outstanding tokens by phase (router accounting).",
            labels=[*label, "phase"],
        )
        remote_requests = GaugeMetricFamily(
            "fleetroute_replica_remote_inflight_requests",
            "Requests in flight from the other routers of the fleet (shared state store).",
            labels=label,
        )
        remote_tokens = GaugeMetricFamily(
            "fleetroute_replica_remote_inflight_tokens",
            "Other routers' outstanding tokens by phase (shared state store).",
            labels=[*label, "phase"],
        )
        healthy = GaugeMetricFamily(
            "fleetroute_replica_healthy", "1 if the replica passes health checks.", labels=label
        )
        eligible = GaugeMetricFamily(
            "fleetroute_replica_eligible", "1 if new requests may be routed here.", labels=label
        )
        draining = GaugeMetricFamily("fleetroute_replica_draining", "1 while the replica drains.", labels=label)
        age = GaugeMetricFamily(
            "fleetroute_signal_age_seconds", "Age of each signal the router holds.", labels=[*label, "signal"]
        )
        queue = GaugeMetricFamily(
            "fleetroute_replica_queue_depth", "Waiting requests reported by the engine.", labels=label
        )
        running = GaugeMetricFamily(
            "fleetroute_replica_running_requests", "Running requests reported by the engine.", labels=label
        )
        kv = GaugeMetricFamily(
            "fleetroute_replica_kv_usage_ratio", "KV-cache usage reported by the engine.", labels=label
        )
        ejections = CounterMetricFamily("fleetroute_ejections", "Outlier ejections of the replica.", labels=label)
        prefix_queries = CounterMetricFamily(
            "fleetroute_replica_prefix_cache_queries_tokens", "Engine-reported prefix-cache queries.", labels=label
        )
        prefix_hits = CounterMetricFamily(
            "fleetroute_replica_prefix_cache_hits_tokens", "Engine-reported prefix-cache hits.", labels=label
        )
        for r in self._fleet.all():
            rid = [r.id]
            inflight.add_metric(rid, r.inflight_requests)
            tokens.add_metric([*rid, "prefill"], r.inflight_prefill_tokens)
            tokens.add_metric([*rid, "decode"], r.inflight_decode_tokens)
            if r.remote is not None:
                remote_requests.add_metric(rid, r.remote.requests)
                remote_tokens.add_metric([*rid, "prefill"], r.remote.prefill_tokens)
                remote_tokens.add_metric([*rid, "decode"], r.remote.decode_tokens)
            healthy.add_metric(rid, 1.0 if r.health is Health.HEALTHY else 0.0)
            eligible.add_metric(rid, 1.0 if r.eligible(now, None) else 0.0)
            draining.add_metric(rid, 1.0 if r.draining else 0.0)
            ejections.add_metric(rid, r.ejections)
            # The accounting signal is updated at every event, so its age is always zero.
            age.add_metric([*rid, "accounting"], 0.0)
            if r.signals_time is not None:
                age.add_metric([*rid, "engine_metrics"], now - r.signals_time)
            if r.last_check_time is not None:
                age.add_metric([*rid, "health"], now - r.last_check_time)
            s = r.signals
            if s is not None:
                if s.num_waiting is not None:
                    queue.add_metric(rid, s.num_waiting)
                if s.num_running is not None:
                    running.add_metric(rid, s.num_running)
                if s.kv_usage is not None:
                    kv.add_metric(rid, s.kv_usage)
                if s.prefix_cache_queries is not None and s.prefix_cache_hits is not None:
                    prefix_queries.add_metric(rid, s.prefix_cache_queries)
                    prefix_hits.add_metric(rid, s.prefix_cache_hits)
        yield from (inflight, tokens, remote_requests, remote_tokens)
        yield from (healthy, eligible, draining, age, queue, running, kv, ejections)
        yield from (prefix_queries, prefix_hits)
        policy = GaugeMetricFamily("fleetroute_policy_info", "The active routing policy.", labels=["policy"])
        policy.add_metric([self._policy_name()], 1.0)
        yield policy
        idx = self._index
        yield GaugeMetricFamily(
            "fleetroute_prefix_index_bytes", "Estimated prefix-index memory.", value=idx.approx_bytes
        )
        yield GaugeMetricFamily(
            "fleetroute_prefix_index_budget_bytes", "Prefix-index memory budget.", value=idx.max_bytes
        )
        yield GaugeMetricFamily("fleetroute_prefix_index_entries", "Blocks in the prefix index.", value=idx.num_entries)
        yield CounterMetricFamily(
            "fleetroute_prefix_index_evictions", "Blocks evicted from the prefix index.", value=idx.evictions
        )
        if self._residency is not None:
            yield CounterMetricFamily(
                "fleetroute_prefix_residency_evictions",
                "Blocks cleared from the prefix index because the replica's modelled LRU cache pushed them out.",
                value=self._residency.evicted_blocks,
            )


class _StateCollector(Collector):
    """Scrape-time gauges of the shared state store (names used by the dashboard and the alert rules)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        store = self._store
        info = GaugeMetricFamily("fleetroute_state_store_info", "The state store backend.", labels=["backend"])
        info.add_metric([store.backend], 1.0)
        yield info
        yield GaugeMetricFamily(
            "fleetroute_state_store_up", "1 while the state store is reachable.", value=1.0 if store.up else 0.0
        )
        yield GaugeMetricFamily(
            "fleetroute_state_store_staleness_seconds",
            "Time since this router last synchronised with the shared state.",
            value=store.staleness_s,
        )
        yield GaugeMetricFamily(
            "fleetroute_state_store_remote_routers",
            "Other live routers of the fleet seen through the state store.",
            value=store.remote_routers,
        )
        entries = store.shared_prefix_entries
        if entries is not None:
            yield GaugeMetricFamily(
                "fleetroute_state_store_prefix_entries",
                "Entries of the shared prefix index in Redis (at the last sync).",
                value=entries,
            )


class RouterMetrics:
    """Counters and histograms updated on the request path."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = FastCounter(
            "fleetroute_requests",
            "Requests answered, by replica (none if never dispatched), policy and HTTP status.",
            ["replica", "policy", "status"],
            registry=r,
        )
        self.ttft = FastHistogram(
            "fleetroute_time_to_first_token_seconds",
            "Time from request arrival at the router to the first response byte streamed to the client.",
            ["replica"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_chunk = FastHistogram(
            "fleetroute_inter_token_latency_seconds",
            "Gap between consecutive streamed chunks as seen by the router.",
            ["replica"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = FastHistogram(
            "fleetroute_request_duration_seconds",
            "Total time from arrival to the end of the response.",
            ["replica"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decision = FastHistogram(
            "fleetroute_routing_decision_seconds",
            "Time to build the fleet snapshot and run the routing policy.",
            ["policy"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.decisions = FastCounter(
            "fleetroute_routing_decisions",
            "Routing decisions by policy and replica.",
            ["policy", "replica"],
            registry=r,
        )
        self.retries = Counter(
            "fleetroute_retries", "Requests retried on another replica, by reason.", ["reason"], registry=r
        )
        self.upstream_errors = Counter(
            "fleetroute_upstream_errors", "Failed attempts, by replica and reason.", ["replica", "reason"], registry=r
        )
        self.client_disconnects = Counter(
            "fleetroute_client_disconnects", "Requests abandoned by their client.", registry=r
        )
        self.prefix_match = FastCounter(
            "fleetroute_prefix_match_blocks",
            "Prompt blocks the chosen replica was believed to hold, and blocks looked up.",
            ["kind"],
            registry=r,
        )

        self.state_sync = Histogram(
            "fleetroute_state_store_sync_seconds",
            "Round trip of one state-store batch (load sync or prefix publication), by kind.",
            ["kind"],
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.state_errors = Counter(
            "fleetroute_state_store_errors", "Failed state-store operations, by operation.", ["op"], registry=r
        )
        self.state_records = Counter(
            "fleetroute_state_store_prefix_records",
            "Prefix records shared through the state store: published by this router, applied from others.",
            ["direction"],
            registry=r,
        )

    def attach(
        self,
        fleet: Fleet,
        index: PrefixIndex,
        policy_name: Callable[[], str],
        residency: ResidencyModel | None = None,
    ) -> None:
        self.registry.register(_FleetCollector(fleet, index, policy_name, time.monotonic, residency))

    def attach_state(self, store: StateStore) -> None:
        self.registry.register(_StateCollector(store))
