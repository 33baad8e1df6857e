"""The dashboards and alert rules against a real Prometheus scraping a live router and two replicas.

Every PromQL expression of the Grafana dashboard and of the rules file is evaluated through
Prometheus' HTTP API after real traffic went through the router, so a misspelt metric, a wrong label or
a query that can never return data fails here rather than on a user's screen. Needs the ``prometheus``
and ``promtool`` binaries (Debian package ``prometheus``; ``scripts/install-ci-tools.sh`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from emulator.tokenizer import synthesize_text
from tests.live import free_port, live_replica, live_router, openai_client

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="needs the prometheus and promtool binaries (apt-get install prometheus; scripts/install-ci-tools.sh)",
)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm" / "fleetroute" / "files" / "alerts" / "fleetroute-rules.yaml"
DASHBOARD = ROOT / "helm" / "fleetroute" / "files" / "dashboards" / "fleetroute-overview.json"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ROUTER_JOB = "fleetroute"
ENGINE_JOB = "vllm"
#: Grafana's $__rate_interval is max(4 x scrape interval, interval + scrape interval); the test's window
#: is wider so that it spans the whole load phase.
RATE_INTERVAL = "20s"
#: Metrics the dashboard and the rules use that the router does not export yet: the Redis state store
#: (being built) will export them. Their panels and alerts must evaluate, and are empty until then.
STATE_STORE_METRICS = frozenset({"fleetroute_state_store_up", "fleetroute_state_store_staleness_seconds"})
#: Dashboard panels allowed to be empty on this healthy, Redis-less fleet (they must still evaluate).
EXPECTED_EMPTY_PANELS = {
    "State store up": "fleetroute_state_store_up: no Redis state store here, and the metric is not exported yet",
    "State store staleness": "fleetroute_state_store_staleness_seconds: likewise",
}
#: Alerts that must fire once every replica is gone and requests fail.
FAULT_ALERTS = ("FleetrouteNoHealthyReplica", "FleetrouteHighErrorRate")
METRIC_NAME = re.compile(r"\b(?:fleetroute|vllm)[:_][A-Za-z0-9_:]*")
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)


# -------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Query:
    source: str  # "panel 'X' target A" / "alert X" / "record X"
    expr: str
    panel: str = ""


def dashboard_queries() -> list[Query]:
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    out: list[Query] = []
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            source = f"panel {panel['title']!r} target {target['refId']}"
            out.append(Query(source, target["expr"], panel["title"]))
    return out


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def rule_queries() -> list[Query]:
    return [Query(f"alert {r['alert']}" if "alert" in r else f"record {r['record']}", r["expr"]) for r in rules()]


def substitute(expr: str, replica_regex: str) -> str:
    """Grafana's template variables, as Grafana would interpolate them for a Prometheus query."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", "5s")
    out = out.replace("$job", ROUTER_JOB).replace("$replica", replica_regex).replace("$model", ".*")
    assert "$" not in out, f"unknown template variable left in {out!r}"
    return out


def grafana_multi_value(values: list[str]) -> str:
    """A multi-value selection as Grafana renders it for a regex matcher: escaped, joined by |."""
    escaped = [re.escape(v).replace("\\", "\\\\") for v in values]
    return "(" + "|".join(escaped) + ")"


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics page can produce, from its TYPE lines (also for families with no sample)."""
    names: set[str] = set()
    for name, kind in TYPE_LINE.findall(exposition):
        names.add(name)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        elif kind == "summary":
            names.update({f"{name}_sum", f"{name}_count"})
    return names


# ------------------------------------------------------------------------------------------ prometheus
class Prometheus:
    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        self.url = url
        self._http = http

    async def query(self, expr: str) -> list[dict[str, Any]]:
        response = await self._http.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
        assert body["data"]["resultType"] == "vector", expr
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, expr: str) -> float | None:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None

    async def wait_for(self, expr: str, predicate: Callable[[float], bool], within_s: float = 15.0) -> None:
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            value = await self.value(expr)
            if value is not None and predicate(value):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{expr!r} did not reach the expected value in {within_s} s (last: {value})")
            await asyncio.sleep(0.25)


def write_config(directory: Path, router: str, engines: list[str]) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": ROUTER_JOB, "static_configs": [{"targets": [router]}]},
            {"job_name": ENGINE_JOB, "static_configs": [{"targets": engines}]},
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def running_prometheus(config: Path, directory: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    assert PROMETHEUS is not None
    log = (directory / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


async def wait_ready(http: httpx.AsyncClient, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{await asyncio.to_thread(log.read_text)}")
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get(f"{url}/-/ready")).status_code == 200:
                return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"prometheus did not become ready:\n{await asyncio.to_thread(log.read_text)}")
        await asyncio.sleep(0.1)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=30, check=False)


# --------------------------------------------------------------------------------------------- traffic
async def generate_load(api: str, count: int, first: int, concurrency: int = 5) -> None:
    """Short completions, half of them streamed, over a few shared prefixes (so prefix caches hit)."""
    client = openai_client(api)
    prefixes = [synthesize_text(96, seed) for seed in range(4)]
    queue = list(range(first, first + count))

    async def one(i: int) -> None:
        prompt = prefixes[i % len(prefixes)] + " " + synthesize_text(8, 1000 + i)
        extra = {"ignore_eos": True}
        if i % 2:
            stream = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=8, stream=True, extra_body=extra
            )
            async for _ in stream:
                pass
        else:
            await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, extra_body=extra)

    async def worker() -> None:
        while queue:
            await one(queue.pop(0))
            await asyncio.sleep(0.05)  # spread the load over several scrapes

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def failing_requests(http: httpx.AsyncClient, api: str, count: int) -> None:
    for _ in range(count):
        response = await http.post(f"{api}/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
        assert response.status_code >= 500


# ------------------------------------------------------------------------------------------------ tests
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_alert_expressions_on_synthetic_series(tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert expression (and recording rule) returns exactly the series
    it should on a made-up history, so the alerts that cannot be provoked live are checked too."""
    r1 = 'instance="10.0.0.1:8080", job="fleetroute"'
    r2 = 'instance="10.0.0.2:8080", job="fleetroute"'
    a1 = f'{r1}, replica="http://10.0.1.1:8000"'
    a2 = f'{r2}, replica="http://10.0.1.2:8000"'
    series = {
        # Router 1: its only replica turns unhealthy at minute 2; half of its requests fail with 503 and
        # half of the rest wait more than 2 s for a first token; its Redis goes down and stale.
        f"fleetroute_replica_healthy{{{a1}}}": "1 1 0x20",
        f'fleetroute_policy_info{{{r1}, policy="default"}}': "1x22",
        f'fleetroute_signal_age_seconds{{{a1}, signal="engine_metrics"}}': "0 0 60+60x20",
        f'fleetroute_requests_total{{{a1}, policy="default", status="200"}}': "0+60x22",
        f'fleetroute_requests_total{{{r1}, replica="none", policy="default", status="503"}}': "0+60x22",
        f'fleetroute_time_to_first_token_seconds_bucket{{{a1}, le="2.0"}}': "0+30x22",
        f"fleetroute_time_to_first_token_seconds_count{{{a1}}}": "0+60x22",
        f"fleetroute_state_store_up{{{r1}}}": "1 1 0x20",
        f"fleetroute_state_store_staleness_seconds{{{r1}}}": "0 0 30x20",
        f"fleetroute_ejections_total{{{a1}}}": "0+2x22",
        # Router 2: a healthy replica whose engine metrics it stopped reading at minute 2.
        f"fleetroute_replica_healthy{{{a2}}}": "1x22",
        f'fleetroute_policy_info{{{r2}, policy="default"}}': "1x22",
        f'fleetroute_signal_age_seconds{{{a2}, signal="engine_metrics"}}': "0 0 60+60x20",
    }
    job = '{job="fleetroute"}'
    expected: dict[str, list[tuple[str, float]]] = {
        "FleetrouteNoHealthyReplica": [(f"{{{r1}}}", 0)],
        "FleetrouteHighErrorRate": [(job, 0.5)],
        "FleetrouteTTFTSLOBurnFast": [(f"fleetroute:ttft_slo_violation:ratio_rate1h{job}", 0.5)],
        "FleetrouteTTFTSLOBurnSlow": [(f"fleetroute:ttft_slo_violation:ratio_rate6h{job}", 0.5)],
        # Router 1's replica is stale too, but unhealthy: only router 2's counts.
        "FleetrouteStaleEngineSignals": [(f'fleetroute_signal_age_seconds{{{a2}, signal="engine_metrics"}}', 1140)],
        "FleetrouteStateStoreDown": [(f"fleetroute_state_store_up{{{r1}}}", 0)],
        "FleetrouteStateStoreStale": [(f"fleetroute_state_store_staleness_seconds{{{r1}}}", 30)],
        "FleetrouteReplicaEjections": [(f"{{{a1}}}", 30)],
    }
    recorded: dict[str, list[tuple[str, float]]] = {
        "fleetroute:requests:rate5m": [(f"fleetroute:requests:rate5m{job}", 2)],
        "fleetroute:ttft_slo_violation:ratio_rate5m": [(f"fleetroute:ttft_slo_violation:ratio_rate5m{job}", 0.5)],
    }
    alerts = {r["alert"]: r["expr"] for r in rules() if "alert" in r}
    assert set(expected) == set(alerts), "every alert needs a case here"
    cases = [(alerts[name], samples) for name, samples in expected.items()]
    cases += [(name, samples) for name, samples in recorded.items()]
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": k, "values": v} for k, v in series.items()],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "20m",
                        "exp_samples": [{"labels": labels, "value": value} for labels, value in samples],
                    }
                    for expr, samples in cases
                ],
            }
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(90)
async def test_every_dashboard_and_rule_query_against_live_prometheus(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as replicas:
        a = await replicas.enter_async_context(live_replica(speed=50.0))
        b = await replicas.enter_async_context(live_replica(speed=50.0))
        engines = [a.url, b.url]
        async with live_router(engines) as router, httpx.AsyncClient(timeout=10) as http:
            config = write_config(
                tmp_path, f"127.0.0.1:{router.service.port}", [u.removeprefix("http://") for u in engines]
            )
            config_check = promtool("check", "config", str(config))
            assert config_check.returncode == 0, config_check.stdout + config_check.stderr

            known = exported_names((await http.get(f"{router.url}/metrics")).text)
            known |= exported_names((await http.get(f"{a.url}/metrics")).text)
            known |= {r["record"] for r in rules() if "record" in r}

            port = free_port()
            with running_prometheus(config, tmp_path, port) as proc:
                url = f"http://127.0.0.1:{port}"
                await wait_ready(http, url, proc, tmp_path / "prometheus.log")
                prom = Prometheus(url, http)

                # Warm-up, so that every series exists before the main load, then the load itself spread
                # over several scrapes: rate() needs two samples of a series that increased between them.
                await generate_load(router.api, 10, first=0)
                total = f'sum(fleetroute_requests_total{{job="{ROUTER_JOB}"}})'
                await prom.wait_for(total, lambda v: v >= 10)
                await generate_load(router.api, 90, first=10)
                await prom.wait_for(total, lambda v: v >= 100)
                await asyncio.sleep(2.5)  # two more scrapes and rule evaluations

                check_names(dashboard_queries() + rule_queries(), known)
                await check_dashboard(prom, engines)
                await check_rules_healthy(http, url)
                await check_rules_quiet(prom)

                # Faults: every replica gone. The no-healthy-replica and error-rate alerts must see it.
                await replicas.aclose()
                await prom.wait_for(
                    f'sum(fleetroute_replica_healthy{{job="{ROUTER_JOB}"}})', lambda v: v == 0, within_s=10
                )
                await failing_requests(http, router.api, 5)
                failed = f'sum(fleetroute_requests_total{{job="{ROUTER_JOB}", status=~"5.."}})'
                await prom.wait_for(failed, lambda v: v >= 5)
                await failing_requests(http, router.api, 25)
                await prom.wait_for(failed, lambda v: v >= 30)
                await asyncio.sleep(1.5)
                await check_fault_alerts(prom)


def check_names(queries: list[Query], known: set[str]) -> None:
    """Every metric a query names is one the router or the engines export (or a recording rule)."""
    unknown: list[str] = []
    for q in queries:
        for name in METRIC_NAME.findall(q.expr):
            if name not in known and name not in STATE_STORE_METRICS:
                unknown.append(f"{q.source}: {name}")
    assert not unknown, "queries name metrics nobody exports:\n" + "\n".join(unknown)


async def check_dashboard(prom: Prometheus, engines: list[str]) -> None:
    selections = {"all": ".*", "multi": grafana_multi_value(engines)}
    empty: list[str] = []
    no_number: list[str] = []
    evaluated = 0
    queries = dashboard_queries()
    assert set(EXPECTED_EMPTY_PANELS) <= {q.panel for q in queries}
    for q in queries:
        for selection, regex in selections.items():
            result = await prom.query(substitute(q.expr, regex))  # asserts that it evaluates
            evaluated += 1
            if q.panel in EXPECTED_EMPTY_PANELS:
                continue
            if not result:
                empty.append(f"{q.source} [{selection}]")
            elif not any(math.isfinite(float(s["value"][1])) for s in result):
                no_number.append(f"{q.source} [{selection}]: {result}")
    assert not empty, "dashboard queries with no data after real traffic:\n" + "\n".join(empty)
    assert not no_number, "dashboard queries with only NaN/Inf:\n" + "\n".join(no_number)
    assert evaluated == 2 * len(queries) > 60


async def check_rules_healthy(http: httpx.AsyncClient, url: str) -> None:
    """Prometheus loaded every rule of the file and evaluates each without error."""
    body = (await http.get(f"{url}/api/v1/rules")).json()
    loaded = [rule for group in body["data"]["groups"] for rule in group["rules"]]
    assert len(loaded) == len(rules())
    bad = [f"{r['name']}: {r.get('lastError')}" for r in loaded if r["health"] != "ok"]
    assert not bad, bad


async def check_rules_quiet(prom: Prometheus) -> None:
    """Recording rules return data; on a healthy fleet no alert expression returns anything."""
    for rule in rules():
        result = await prom.query(rule["expr"])
        if "record" in rule:
            assert result, f"recording rule {rule['record']} has no data"
            recorded = await prom.query(rule["record"])
            assert recorded, f"{rule['record']} was not recorded"
        else:
            assert result == [], f"alert {rule['alert']} fires on a healthy fleet: {result}"


async def check_fault_alerts(prom: Prometheus) -> None:
    by_name = {r["alert"]: r for r in rules() if "alert" in r}
    for name in FAULT_ALERTS:
        result = await prom.query(by_name[name]["expr"])
        assert result, f"alert {name} does not fire with every replica down and requests failing"
        assert all(s["metric"].get("job") == ROUTER_JOB for s in result)
