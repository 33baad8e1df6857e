"""The proxy's upstream HTTP client (router/upstream.py): framing, relay, accounting, pooling and timeouts.

The relay must pass a stream through byte for byte however the replica's bytes are cut into reads, count
every SSE event exactly once (also one split across reads), and keep the client's chunked framing valid.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from router.metrics import FastCounter, FastHistogram
from router.proxy import _forward_head
from router.upstream import Upstream, UpstreamError, UpstreamPool

HEAD_200 = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class FakeTransport:
    """Collects what is written; enough of asyncio.Transport for Upstream and the relay."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


@dataclass
class FakeClient:
    """The client side of a relay: its transport, its protocol's pause flag and its writer's drain."""

    transport: FakeTransport = field(default_factory=FakeTransport)
    writing_paused: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    async def drain(self) -> None:
        await self.drained.wait()


class Tokens:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, n: int) -> None:
        self.count += n


class Itl:
    def __init__(self) -> None:
        self.gaps: list[float] = []

    def observe(self, amount: float) -> None:
        self.gaps.append(amount)


def sse_events(n: int, rng: random.Random) -> list[bytes]:
    events = [b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n']
    for i in range(n):
        text = "x" * rng.choice([1, 5, 40, 3000])  # some events larger than a read
        events.append(b'data: {"choices":[{"delta":{"content":"%d %b"}}]}\n\n' % (i, text.encode()))
    events.append(b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d}}\n\n' % n)
    events.append(b"data: [DONE]\n\n")
    return events


def chunked(pieces: list[bytes], rng: random.Random, trailers: bool) -> bytes:
    """Frame ``pieces`` as chunks; some get an extension, and a piece may be cut across two chunks."""
    out = []
    for piece in pieces:
        cuts = [piece] if rng.random() < 0.7 else [piece[: len(piece) // 2], piece[len(piece) // 2 :]]
        for cut in cuts:
            ext = b";name=value" if rng.random() < 0.1 else b""
            out.append(b"%x%b\r\n%b\r\n" % (len(cut), ext, cut))
    out.append(b"0\r\nX-Trailer: yes\r\n\r\n" if trailers else b"0\r\n\r\n")
    return b"".join(out)


def split(data: bytes, rng: random.Random) -> list[bytes]:
    """Cut ``data`` into reads: mostly chunk-sized, sometimes tiny (one byte), sometimes large."""
    reads, pos = [], 0
    while pos < len(data):
        size = rng.choice([1, 2, 7, 64, 300, 5000])
        reads.append(data[pos : pos + size])
        pos += size
    return reads


def dechunk(wire: bytes) -> bytes:
    """A strict reference parser of a complete chunked body (no extensions or trailers expected)."""
    out, pos = [], 0
    while True:
        eol = wire.index(b"\r\n", pos)
        size = int(wire[pos:eol], 16)
        assert wire[pos:eol] == b"%x" % size, wire[pos:eol]
        if size == 0:
            assert wire[eol:] == b"\r\n\r\n", wire[eol:]
            return b"".join(out)
        out.append(wire[eol + 2 : eol + 2 + size])
        assert wire[eol + 2 + size : eol + 4 + size] == b"\r\n"
        pos = eol + 4 + size


async def begin(
    conn: Upstream, stream: bool, tokens: Tokens | None = None, itl: Itl | None = None
) -> asyncio.Future[None]:
    """Start an exchange on ``conn`` and let it send its request; the future completes when it is ready."""
    ready = asyncio.ensure_future(conn.exchange(b"x", stream, 5.0, 5.0, tokens or Tokens(), itl or Itl()))
    await asyncio.sleep(0)
    return ready


def connection() -> tuple[Upstream, FakeTransport]:
    conn = Upstream(UpstreamPool(1.0), ("test", 0, False))
    up = FakeTransport()
    conn.connection_made(cast(asyncio.Transport, up))
    return conn, up


async def relay_through(reads: list[bytes], relay_from: int) -> tuple[bytes, int, Upstream, FakeClient, Itl]:
    """Feed ``reads`` as one streamed response, starting the relay after ``relay_from`` of them have arrived;
    return the chunked bytes the client got (the first payload framed as the handler does), and the count."""
    conn, _ = connection()
    tokens, itl = Tokens(), Itl()
    ready = await begin(conn, True, tokens, itl)
    fed = 0
    while not ready.done():
        assert fed < len(reads), "the response never became ready"
        conn.data_received(reads[fed])
        fed += 1
        await asyncio.sleep(0)
    await ready
    while fed < relay_from:
        conn.data_received(reads[fed])
        fed += 1
    client = FakeClient()
    first = conn.take()
    assert first
    sent = [b"%x\r\n%b\r\n" % (len(first), first)]
    relay = asyncio.ensure_future(conn.relay(cast(asyncio.Transport, client.transport), client, client, chunked=True))
    await asyncio.sleep(0)
    for read in reads[fed:]:
        conn.data_received(read)
    await relay
    sent += client.transport.written
    if not conn.sent_last_chunk:
        sent.append(b"0\r\n\r\n")  # what the handler's write_eof adds
    return b"".join(sent), tokens.count, conn, client, itl


@pytest.mark.parametrize("seed", range(40))
async def test_any_split_of_a_stream_is_relayed_byte_exact_and_counted_once(seed: int) -> None:
    rng = random.Random(seed)
    events = sse_events(rng.randint(1, 12), rng)
    payload = b"".join(events)
    body = chunked(events, rng, trailers=seed % 5 == 0)
    reads = split(HEAD_200 + body, rng) if seed % 2 else [HEAD_200 + body[:40], *split(body[40:], rng)]
    wire, counted, conn, _, itl = await relay_through(reads, relay_from=rng.randint(0, 3))
    assert dechunk(wire) == payload
    assert counted == payload.count(b"data: {")
    assert conn.complete and conn.status == 200 and conn.content_type == "text/event-stream"
    assert b'"prompt_tokens":12' in conn.tail
    assert all(gap >= 0 for gap in itl.gaps)


async def test_whole_chunk_reads_are_forwarded_as_received() -> None:
    events = [b'data: {"n":%d}\n\n' % i for i in range(4)]
    chunks = [b"%x\r\n%b\r\n" % (len(e), e) for e in events]
    reads = [HEAD_200 + chunks[0], chunks[1], chunks[2] + chunks[3], b"0\r\n\r\n"]
    wire, counted, conn, client, _ = await relay_through(reads, relay_from=0)
    assert client.transport.written == [chunks[1], chunks[2] + chunks[3], b"0\r\n\r\n"]
    assert conn.sent_last_chunk and counted == 4
    assert dechunk(wire) == b"".join(events)


async def test_a_slow_client_pauses_the_replica_until_it_drains() -> None:
    conn, up = connection()
    ready = await begin(conn, True)
    conn.data_received(HEAD_200 + b"5\r\nhello\r\n")
    await ready
    conn.take()
    client = FakeClient(writing_paused=True)
    relay = asyncio.ensure_future(conn.relay(cast(asyncio.Transport, client.transport), client, client, True))
    await asyncio.sleep(0)
    conn.data_received(b"5\r\nworld\r\n")
    assert up.paused
    client.writing_paused = False
    client.drained.set()
    await asyncio.sleep(0.01)
    assert not up.paused
    conn.data_received(b"0\r\n\r\n")
    await relay
    assert client.transport.written == [b"5\r\nworld\r\n", b"0\r\n\r\n"]


async def test_a_client_that_left_gets_no_writes() -> None:
    conn, _ = connection()
    ready = await begin(conn, True)
    conn.data_received(HEAD_200 + b"5\r\nhello\r\n")
    await ready
    client = FakeClient()
    relay = asyncio.ensure_future(conn.relay(cast(asyncio.Transport, client.transport), client, client, True))
    await asyncio.sleep(0)
    client.transport.closed = True
    conn.data_received(b"5\r\nworld\r\n")  # FakeTransport.write asserts it is not closed
    relay.cancel()
    conn.release()
    assert conn.closed


@pytest.mark.parametrize(
    ("response", "body"),
    [
        (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}', b'{"a":1}'),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbusy\r\n0\r\n\r\n", b"busy"),
    ],
)
async def test_whole_responses_in_every_framing(response: bytes, body: bytes) -> None:
    for cut in range(1, len(response)):
        conn, _ = connection()
        ready = await begin(conn, False)
        conn.data_received(response[:cut])
        conn.data_received(response[cut:])
        await ready
        assert conn.complete and conn.take() == body


async def test_a_response_that_ends_with_the_connection() -> None:
    conn, _ = connection()
    ready = await begin(conn, False)
    conn.data_received(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome ")
    conn.data_received(b"text")
    conn.connection_lost(None)
    await ready
    assert conn.take() == b"some text" and conn.content_type == "text/plain"


@pytest.mark.parametrize(
    "response",
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"garbage\r\n\r\n", b"HTTP/1.1 2"],
)
async def test_malformed_or_cut_responses_fail_the_exchange(response: bytes) -> None:
    conn, _ = connection()
    ready = await begin(conn, True)
    conn.data_received(response)
    conn.connection_lost(ConnectionResetError())
    with pytest.raises(UpstreamError):
        await ready


def test_forwarded_headers_drop_hop_by_hop_and_carry_the_request_id() -> None:
    raw = (
        (b"Host", b"router:8080"),
        (b"Connection", b"keep-alive"),
        (b"Expect", b"100-continue"),
        (b"X-Request-Id", b"from-client"),
        (b"Authorization", b"Bearer t"),
        (b"X-Tenant-Id", b"acme"),
        (b"Content-Length", b"9"),
    )
    head = _forward_head(raw, "rid-1", 42)
    assert head == (
        b"Authorization: Bearer t\r\nX-Tenant-Id: acme\r\nContent-Type: application/json\r\n"
        b"X-Request-Id: rid-1\r\nContent-Length: 42\r\n\r\n"
    )
    assert b"Content-Type: application/json" not in _forward_head(((b"content-type", b"text/x"),), "r", 1)


# ------------------------------------------------------------------ over real sockets
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw TCP server on loopback; yields its URL and a list that counts accepted connections."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", accepted
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    return head + await reader.readexactly(length)


async def call(pool: UpstreamPool, url: str, stream: bool = False, first_byte_s: float = 2.0) -> Upstream:
    target = pool.target(url, "/v1/completions")
    body = b'{"prompt":"x"}'
    request = target.prefix + _forward_head((), "rid", len(body)) + body
    return await pool.open(
        target, request, stream=stream, first_byte_s=first_byte_s, inter_chunk_s=0.2, on_tokens=Tokens(), itl=Itl()
    )


async def test_connections_are_reused_and_a_stale_one_is_replaced_transparently() -> None:
    async def keep_alive_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):  # two requests per connection, then the server drops it silently
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with server(keep_alive_then_close) as (url, accepted):
        pool = UpstreamPool(1.0)
        for _ in range(5):
            conn = await call(pool, url)
            assert conn.take() == b"ok"
            conn.release()
            await asyncio.sleep(0.01)
        assert len(accepted) == 3  # 2 + 2 + 1 requests; the dropped connections were not errors
        pool.close()


async def test_first_byte_and_inter_chunk_timeouts() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with server(stall) as (url, _):
        pool = UpstreamPool(1.0)
        with pytest.raises(UpstreamError, match="first_byte_timeout"):
            await call(pool, url, first_byte_s=0.1)

    async def one_chunk_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD_200 + b"8\r\ndata: {\n\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    async with server(one_chunk_then_stall) as (url, _):
        conn = await call(pool, url, stream=True)
        client = FakeClient()
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamError, match="inter_chunk_timeout"):
            await conn.relay(cast(asyncio.Transport, client.transport), client, client, True)
        assert 0.15 < asyncio.get_running_loop().time() - started < 1.0
        conn.release()

    with pytest.raises(UpstreamError, match="connect: "):
        await call(UpstreamPool(1.0), url)  # the server is gone


# ------------------------------------------------------------------ metrics
def test_fast_metrics_export_exactly_what_prometheus_client_would() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0)
    h1 = FastHistogram("x_seconds", "Help.", ["replica"], buckets, registry=ours)
    h2 = Histogram("x_seconds", "Help.", ["replica"], buckets=buckets, registry=theirs)
    c1 = FastCounter("y", "Count.", ["a", "b"], registry=ours)
    c2 = Counter("y", "Count.", ["a", "b"], registry=theirs)
    for value in (0.0005, 0.001, 0.05, 0.5, 1.0, 7.0):
        h1.labels("r1").observe(value)
        h2.labels("r1").observe(value)
    h1.labels("r2").observe(0.01)
    h2.labels("r2").observe(0.01)
    c1.labels("p", "q").inc()
    c1.labels("p", "q").inc(2)
    c2.labels("p", "q").inc()
    c2.labels("p", "q").inc(2)

    def lines(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert lines(ours) == lines(theirs)
    created: Any = [line for line in generate_latest(ours).decode().splitlines() if "_created{" in line]
    assert len(created) == 3


def test_fast_metrics_follow_prometheus_clients_created_switch() -> None:
    registry = CollectorRegistry()
    FastCounter("z", "Count.", ["a"], registry=registry).labels("p").inc()
    prometheus_client.metrics.disable_created_metrics()
    try:
        assert "z_created" not in generate_latest(registry).decode()
    finally:
        prometheus_client.metrics.enable_created_metrics()
    assert "z_created" in generate_latest(registry).decode()
