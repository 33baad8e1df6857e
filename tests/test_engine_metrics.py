"""The fast /metrics reader, cross-checked against prometheus_client's full parser on real and hand-written text."""

from __future__ import annotations

import math
from collections.abc import Iterable

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

from emulator.metrics import EngineMetrics
from router.engine_metrics import EngineSignals, parse_engine_metrics
from tests.engine_helpers import Driver, make_engine, make_profile, make_request, prompt_tokens
from tests.live import live_replica

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

# (signal, names in preference order, aggregation) per engine family, restated independently of the module.
VLLM_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "num_running": (("vllm:num_requests_running",), "sum"),
    "num_waiting": (("vllm:num_requests_waiting",), "sum"),
    "kv_usage": (("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), "mean"),
    "prefix_cache_queries": (("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"), "sum"),
    "prefix_cache_hits": (("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"), "sum"),
    "num_preemptions": (("vllm:num_preemptions_total",), "sum"),
}
SGLANG_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "num_running": (("sglang:num_running_reqs",), "sum"),
    "num_waiting": (("sglang:num_queue_reqs",), "sum"),
    "kv_usage": (("sglang:token_usage",), "mean"),
    "prefix_cache_queries": (("sglang:prompt_tokens_total",), "sum"),
    "prefix_cache_hits": (("sglang:cached_tokens_total",), "sum"),
    "num_preemptions": (("sglang:num_retracted_requests_total",), "sum"),
}


def reference(text: str, kind: str, *, openmetrics: bool = False) -> EngineSignals:
    """The same signals computed from prometheus_client's parse of the whole exposition."""
    parse = om_families if openmetrics else text_string_to_metric_families
    families = parse(text)
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in families:
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    table = SGLANG_NAMES if kind == "sglang" else VLLM_NAMES
    values: dict[str, float | int | None] = {}
    for signal, (names, how) in table.items():
        values[signal] = None
        for name in names:
            usable = [v for _, v in samples.get(name, []) if not math.isnan(v)]
            if usable:
                total = sum(usable) / len(usable) if how == "mean" else sum(usable)
                values[signal] = None if math.isnan(total) else total
                break
    capacity: int | None = None
    if kind == "sglang":
        for _, v in samples.get("sglang:max_total_num_tokens", []):
            if math.isfinite(v) and v >= 0:
                capacity = (capacity or 0) + int(v)
    else:
        for labels, _ in samples.get("vllm:cache_config_info", []):
            try:
                blocks, size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
            except (KeyError, ValueError):
                continue
            capacity = (capacity or 0) + blocks * size
    return EngineSignals(kv_capacity_tokens=capacity, **values)


def same(a: EngineSignals, b: EngineSignals) -> bool:
    """Field-wise equality that treats values within float rounding (and two infinities) as equal."""
    for field in EngineSignals.__dataclass_fields__:
        x, y = getattr(a, field), getattr(b, field)
        if x is None or y is None:
            if x is not y:
                return False
        elif not (x == y or math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12)):
            return False
    return True


def check(text: str, kind: str, **expected: float | int | None) -> EngineSignals:
    """Parse ``text`` as str and as bytes, compare with prometheus_client and with ``expected`` fields."""
    got = parse_engine_metrics(text, kind)  # type: ignore[arg-type]
    assert parse_engine_metrics(text.encode(), kind) == got  # type: ignore[arg-type]
    ref = reference(text, kind)
    assert same(got, ref), f"\nfast: {got}\nfull: {ref}"
    for field, value in expected.items():
        assert getattr(got, field) == value, field
    return got


# -- the emulator's real exposition --------------------------------------------------------------------------


def busy_emulator() -> EngineMetrics:
    """An emulated engine mid-run: requests running and waiting, prefix hits and preemptions counted."""
    metrics = EngineMetrics(MODEL, 0, 1024)
    engine = make_engine(make_profile(num_gpu_blocks=24, max_num_seqs=4, max_model_len=256), observer=metrics)
    metrics.attach(engine)
    driver = Driver(engine)
    shared = prompt_tokens(64, seed=9)
    for i in range(10):
        engine.add_request(make_request(f"r{i}", prompt_tokens(96, seed=i, prefix=shared), max_tokens=100), 0.0)
    for _ in range(90):
        driver.step()
    return metrics


def test_emulator_exposition_matches_full_parser() -> None:
    metrics = busy_emulator()
    text = generate_latest(metrics.registry).decode()
    got = check(text, "emulator", kv_capacity_tokens=24 * 16)
    assert got.num_running and got.num_waiting and got.num_preemptions and got.prefix_cache_hits
    assert 0 < got.kv_usage <= 1  # type: ignore[operator]
    assert parse_engine_metrics(text, "vllm") == got


def test_emulator_openmetrics_exposition() -> None:
    metrics = busy_emulator()
    # allow-utf-8 keeps ':' in sample names; prometheus_client's default OpenMetrics escaping rewrites them to
    # '_' in samples but not in TYPE lines, which its own parser then rejects.
    om_text: bytes = om_exposition.generate_latest(  # type: ignore[no-untyped-call]
        metrics.registry, escaping=om_exposition.ALLOWUTF8
    )
    text = om_text.decode()
    assert text.rstrip().endswith("# EOF")
    got = parse_engine_metrics(text, "emulator")
    assert same(got, reference(text, "vllm", openmetrics=True))
    assert got == parse_engine_metrics(generate_latest(metrics.registry), "emulator")


async def test_live_replica_metrics_endpoint() -> None:
    async with live_replica() as live, aiohttp.ClientSession() as session:
        async with session.post(
            f"{live.api}/completions", json={"model": MODEL, "prompt": "hello " * 50, "max_tokens": 3}
        ) as r:
            assert r.status == 200
        async with session.get(f"{live.url}/metrics") as r:
            body = await r.read()
    got = check(body.decode(), "vllm")
    profile = live.replica.engine.profile
    assert got.kv_capacity_tokens == profile.num_gpu_blocks * profile.block_size
    assert got.prefix_cache_queries is not None and got.prefix_cache_queries > 0


# -- hand-written vLLM and SGLang samples ---------------------------------------------------------------------

VLLM_DP = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="org/m, \\"v2\\" {x}"} 3.0
vllm:num_requests_running{engine="1",model_name="org/m, \\"v2\\" {x}"} 4.0 1712345678000
# HELP vllm:num_requests_running_extra Not ours.
# TYPE vllm:num_requests_running_extra gauge
vllm:num_requests_running_extra{engine="0"} 100.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.5e1
vllm:num_requests_waiting{engine="1",model_name="m"} 2E+00
# HELP vllm:num_requests_waiting_by_reason Waiting requests by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0
# HELP vllm:kv_cache_usage_perc KV-cache usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
vllm:kv_cache_usage_perc{engine="2",model_name="m"} NaN
# HELP vllm:gpu_cache_usage_perc Deprecated.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.99
# HELP vllm:prefix_cache_queries Prefix cache queries.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1.2e6
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 800000.0
# HELP vllm:prefix_cache_hits Prefix cache hits.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 6e5
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 2.0e5
# HELP vllm:num_preemptions Preemptions.
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 0.0
vllm:num_preemptions_total{engine="1",model_name="m"} +Inf
# HELP vllm:time_to_first_token_seconds TTFT.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 5.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 5.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.4
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",model_name="m",num_gpu_blocks="2048"} 1.0
vllm:cache_config_info{engine="1",model_name="a b, c=\\"d\\"",num_gpu_blocks="1024",block_size="32"} 1.0
"""


def test_vllm_two_engines() -> None:
    check(
        VLLM_DP,
        "vllm",
        num_running=7.0,
        num_waiting=17.0,
        kv_usage=0.5,  # NaN engine ignored, deprecated alias not used when the current name is there
        kv_capacity_tokens=2048 * 16 + 1024 * 32,
        prefix_cache_queries=2.0e6,
        prefix_cache_hits=8.0e5,
        num_preemptions=math.inf,
    )


def test_vllm_deprecated_names_are_fallbacks() -> None:
    text = """\
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0"} 0.5
vllm:gpu_cache_usage_perc{engine="1"} 0.3
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries_total{engine="0"} 10
# TYPE vllm:gpu_prefix_cache_hits counter
vllm:gpu_prefix_cache_hits_total{engine="0"} 4
"""
    check(text, "vllm", kv_usage=0.4, prefix_cache_queries=10.0, prefix_cache_hits=4.0, num_running=None)
    # The current name wins as soon as it has one usable sample; an all-NaN current name falls back.
    check(text + 'vllm:kv_cache_usage_perc{engine="0"} 0.9\n', "vllm", kv_usage=0.9)
    check(text + 'vllm:kv_cache_usage_perc{engine="0"} NaN\n', "vllm", kv_usage=0.4)


SGLANG_DP = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"} 12.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="4"} 10.0
# HELP sglang:num_running_reqs_offline_batch Offline batch requests.
# TYPE sglang:num_running_reqs_offline_batch gauge
sglang:num_running_reqs_offline_batch{dp_rank="0",model_name="qwen"} 50.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",model_name="qwen"} 3.0
sglang:num_queue_reqs{dp_rank="1",model_name="qwen"} 0.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",model_name="qwen"} 0.5
sglang:token_usage{dp_rank="1",model_name="qwen"} 0.1
# HELP sglang:max_total_num_tokens Maximum total number of tokens in the KV cache pool.
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{dp_rank="0",model_name="qwen"} 161721.0
sglang:max_total_num_tokens{dp_rank="1",model_name="qwen"} 161721.0
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{dp_rank="0",model_name="qwen"} 0.42
# HELP sglang:prompt_tokens Number of prefill tokens processed.
# TYPE sglang:prompt_tokens counter
sglang:prompt_tokens_total{model_name="qwen"} 8.128902e+06
# HELP sglang:cached_tokens Number of cached prompt tokens.
# TYPE sglang:cached_tokens counter
sglang:cached_tokens_total{model_name="qwen"} 3.5e+06
# HELP sglang:num_retracted_requests Total number of retracted requests.
# TYPE sglang:num_retracted_requests counter
sglang:num_retracted_requests_total{model_name="qwen"} 7.0
"""


def test_sglang_data_parallel() -> None:
    got = check(
        SGLANG_DP,
        "sglang",
        num_running=22.0,
        num_waiting=3.0,
        kv_capacity_tokens=2 * 161721,
        prefix_cache_queries=8.128902e6,
        prefix_cache_hits=3.5e6,
        num_preemptions=7.0,
    )
    assert got.kv_usage == pytest.approx(0.3)
    assert parse_engine_metrics(SGLANG_DP, "vllm") == EngineSignals()  # the other family's names only
    assert parse_engine_metrics(VLLM_DP, "sglang") == EngineSignals()


def test_sglang_without_capacity_gauge() -> None:
    text = "sglang:num_running_reqs 1\nsglang:token_usage 0.5\n"
    check(text, "sglang", num_running=1.0, kv_usage=0.5, kv_capacity_tokens=None)


# -- format corners and garbage --------------------------------------------------------------------------------


def test_opposite_infinities_are_no_information() -> None:
    text = 'vllm:num_preemptions_total{engine="0"} +Inf\nvllm:num_preemptions_total{engine="1"} -Inf\n'
    check(text, "vllm", num_preemptions=None)


def test_first_line_crlf_whitespace_and_no_trailing_newline() -> None:
    text = 'vllm:num_requests_running{engine="0"} 2\r\nvllm:num_requests_running{engine="1"}\t3\r\n'
    assert parse_engine_metrics(text, "vllm").num_running == 5.0
    assert parse_engine_metrics("vllm:num_requests_waiting 4", "vllm").num_waiting == 4.0
    assert parse_engine_metrics("vllm:num_requests_waiting{} 4 -12\n", "vllm").num_waiting == 4.0


def test_openmetrics_eof_and_exemplars() -> None:
    text = (
        "# TYPE vllm:num_preemptions counter\n"
        'vllm:num_preemptions_total{engine="0"} 5.0 # {trace_id="a}b"} 1.0 1712345678.5\n'
        'vllm:num_requests_running{engine="0"} 1.0 1712345678.5\n'
        "# EOF\n"
        'vllm:num_requests_running{engine="1"} 100.0\n'
    )
    got = parse_engine_metrics(text, "vllm")
    assert got.num_preemptions == 5.0
    assert got.num_running == 1.0  # the sample after "# EOF" does not count
    assert parse_engine_metrics("# EOF\nvllm:num_requests_running 1\n", "vllm").num_running is None


def test_malformed_wanted_lines_are_skipped() -> None:
    text = "\n".join(
        [
            'vllm:num_requests_running{engine="0"} 2',  # the only good running sample
            'vllm:num_requests_running{engine="1"} abc',
            'vllm:num_requests_running{engine="2" 3',
            'vllm:num_requests_running{engine="3"}3',
            'vllm:num_requests_running{engine="4"}',
            'vllm:num_requests_running{engine="5"} 3 4 5',
            'vllm:num_requests_running{engine="6} 3',
            "vllm:num_requests_running",
            "vllm:num_requests_running 1_0x",
            "\x00\xff garbage \ufffd {{{ }}} ",
            'vllm:kv_cache_usage_perc{engine="0"} NaN',
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0',
            'vllm:cache_config_info{block_size="16"} 1.0',
            "vllm:cache_config_info 1.0",
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="10" junk} 1.0',
            "",
        ]
    )
    got = parse_engine_metrics(text, "vllm")
    assert got == EngineSignals(num_running=2.0)


@pytest.mark.parametrize("text", ["", "\n\n", "# HELP x y\n# TYPE x gauge\nx 1\n", "# EOF"])
def test_nothing_wanted(text: str) -> None:
    assert parse_engine_metrics(text, "vllm") == EngineSignals()
    assert parse_engine_metrics(text.encode(), "sglang") == EngineSignals()


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown engine kind"):
        parse_engine_metrics("", "trtllm")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary()), st.sampled_from(["vllm", "sglang", "emulator"]))
def test_never_raises(text: str | bytes, kind: str) -> None:
    parse_engine_metrics(text, kind)  # type: ignore[arg-type]
    if isinstance(text, str):
        parse_engine_metrics("vllm:num_requests_running" + text, kind)  # type: ignore[arg-type]


# -- generated expositions against the full parser -----------------------------------------------------------

label_values = st.text(alphabet=st.sampled_from(list('ab ,={}"\\\n#é')), max_size=12)
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(min_value=0, max_value=10**12).map(float),
)


def render_value(v: float, style: int) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return (repr(v), f"{v:e}", f"{v:E}")[style % 3]


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(engines: Iterable[tuple[str, float, float, int, bool]], names: list[str]) -> str:
    lines: list[str] = []
    for name in names:
        kind = "counter" if name.endswith("_total") else "gauge"
        family = name.removesuffix("_total")
        lines += [f"# HELP {family} help text, with {{braces}}", f"# TYPE {family} {kind}"]
        for i, (model, value, _, style, stamp) in enumerate(engines):
            tail = " 1712345678000" if stamp else ""
            lines.append(f'{name}{{engine="{i}",model_name="{escape(model)}"}} {render_value(value, style)}{tail}')
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(label_values, values, values, st.integers(0, 2), st.booleans()), min_size=1, max_size=4),
    st.lists(
        st.sampled_from(
            [
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc",
                "vllm:gpu_cache_usage_perc",
                "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_hits_total",
                "vllm:gpu_prefix_cache_hits_total",
                "vllm:num_preemptions_total",
                "vllm:num_requests_running_extra",
            ]
        ),
        unique=True,
    ),
    st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([1, 16, 32])), max_size=3),
)
def test_generated_vllm_expositions(
    engines: list[tuple[str, float, float, int, bool]], names: list[str], configs: list[tuple[int, int]]
) -> None:
    text = exposition(engines, names)
    if configs:
        text += "# HELP vllm:cache_config_info info\n# TYPE vllm:cache_config_info gauge\n"
        model = escape(engines[0][0])
        for i, (blocks, size) in enumerate(configs):
            labels = f'block_size="{size}",engine="{i}",model_name="{model}",num_gpu_blocks="{blocks}"'
            text += f"vllm:cache_config_info{{{labels}}} 1.0\n"
    check(text, "vllm")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(label_values, values, values, st.integers(0, 2), st.booleans()), min_size=1, max_size=4),
    st.lists(
        st.sampled_from(
            [
                "sglang:num_running_reqs",
                "sglang:num_queue_reqs",
                "sglang:token_usage",
                "sglang:max_total_num_tokens",
                "sglang:prompt_tokens_total",
                "sglang:cached_tokens_total",
                "sglang:num_retracted_requests_total",
            ]
        ),
        unique=True,
    ),
)
def test_generated_sglang_expositions(engines: list[tuple[str, float, float, int, bool]], names: list[str]) -> None:
    check(exposition(engines, names), "sglang")
