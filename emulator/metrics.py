"""vLLM V1's Prometheus metrics for one emulated replica, with vLLM's names, labels and buckets.

Gauges and cumulative counters are read from engine state at scrape time (a custom collector), so the
engine pays nothing for them; per-request histograms are fed by the engine's observer callbacks.
Every series carries ``model_name`` and ``engine`` labels, as vLLM's do.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from emulator.engine import DecodeSpan, EngineCore
from emulator.request import EngineRequest
from emulator.scheduler import ScheduledStep

# Bucket boundaries as vLLM V1 defines them (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
ITERATION_TOKEN_BUCKETS: tuple[float, ...] = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISH_REASONS = ("stop", "length", "abort")


def one_two_five_buckets(limit: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to ``limit`` (used for token-count histograms)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            value = m * scale
            if value > limit:
                return tuple(out)
            out.append(float(value))
        scale *= 10


class _EngineStateCollector(Collector):
    """Scrape-time view of the engine's gauges and cumulative counters."""

    def __init__(self, engine: EngineCore, labels: dict[str, str]) -> None:
        self._engine = engine
        self._names = list(labels)
        self._values = list(labels.values())

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=self._names)
        g.add_metric(self._values, value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=self._names)
        c.add_metric(self._values, value)
        return c

    def collect(self) -> Iterator[Metric]:
        e = self._engine
        stats = e.kv.pool.stats
        usage = e.kv_usage
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.", e.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", e.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield self._gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage (deprecated alias).", usage)
        yield self._counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_queries_tokens,
        )
        yield self._counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_hit_tokens,
        )
        yield self._counter(
            "vllm:num_preemptions", "Cumulative number of preemptions from the engine.", e.num_preemptions
        )
        p = e.profile
        config = {
            "block_size": str(p.block_size),
            "num_gpu_blocks": str(p.num_gpu_blocks),
            "num_cpu_blocks": "0",
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "gpu_memory_utilization": "0.9",
        }
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[*self._names, *config],
        )
        info.add_metric([*self._values, *config.values()], 1.0)
        yield info


_HISTOGRAMS: dict[str, tuple[str, str, tuple[float, ...] | None]] = {
    # key: (metric name, help, buckets; None = token-count buckets up to max_model_len)
    "ttft": (
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        TTFT_BUCKETS,
    ),
    "itl": ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
    "tpot": (
        "vllm:request_time_per_output_token_seconds",
        "Histogram of time_per_output_token_seconds per request.",
        ITL_BUCKETS,
    ),
    "e2e": (
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        REQUEST_LATENCY_BUCKETS,
    ),
    "queue": (
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        REQUEST_LATENCY_BUCKETS,
    ),
    "inference": (
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        REQUEST_LATENCY_BUCKETS,
    ),
    "prefill": (
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        REQUEST_LATENCY_BUCKETS,
    ),
    "decode": (
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        REQUEST_LATENCY_BUCKETS,
    ),
    "req_prompt": ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", None),
    "req_generation": ("vllm:request_generation_tokens", "Number of generation tokens processed.", None),
    "req_max_tokens": (
        "vllm:request_params_max_tokens",
        "Histogram of the max_tokens request parameter.",
        None,
    ),
    "iteration": (
        "vllm:iteration_tokens_total",
        "Histogram of number of tokens per engine_step.",
        ITERATION_TOKEN_BUCKETS,
    ),
}


class EngineMetrics:
    """A replica's Prometheus registry; also the engine observer that feeds its histograms."""

    def __init__(self, model_name: str, engine_index: int = 0, max_model_len: int = 131072) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name, "engine": str(engine_index)}
        names = list(self.labels)
        values = list(self.labels.values())
        r = self.registry
        token_buckets = one_two_five_buckets(max_model_len)
        self._h: dict[str, Histogram] = {
            key: Histogram(name, doc, names, buckets=buckets or token_buckets, registry=r).labels(*values)
            for key, (name, doc, buckets) in _HISTOGRAMS.items()
        }
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", names, registry=r
        ).labels(*values)
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", names, registry=r
        ).labels(*values)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=r,
        )
        # Export every finish reason from the start (at zero), as vLLM does.
        self._success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}

    def attach(self, engine: EngineCore) -> None:
        """Register the scrape-time collector of ``engine``'s gauges and counters."""
        self.registry.register(_EngineStateCollector(engine, self.labels))

    # EngineObserver -------------------------------------------------------------------------
    def on_step(self, step: ScheduledStep, duration_s: float, now: float) -> None:
        self._h["iteration"].observe(step.num_tokens)

    def on_first_token(self, request: EngineRequest, now: float) -> None:
        self._h["ttft"].observe(now - request.arrival_time)
        self._prompt_tokens.inc(request.num_prompt_tokens)
        self._generation_tokens.inc()

    def on_token(self, request: EngineRequest, now: float, since_last_s: float) -> None:
        self._h["itl"].observe(since_last_s)
        self._generation_tokens.inc()

    def on_preempted(self, request: EngineRequest) -> None:
        pass  # counted by the engine, exported by the collector

    def on_decode_span(self, span: DecodeSpan, steps: int) -> None:
        """A simulated run of decode steps: every sequence got one token per step."""
        durations = span.step_durations_s(0, steps)
        for duration in durations:
            self._h["iteration"].observe(span.num_seqs)
            for _ in range(span.num_seqs):
                self._h["itl"].observe(duration)
        self._generation_tokens.inc(steps * span.num_seqs)

    def on_finished(self, request: EngineRequest, now: float) -> None:
        reason = request.finish_reason.value if request.finish_reason else "abort"
        self._success[reason].inc()
        if request.first_token_time is None:
            return  # aborted before its first token: no latency to report
        h = self._h
        scheduled = request.first_scheduled_time if request.first_scheduled_time is not None else now
        decode_s = (request.last_token_time or now) - request.first_token_time
        h["e2e"].observe(now - request.arrival_time)
        h["queue"].observe(scheduled - request.arrival_time)
        h["inference"].observe(now - scheduled)
        h["prefill"].observe(request.first_token_time - scheduled)
        h["decode"].observe(decode_s)
        if request.num_output_tokens > 1:
            h["tpot"].observe(decode_s / (request.num_output_tokens - 1))
        h["req_prompt"].observe(request.num_prompt_tokens)
        h["req_generation"].observe(request.num_output_tokens)
        h["req_max_tokens"].observe(request.sampling.max_tokens)
