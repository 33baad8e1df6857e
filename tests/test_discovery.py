"""Replica discovery: the static list and its parser, DNS polling, and the Kubernetes EndpointSlice watcher.

The Kubernetes tests replay API responses in the exact shape kube-apiserver sends (tests/data/k8s) from
a small fake API server over real loopback HTTP, since there is no cluster on the test machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from router.discovery.base import Discovery, ReplicaSpec
from router.discovery.dns import DnsDiscovery, system_resolver
from router.discovery.kubernetes import Backoff, KubernetesDiscovery, replicas_from_slices
from router.discovery.static import StaticDiscovery, parse_replica_arg, replica_url

K8S_DATA = Path(__file__).parent / "data" / "k8s"
NAMESPACE = "llm"
SERVICE = "vllm-llama3"
SLICES_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"
INITIAL = ["http://10.244.1.17:8000", "http://10.244.2.23:8000", "http://10.244.4.12:8000"]


# ---------------------------------------------------------------------------------------------- helpers
class Updates:
    """An ``on_update`` callback that records every announced set."""

    def __init__(self) -> None:
        self.all: list[list[ReplicaSpec]] = []
        self._queue: asyncio.Queue[list[ReplicaSpec]] = asyncio.Queue()

    def __call__(self, specs: list[ReplicaSpec]) -> None:
        self.all.append(specs)
        self._queue.put_nowait(specs)

    async def next(self, wait_s: float = 3.0) -> list[str]:
        return [s.url for s in await asyncio.wait_for(self._queue.get(), wait_s)]

    @property
    def urls(self) -> list[list[str]]:
        return [[s.url for s in specs] for specs in self.all]


@contextlib.asynccontextmanager
async def running(discovery: Discovery, updates: Updates) -> AsyncIterator[asyncio.Task[None]]:
    """Run discovery in a task; on exit cancel it and check that it ended by cancellation, not by a crash."""
    task = asyncio.create_task(discovery.run(updates))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()


async def until(predicate: Any, wait_s: float = 3.0) -> None:
    deadline = time.monotonic() + wait_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------------------------- static
async def test_static_announces_once_and_runs_until_cancelled() -> None:
    specs = [parse_replica_arg("http://10.0.0.2:8000"), parse_replica_arg("http://10.0.0.1:8000,kind=sglang")]
    updates = Updates()
    async with running(StaticDiscovery(specs), updates) as task:
        assert await updates.next() == ["http://10.0.0.2:8000", "http://10.0.0.1:8000"]
        await asyncio.sleep(0.05)
        assert not task.done()
    assert len(updates.all) == 1
    assert updates.all[0][1] == ReplicaSpec("http://10.0.0.1:8000", "sglang", "default")


def test_static_rejects_a_replica_listed_twice() -> None:
    with pytest.raises(ValueError, match=r"more than once: http://h:1"):
        StaticDiscovery([parse_replica_arg("http://h:1"), parse_replica_arg("http://H:1/")])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://10.0.0.7:8000", ReplicaSpec("http://10.0.0.7:8000", "emulator")),
        ("http://10.0.0.7:8000/", ReplicaSpec("http://10.0.0.7:8000", "emulator")),
        ("  HTTPS://Vllm-0.vllm.llm.svc:8443//  ", ReplicaSpec("https://vllm-0.vllm.llm.svc:8443", "emulator")),
        ("http://[FD00::0007]:8000", ReplicaSpec("http://[fd00::7]:8000", "emulator")),
        ("http://gateway:80/replica-3/", ReplicaSpec("http://gateway:80/replica-3", "emulator")),
        ("http://replica.example", ReplicaSpec("http://replica.example", "emulator")),
        ("http://10.0.0.7:8000,kind=sglang,group=prefill", ReplicaSpec("http://10.0.0.7:8000", "sglang", "prefill")),
        ("http://10.0.0.7:8000, group = decode ", ReplicaSpec("http://10.0.0.7:8000", "emulator", "decode")),
    ],
)
def test_parse_replica_arg(text: str, expected: ReplicaSpec) -> None:
    assert parse_replica_arg(text, default_kind="emulator") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.7:8000", r"expected http://HOST\[:PORT\]"),
        ("ftp://h:21", r"expected http://HOST\[:PORT\]"),
        ("http://:8000", "missing host"),
        ("http://h:", "empty port"),
        ("http://h:0", "port 0"),
        ("http://h:70000", "out of range"),
        ("http://h:eighty", "Port could not be cast"),
        ("http://999.1.1.1:80", "not a valid host name or IPv4 address"),
        ("http://bad_host name:80", "not a valid host name"),
        ("http://[fd00::zz]:80", "IPv6|IPv4"),
        ("http://user:secret@h:80", "credentials"),
        ("http://h:80/?x=1", "query or fragment"),
        ("http://h:80,kind=tgi", "unknown replica kind 'tgi': expected one of vllm, sglang, emulator"),
        ("http://h:80,colour=red", "unknown replica option 'colour'"),
        ("http://h:80,kind", "expected key=value"),
        ("http://h:80,kind=vllm,kind=sglang", "given twice"),
        ("http://h:80,group=", "invalid replica group ''"),
        ("http://h:80,group=-x", "invalid replica group '-x'"),
    ],
)
def test_parse_replica_arg_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_replica_arg(text)


@given(
    host=st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)),
    port=st.integers(1, 65535),
    scheme=st.sampled_from(["http", "https"]),
)
def test_replica_urls_are_canonical(host: str, port: int, scheme: str) -> None:
    """Every discovery mode builds URLs with replica_url; a hand-written flag must parse to the same URL."""
    url = replica_url(scheme, host, port)
    assert parse_replica_arg(url).url == url
    assert parse_replica_arg(url.upper() + "/").url == url


# ---------------------------------------------------------------------------------------------- DNS
class ScriptedResolver:
    """Answers (or raises) from a script, then blocks: the test knows exactly what discovery saw."""

    def __init__(self, script: Sequence[Sequence[str] | OSError]) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, int]] = []
        self.done = asyncio.Event()

    async def __call__(self, hostname: str, port: int) -> Sequence[str]:
        self.calls.append((hostname, port))
        if not self.script:
            self.done.set()
            await asyncio.Event().wait()
        answer = self.script.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer


async def run_dns(script: Sequence[Sequence[str] | OSError], **kwargs: Any) -> tuple[Updates, ScriptedResolver]:
    resolver = ScriptedResolver(script)
    updates = Updates()
    options: dict[str, Any] = {"port": 8000, "interval_s": 0.001} | kwargs
    async with running(DnsDiscovery("vllm.llm.svc.cluster.local", resolver=resolver, **options), updates):
        await asyncio.wait_for(resolver.done.wait(), 3)
    return updates, resolver


async def test_dns_announces_sorted_set_only_on_change_and_keeps_it_on_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router.discovery.dns")
    updates, resolver = await run_dns(
        [
            ["10.0.0.2", "10.0.0.1"],
            ["10.0.0.1", "10.0.0.2", "10.0.0.1"],  # same set, other order: no announcement
            socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
            ["10.0.0.3", "10.0.0.1"],
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),  # NXDOMAIN after having records
            [],  # NODATA
            TimeoutError("resolver timed out"),
            ["10.0.0.3", "fd00::1"],
        ]
    )
    assert resolver.calls[0] == ("vllm.llm.svc.cluster.local", 8000)
    assert updates.urls == [
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
        ["http://10.0.0.1:8000", "http://10.0.0.3:8000"],
        ["http://10.0.0.3:8000", "http://[fd00::1]:8000"],
    ]
    levels = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert [lvl for lvl, _ in levels] == ["WARNING", "ERROR", "ERROR", "WARNING"]
    assert "keeping the last 2 replicas" in levels[0][1]
    assert "no records" in levels[1][1] and "after having 2 replicas; keeping them" in levels[1][1]
    assert any("resolves again" in r.getMessage() for r in caplog.records)


async def test_dns_failure_before_any_answer_announces_nothing(caplog: pytest.LogCaptureFixture) -> None:
    updates, _ = await run_dns([socket.gaierror(socket.EAI_NONAME, "Name or service not known"), []])
    assert updates.all == []
    assert "no replicas yet" in caplog.text


async def test_dns_replica_fields_and_address_family() -> None:
    updates, _ = await run_dns(
        [["10.0.0.1", "fd00::1", "not-an-ip"]],
        port=30000,
        scheme="https",
        kind="sglang",
        group="prefill",
        address_family="ipv6",
    )
    assert updates.all == [[ReplicaSpec("https://[fd00::1]:30000", "sglang", "prefill")]]


async def test_dns_with_the_system_resolver_on_localhost() -> None:
    assert set(await system_resolver("localhost", 8000)) <= {"127.0.0.1", "::1"}
    updates = Updates()
    async with running(DnsDiscovery("localhost", 8000, interval_s=0.05), updates):
        urls = await updates.next()
    assert urls and set(urls) <= {"http://127.0.0.1:8000", "http://[::1]:8000"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hostname": "bad name", "port": 80}, "invalid host name"),
        ({"hostname": "vllm", "port": 0}, "invalid port"),
        ({"hostname": "vllm", "port": 80, "scheme": "grpc"}, "unsupported scheme"),
        ({"hostname": "vllm", "port": 80, "interval_s": 0}, "interval must be positive"),
        ({"hostname": "vllm", "port": 80, "kind": "tgi"}, "unknown replica kind"),
    ],
)
def test_dns_rejects_bad_config(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DnsDiscovery(**kwargs)


# ---------------------------------------------------------------------------------------------- Kubernetes
def load(name: str) -> Any:
    return json.loads((K8S_DATA / name).read_text())


def load_events(name: str) -> list[Event]:
    return [Event(json.loads(line)) for line in (K8S_DATA / name).read_text().splitlines() if line.strip()]


@dataclass
class Event:
    """Stream one watch event (a line of JSON)."""

    obj: dict[str, Any]


@dataclass
class Raw:
    """Stream raw bytes (e.g. half an event, before a drop)."""

    data: bytes


@dataclass
class Sleep:
    seconds: float


@dataclass
class Drop:
    """Abort the TCP connection mid-stream."""


@dataclass
class End:
    """End the watch normally, as the server does after timeoutSeconds."""


@dataclass
class Status:
    """Answer the watch request with an error status instead of a stream (only as the first step)."""

    code: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


Step = Event | Raw | Sleep | Drop | End | Status


@dataclass
class Call:
    watch: bool
    query: dict[str, str]
    auth: str | None
    at: float
    status: int = 200


@dataclass
class FakeApiServer:
    """kube-apiserver's EndpointSlice list and watch, replaying recorded responses.

    ``lists`` are served in turn (the last one repeats); each watch request takes the next script of
    ``watches``, and with none left it stays open until :meth:`drop_open_watches`. Anything a real
    server would reject as a bad request is recorded in ``errors``.
    """

    token: str = "token-a"
    lists: list[Any] = field(default_factory=lambda: [load("list-initial.json")])
    watches: list[list[Step]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    list_count: int = 0
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(SLICES_PATH, self._handle)
        return app

    @property
    def list_calls(self) -> list[Call]:
        return [c for c in self.calls if not c.watch]

    @property
    def watch_calls(self) -> list[Call]:
        return [c for c in self.calls if c.watch and c.status == 200]

    def drop_open_watches(self) -> None:
        self._release.set()
        self._release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        watch = query.get("watch") in ("1", "true")
        call = Call(watch, query, request.headers.get("Authorization"), time.monotonic())
        self.calls.append(call)
        if query.get("labelSelector") != f"kubernetes.io/service-name={SERVICE}":
            self.errors.append(f"bad labelSelector {query.get('labelSelector')!r}")
        if watch and (not query.get("resourceVersion") or query.get("allowWatchBookmarks") != "true"):
            self.errors.append(f"bad watch query {query}")
        if not watch and set(query) - {"labelSelector", "limit", "resourceVersion"}:
            self.errors.append(f"unexpected list query {query}")
        if call.auth != f"Bearer {self.token}":
            call.status = 401
            return web.json_response(load("status-401-unauthorized.json"), status=401)
        if not watch:
            self.list_count += 1
            return web.json_response(self.lists[min(self.list_count, len(self.lists)) - 1])
        script = self.watches.pop(0) if self.watches else []
        if script and isinstance(script[0], Status):
            call.status = script[0].code
            return web.json_response(script[0].body, status=script[0].code, headers=script[0].headers)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for step in script:
            if isinstance(step, Event):
                await resp.write(json.dumps(step.obj, separators=(",", ":")).encode() + b"\n")
            elif isinstance(step, Raw):
                await resp.write(step.data)
            elif isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, Drop):
                await asyncio.sleep(0.01)  # let the written bytes leave first
                assert request.transport is not None
                request.transport.abort()
                return resp
            elif isinstance(step, End):
                await resp.write_eof()
                return resp
        await self._release.wait()
        assert request.transport is not None
        request.transport.abort()
        return resp


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApiServer, str]]:
    fake = FakeApiServer()
    runner = web.AppRunner(fake.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        fake.drop_open_watches()
        await runner.cleanup()
    assert fake.errors == []


async def write(path: Path, text: str) -> None:
    """Replace a file the way the kubelet updates a projected volume: at once, never half-written."""
    tmp = path.with_suffix(".tmp")
    await asyncio.to_thread(tmp.write_text, text)
    await asyncio.to_thread(tmp.replace, path)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("token-a\n")
    return path


def k8s(api_server: str, token_file: Path, **kwargs: Any) -> KubernetesDiscovery:
    options: dict[str, Any] = {"backoff_initial_s": 0.02, "backoff_max_s": 0.2} | kwargs
    return KubernetesDiscovery(
        SERVICE, NAMESPACE, api_server=api_server, token_path=str(token_file), ca_path="/nonexistent", **options
    )


async def test_k8s_lists_then_watches_from_the_list_version(api: tuple[FakeApiServer, str], token_file: Path) -> None:
    fake, url = api
    updates = Updates()
    async with running(k8s(url, token_file, watch_timeout_s=120), updates):
        assert await updates.next() == INITIAL
        await until(lambda: len(fake.calls) == 2)
    listed, watched = fake.calls
    assert not listed.watch and listed.auth == "Bearer token-a"
    assert listed.query == {"labelSelector": "kubernetes.io/service-name=vllm-llama3"}
    assert watched.watch and watched.auth == "Bearer token-a"
    assert watched.query == {
        "labelSelector": "kubernetes.io/service-name=vllm-llama3",
        "watch": "1",
        "resourceVersion": "1843527",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "120",
    }
    assert updates.all[0][0] == ReplicaSpec("http://10.244.1.17:8000", "vllm", "default")


async def test_k8s_endpoint_turning_ready_is_added(api: tuple[FakeApiServer, str], token_file: Path) -> None:
    fake, url = api
    # A new pod joins slice B not ready (no change), then passes its readiness probe.
    fake.watches = [[Sleep(0.02), *load_events("watch-scale-up.jsonl")]]
    updates = Updates()
    async with running(k8s(url, token_file), updates):
        assert await updates.next() == INITIAL
        assert await updates.next() == [*INITIAL, "http://10.244.4.19:8000"]
    assert len(updates.all) == 2  # the not-ready intermediate state announced nothing


@pytest.mark.parametrize("events", ["watch-not-ready.jsonl", "watch-terminating.jsonl"])
async def test_k8s_endpoint_not_ready_or_terminating_is_removed(
    api: tuple[FakeApiServer, str], token_file: Path, events: str
) -> None:
    fake, url = api
    fake.watches = [[Sleep(0.02), *load_events(events)]]
    updates = Updates()
    async with running(k8s(url, token_file), updates):
        assert await updates.next() == INITIAL
        assert await updates.next() == ["http://10.244.1.17:8000", "http://10.244.4.12:8000"]


async def test_k8s_deleted_slice_is_removed(api: tuple[FakeApiServer, str], token_file: Path) -> None:
    fake, url = api
    fake.watches = [[Sleep(0.02), *load_events("watch-slice-deleted.jsonl")]]
    updates = Updates()
    async with running(k8s(url, token_file), updates):
        assert await updates.next() == INITIAL
        assert await updates.next() == ["http://10.244.1.17:8000", "http://10.244.2.23:8000"]


@pytest.mark.parametrize("how", ["http-410", "error-event"])
async def test_k8s_expired_version_relists(api: tuple[FakeApiServer, str], token_file: Path, how: str) -> None:
    fake, url = api
    fake.lists.append(load("list-after-expiry.json"))
    gone: list[Step] = (
        [Status(410, load("status-410-gone.json"))]
        if how == "http-410"
        else [Sleep(0.02), *load_events("watch-expired.jsonl")]
    )
    fake.watches = [gone]
    updates = Updates()
    async with running(k8s(url, token_file), updates):
        assert await updates.next() == INITIAL
        expected = ["http://10.244.1.17:8000", "http://10.244.3.9:8000", "http://10.244.4.12:8000"]
        assert await updates.next() == [*expected, "http://10.244.4.19:8000"]
        await until(lambda: any(c.query.get("resourceVersion") == "1845302" for c in fake.watch_calls))
    assert len(fake.list_calls) == 2


async def test_k8s_watch_ended_by_the_server_resumes_without_relisting(
    api: tuple[FakeApiServer, str], token_file: Path
) -> None:
    fake, url = api
    bookmark = {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": "1843800"},
    }
    fake.watches = [
        [*load_events("watch-slice-deleted.jsonl"), End()],
        [Event({"type": "BOOKMARK", "object": bookmark}), End()],
    ]
    updates = Updates()
    async with running(k8s(url, token_file), updates):
        await until(lambda: len(fake.watch_calls) == 3)
    assert [c.query["resourceVersion"] for c in fake.watch_calls] == ["1843527", "1843720", "1843800"]
    assert len(fake.list_calls) == 1
    assert len(updates.all) == 2


async def test_k8s_dropped_connection_backs_off_and_relists(
    api: tuple[FakeApiServer, str], token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = api
    fake.watches = [[Sleep(0.01), Raw(b'{"type":"MODIFIED","object":{"kind":"EndpointSl'), Drop()], [Drop()], [Drop()]]
    updates = Updates()
    discovery = k8s(url, token_file, backoff_initial_s=0.1, backoff_max_s=1.0)
    async with running(discovery, updates):
        assert await updates.next() == INITIAL
        await until(lambda: len(fake.list_calls) == 4)
    lists = [c.at for c in fake.list_calls]
    watches = [c.at for c in fake.watch_calls]
    # The n-th consecutive failure waits between 0.05·2ⁿ and 0.1·2ⁿ seconds before re-listing.
    gaps = [lists[i + 1] - watches[i] for i in range(3)]
    for n, gap in enumerate(gaps):
        assert 0.05 * 2**n * 0.9 <= gap, gaps
    assert gaps[0] < gaps[2], gaps
    assert updates.urls == [INITIAL]  # same set after every re-list, never an empty one
    assert "ClientPayloadError" in caplog.text and "keeping the last 3 replicas" in caplog.text


def test_backoff_is_exponential_jittered_and_capped() -> None:
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next() for _ in range(6)]
    for n, delay in enumerate(delays):
        ceiling = min(8.0, 2.0**n)
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next() <= 1.0


async def test_k8s_rotated_token_is_read_again(api: tuple[FakeApiServer, str], token_file: Path) -> None:
    fake, url = api
    updates = Updates()
    async with running(k8s(url, token_file, token_refresh_s=0.05), updates):
        assert await updates.next() == INITIAL
        await until(lambda: len(fake.watch_calls) == 1)
        await write(token_file, "token-b\n")
        fake.token = "token-b"
        await asyncio.sleep(0.06)
        fake.drop_open_watches()
        await until(lambda: len(fake.watch_calls) == 2)
    assert [c.auth for c in fake.calls] == ["Bearer token-a", "Bearer token-a", "Bearer token-b", "Bearer token-b"]
    assert updates.urls == [INITIAL]


async def test_k8s_token_rejected_mid_life_is_read_again_at_once(
    api: tuple[FakeApiServer, str], token_file: Path
) -> None:
    fake, url = api
    updates = Updates()
    async with running(k8s(url, token_file, token_refresh_s=3600), updates):
        assert await updates.next() == INITIAL
        await until(lambda: len(fake.watch_calls) == 1)
        await write(token_file, "token-b\n")
        fake.token = "token-b"
        fake.drop_open_watches()
        await until(lambda: len(fake.watch_calls) == 2)
    # The cached token is rejected once; the 401 makes discovery read the file again before retrying.
    assert [(c.auth, c.status) for c in fake.list_calls] == [
        ("Bearer token-a", 200),
        ("Bearer token-a", 401),
        ("Bearer token-b", 200),
    ]
    assert updates.urls == [INITIAL]


@pytest.mark.parametrize("token", ["wrong-token", None])
async def test_k8s_rejected_token_retries_without_announcing(
    api: tuple[FakeApiServer, str], token_file: Path, token: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = api
    if token is None:
        await asyncio.to_thread(token_file.unlink)
    else:
        await write(token_file, token)
    updates = Updates()
    async with running(k8s(url, token_file, token_refresh_s=3600), updates):
        await until(lambda: len(fake.calls) >= 3)
        assert updates.all == []
        assert all(c.status == 401 for c in fake.calls)
        assert fake.calls[0].auth == (None if token is None else "Bearer wrong-token")
        await write(token_file, "token-a")  # the kubelet mounts the right token
        assert await updates.next() == INITIAL
    assert "HTTP 401: Unauthorized (token rejected; re-reading" in caplog.text
    if token is None:
        assert "cannot read the service-account token" in caplog.text


async def test_k8s_forbidden_names_the_missing_rbac(
    api: tuple[FakeApiServer, str], token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = api
    fake.watches = [[Status(403, load("status-403-forbidden.json"))]]
    updates = Updates()
    async with running(k8s(url, token_file), updates):
        assert await updates.next() == INITIAL
        await until(lambda: len(fake.list_calls) == 2)
    assert "get/list/watch on endpointslices.discovery.k8s.io" in caplog.text
    assert updates.urls == [INITIAL]


async def test_k8s_throttled_waits_at_least_retry_after(api: tuple[FakeApiServer, str], token_file: Path) -> None:
    fake, url = api
    message = "Too many requests, please try again later."
    throttled = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": 429}
    fake.watches = [[Status(429, throttled, {"Retry-After": "1"})]]
    updates = Updates()
    async with running(k8s(url, token_file), updates):
        await until(lambda: len(fake.list_calls) == 2, wait_s=3)
    assert fake.list_calls[1].at - fake.calls[1].at >= 0.95
    assert updates.urls == [INITIAL]


@pytest.mark.parametrize(
    ("port_name", "expected"),
    [
        (None, INITIAL),
        ("http", INITIAL),
        ("kv-events", [u.replace(":8000", ":5557") for u in INITIAL]),
        ("grpc", []),
    ],
)
def test_k8s_port_is_chosen_by_name(
    port_name: str | None, expected: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    specs = replicas_from_slices(load("list-initial.json")["items"], port_name=port_name)
    assert [s.url for s in specs] == expected
    if port_name == "grpc":
        assert "has no port named 'grpc' (ports: ['http', 'kv-events'])" in caplog.text


def test_k8s_dual_stack_pod_counts_once() -> None:
    specs = replicas_from_slices(load("list-dual-stack.json")["items"], kind="sglang", group="decode")
    assert specs == [
        ReplicaSpec("http://10.244.1.17:8000", "sglang", "decode"),
        ReplicaSpec("http://10.244.2.23:8000", "sglang", "decode"),
    ]
    ipv6_only = [s for s in load("list-dual-stack.json")["items"] if s["addressType"] == "IPv6"]
    assert [s.url for s in replicas_from_slices(ipv6_only, scheme="https")] == [
        "https://[fd00:10:244:1::11]:8000",
        "https://[fd00:10:244:2::17]:8000",
    ]


def endpoint_slice(endpoints: Iterable[dict[str, Any]], address_type: str = "IPv4", **extra: Any) -> dict[str, Any]:
    ports = [{"port": 8000}]  # a Service with one unnamed port: no name, protocol defaults to TCP
    return {
        "metadata": {"name": "s"},
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": ports,
    } | extra


def test_k8s_conditions_follow_the_api_defaults() -> None:
    slices = [
        endpoint_slice(
            [
                {"addresses": ["10.0.0.1"]},  # no conditions: ready, not terminating
                {"addresses": ["10.0.0.2"], "conditions": {"serving": True}},  # ready unknown: ready
                {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": True, "terminating": True}},  # publishNotReady
                {"addresses": ["10.0.0.5", "10.0.0.6"]},  # only the first address has a meaning
                {"addresses": []},
            ]
        ),
        endpoint_slice([{"addresses": ["10.0.0.1"]}]),  # the same endpoint in two slices, mid-update
        endpoint_slice([{"addresses": ["replica-7.example.com"]}], address_type="FQDN"),
        endpoint_slice([{"addresses": ["10.0.0.9"]}], ports=[{"port": 53, "protocol": "UDP"}]),
        endpoint_slice([{"addresses": ["10.0.0.10"]}], ports=None),
    ]
    assert [s.url for s in replicas_from_slices(slices)] == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
        "http://10.0.0.5:8000",
        "http://replica-7.example.com:8000",
    ]


@pytest.mark.parametrize("mode", ["static", "dns", "k8s"])
async def test_cancel_is_clean(api: tuple[FakeApiServer, str], token_file: Path, mode: str) -> None:
    """Cancelled mid-wait (the k8s one with its watch open), nothing is left behind: no task, no open session."""
    fake, url = api
    problems: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: problems.append(context))
    before = asyncio.all_tasks()
    discovery: Discovery
    if mode == "static":
        discovery = StaticDiscovery([parse_replica_arg(INITIAL[0])])
    elif mode == "dns":
        discovery = DnsDiscovery("vllm", 8000, resolver=ScriptedResolver([["10.244.1.17"]]))
    else:
        discovery = k8s(url, token_file)
    updates = Updates()
    async with running(discovery, updates):
        await updates.next()
        await until(lambda: mode != "k8s" or len(fake.watch_calls) == 1)
    await asyncio.sleep(0.01)
    gc.collect()
    loop.set_exception_handler(None)
    assert [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()] == []
    assert problems == []


def test_k8s_in_cluster_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "namespace").write_text("llm-prod\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:10:96::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    d = KubernetesDiscovery(SERVICE, namespace_path=str(tmp_path / "namespace"))
    assert d.api_server == "https://[fd00:10:96::1]:443"
    assert d.namespace == "llm-prod"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    d = KubernetesDiscovery(SERVICE, "other", namespace_path=str(tmp_path / "missing"))
    assert (d.api_server, d.namespace) == ("https://10.96.0.1:443", "other")
    assert KubernetesDiscovery(SERVICE, namespace_path=str(tmp_path / "missing")).namespace == "default"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(RuntimeError, match="KUBERNETES_SERVICE_HOST is not set"):
        KubernetesDiscovery(SERVICE, "llm")
    with pytest.raises(ValueError, match="invalid Service name"):
        KubernetesDiscovery("Vllm_Llama", "llm", api_server="http://127.0.0.1:1")
