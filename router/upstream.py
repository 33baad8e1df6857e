"""The proxy's HTTP/1.1 client to its replicas: keep-alive pools, and stream relay from the protocol callback.

Why not aiohttp's client: per request it builds a ``ClientRequest``, a payload and a ``ClientResponse``, and
per streamed chunk it feeds a ``StreamReader``, wakes the handler task, and the handler re-frames and writes
the chunk; that was most of the router's CPU per request. Here an upstream connection is an
:class:`asyncio.Protocol` that parses the response itself, and once the handler has sent the client its
response headers (:meth:`Upstream.relay`), every upstream read costs one ``data_received`` call: parse the
chunk framing, count SSE events for the lease, observe the inter-chunk gap, refresh the deadline and write
to the client transport. A read that holds whole chunks is written as received (chunked framing and all),
so the stream is passed through byte for byte and unbuffered.

Timeouts are one timer per request: a deadline that reads move forward, checked when the timer fires.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from yarl import URL

__all__ = ["ItlObserver", "Target", "Upstream", "UpstreamError", "UpstreamPool"]

_perf = time.perf_counter
_EVENT = b"data: {"
#: Bytes a proper prefix of ``data: {`` can end with: a read ending in anything else carries no split event.
_EVENT_PREFIX_ENDS = frozenset(b"data: ")
_MAX_HEAD = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})
_TAIL_BYTES = 2048
_RECENT_READS = 64  # reads remembered for the tail before trimming them to _TAIL_BYTES
_KEEPALIVE_S = 15.0  # idle upstream connections older than this are not reused (aiohttp's default)

# Exchange phases.
_IDLE, _HEAD, _BODY, _DONE, _FAILED = range(5)
# Body framings.
_CHUNKED, _LENGTH, _UNTIL_CLOSE = range(3)


class UpstreamError(Exception):
    """An exchange failed; ``reason`` is ``kind`` or ``kind: detail``, and ``kind`` labels the metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Stale(Exception):
    """A reused keep-alive connection closed before any response byte: the replica had dropped it."""


class ItlObserver(Protocol):
    def observe(self, amount: float) -> None: ...


class _Paused(Protocol):
    @property
    def writing_paused(self) -> bool: ...


class _Drainable(Protocol):
    async def drain(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Target:
    """Where one kind of request goes: the pool key and the request line and Host header, pre-encoded."""

    key: tuple[str, int, bool]
    host: str
    port: int
    tls: bool
    prefix: bytes  # b"POST /path HTTP/1.1\r\nHost: host:port\r\n"


class UpstreamPool:
    """Idle keep-alive connections per replica origin (no limit: the engines queue, not the router)."""

    def __init__(self, connect_timeout_s: float, keepalive_s: float = _KEEPALIVE_S) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[str, int, bool], list[Upstream]] = {}
        self._targets: dict[tuple[str, str], Target] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    def target(self, base_url: str, path: str) -> Target:
        """The parsed target of ``base_url + path`` (cached: one parse per replica and path)."""
        target = self._targets.get((base_url, path))
        if target is None:
            url = URL(base_url + path)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"not an http(s) URL: {base_url + path}")
            tls = url.scheme == "https"
            port = url.port or (443 if tls else 80)
            host = url.raw_host or ""
            if ":" in host:
                host = f"[{host}]"  # an IPv6 literal
            host_header = host if url.is_default_port() else f"{host}:{port}"
            prefix = f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {host_header}\r\n".encode("latin-1")
            target = Target((url.raw_host or "", port, tls), url.raw_host or "", port, tls, prefix)
            self._targets[(base_url, path)] = target
        return target

    async def open(
        self,
        target: Target,
        request: bytes,
        *,
        stream: bool,
        first_byte_s: float,
        inter_chunk_s: float,
        on_tokens: Callable[[int], None],
        itl: ItlObserver,
    ) -> Upstream:
        """Send ``request`` (head and body) and wait until the response is ready (see :meth:`Upstream.exchange`).

        A reused connection that turns out closed before any response byte is replaced by a new one once,
        transparently: keep-alive races with the replica's idle timeout are not the replica's failure.
        """
        for reuse in (True, False):
            conn = self._take(target.key) if reuse else None
            if conn is None:
                conn = await self._connect(target)
            try:
                await conn.exchange(request, stream, first_byte_s, inter_chunk_s, on_tokens, itl)
            except _Stale:
                continue
            except BaseException:
                conn.close()
                raise
            return conn
        raise UpstreamError("connect: ServerDisconnected")  # a fresh connection is never stale

    def _take(self, key: tuple[str, int, bool]) -> Upstream | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = _perf() - self._keepalive_s
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > oldest:
                return conn
            conn.close()
        return None

    async def _connect(self, target: Target) -> Upstream:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if target.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Upstream(self, target.key), target.host, target.port, ssl=tls
                )
        except TimeoutError:
            raise UpstreamError("connect: ConnectionTimeoutError") from None
        except OSError as exc:
            raise UpstreamError(f"connect: {type(exc).__name__}") from None
        return conn

    def _put(self, conn: Upstream) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = _perf()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)

    def _discard(self, conn: Upstream) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        """Close every idle connection; connections in use close when their exchange ends."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class Upstream(asyncio.Protocol):
    """One keep-alive connection to a replica, running one exchange (request and response) at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        self._reused = False
        self._reset()

    def _reset(self) -> None:
        self._phase = _IDLE
        self.status = 0
        self.content_type = "application/json"
        self._stream = False
        self._counting = False  # a streamed 200: count SSE events and time the reads
        self._keep_alive = False
        self._got_bytes = False
        self._head = b""
        self._framing = _UNTIL_CLOSE
        self._left = 0  # bytes left of the current chunk (chunked) or of the body (Content-Length)
        self._line = b""  # a chunked framing line split across reads
        self._crlf = False  # expecting the CRLF that ends a chunk's data
        self._trailer = False  # after the last chunk: reading trailer lines up to the empty one
        self._pieces: list[bytes] = []  # payload not yet handed out
        self._first = False  # the first payload of a stream arrived
        self._carry = b""  # the payload's tail when it may be the start of a split "data: {"
        self._recent: list[tuple[bytes, Sequence[tuple[int, int]]]] = []  # the last reads and their payload
        self._fast = False  # relaying a chunked stream to a chunked client, at a chunk boundary
        self._last = 0.0
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._first_byte_s = 0.0
        self._inter_chunk_s = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._on_tokens: Callable[[int], None] | None = None
        self._itl: ItlObserver | None = None
        self._down: asyncio.Transport | None = None
        self._down_protocol: _Paused | None = None
        self._down_writer: _Drainable | None = None
        self._down_chunked = True
        self._drainer: asyncio.Task[None] | None = None
        #: The relay forwarded the upstream's last chunk itself: the client's writer must not add one.
        self.sent_last_chunk = False

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        phase = self._phase
        if phase == _IDLE:
            self._pool._discard(self)
        elif phase == _HEAD:
            if self._reused and not self._got_bytes:
                self._finish(_Stale())
            else:
                self._fail(f"connect: {_lost_name(exc)}")
        elif phase == _BODY:
            if self._framing == _UNTIL_CLOSE and exc is None:
                self._complete()
            else:
                self._fail(f"{'stream' if self._stream else 'read'}: {_lost_name(exc)}")

    def data_received(self, data: bytes) -> None:
        if self._fast:
            # Relaying a chunked stream at a chunk boundary: the read is nearly always exactly one whole chunk
            # (one event), forwarded as received. Anything else takes the general path below. The block below
            # is :meth:`_account` inlined for that one span (a call per chunk is measurable here): change both.
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0:
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = 0
                start = eol + 2
                end = start + size
                if size > 0 and end + 2 == len(data) and data.endswith(b"\r\n"):
                    count = data.count(_EVENT, start, end)
                    if self._carry or data[end - 1] in _EVENT_PREFIX_ENDS:
                        count += self._split_events(data, ((start, end),))
                    if count:
                        self._on_tokens(count)  # type: ignore[misc]  # set while relaying
                    recent = self._recent
                    recent.append((data, ((start, end),)))
                    if len(recent) > _RECENT_READS:
                        self._trim_recent()
                    now = _perf()
                    self._itl.observe(now - self._last)  # type: ignore[union-attr]  # set while relaying
                    self._last = now
                    self._deadline = now + self._inter_chunk_s
                    self._send(data)
                    return
        phase = self._phase
        if phase == _BODY:
            self._body(data, 0)
        elif phase == _HEAD:
            self._parse_head(data)
        elif phase != _FAILED:
            self.close()  # bytes outside an exchange: the connection's framing can no longer be trusted

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost ends the exchange

    # ------------------------------------------------------------------ the exchange, as the handler sees it
    async def exchange(
        self,
        request: bytes,
        stream: bool,
        first_byte_s: float,
        inter_chunk_s: float,
        on_tokens: Callable[[int], None],
        itl: ItlObserver,
    ) -> None:
        """Send ``request``; return once the response is *ready*: for a streamed 200, at its first payload
        bytes; otherwise once the whole body is in. Raises :class:`UpstreamError`."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            raise _Stale() if self._reused else UpstreamError("connect: ServerDisconnected")
        self._phase = _HEAD
        self._stream = stream
        self._first_byte_s = first_byte_s
        self._inter_chunk_s = inter_chunk_s
        self._on_tokens = on_tokens
        self._itl = itl
        now = _perf()
        self._deadline = self._timer_at = now + first_byte_s
        self._timer = self._loop.call_later(first_byte_s, self._on_timer)
        waiter = self._waiter = self._loop.create_future()
        transport.write(request)
        await waiter

    @property
    def complete(self) -> bool:
        """The whole response body has arrived."""
        return self._phase == _DONE

    def take(self) -> bytes:
        """The payload received and not yet handed out (for a non-streamed reply: the whole body)."""
        pieces = self._pieces
        if not pieces:
            return b""
        self._pieces = []
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @property
    def tail(self) -> bytes:
        """The last payload of a streamed 200 (about 2 KiB at least): where its usage event is."""
        self._trim_recent()
        return b"".join([data[a:b] for data, spans in self._recent for a, b in spans])

    async def relay(self, transport: asyncio.Transport, protocol: _Paused, writer: _Drainable, chunked: bool) -> None:
        """Forward the rest of a streamed body to the client's ``transport`` from ``data_received`` (chunked
        framing when ``chunked``); return once the body has ended. Raises :class:`UpstreamError` when the
        stream breaks or stalls for ``inter_chunk_s``."""
        self._down = transport
        self._down_protocol = protocol
        self._down_writer = writer
        self._down_chunked = chunked
        rest = self.take()  # arrived since the handler took the first payload
        if rest:
            self._send(_frame(rest) if chunked else rest)
        if self._phase == _BODY:
            self._fast = self._can_be_fast()
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._fast = False
                self._down = None
                self._down_protocol = None
                self._down_writer = None
        else:
            self._down = None
            self._down_protocol = None
            self._down_writer = None
        if self._phase == _FAILED:
            assert self._error is not None
            raise self._error

    def release(self) -> None:
        """End the exchange: a complete keep-alive response returns the connection to the pool; anything
        else closes it, which tells the replica to abort the request."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._phase == _DONE and self._keep_alive and not self.closed and self._drainer is None:
            self._reset()
            self._reused = True
            self._pool._put(self)
        else:
            self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._phase in (_HEAD, _BODY):
            self._phase = _FAILED
            self._error = UpstreamError("closed")
        self._fast = False
        self._on_tokens = self._itl = None
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ parsing
    def _parse_head(self, data: bytes) -> None:
        self._got_bytes = True
        buf = self._head + data if self._head else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail("connect: BadResponse")
                else:
                    self._head = buf
                return
            try:
                informational = self._read_head(buf[:end])
            except ValueError:
                self._fail("connect: BadResponse")
                return
            buf = buf[end + 4 :]
            if not informational:
                break
        self._head = b""
        self._phase = _BODY
        self._deadline = _perf() + self._first_byte_s
        status = self.status
        self._counting = self._stream and status == 200
        if status in _NO_BODY_STATUSES or (self._framing == _LENGTH and self._left == 0):
            self._complete()
            if buf:
                self._keep_alive = False
        elif buf:
            self._body(buf, 0)

    def _read_head(self, head: bytes) -> bool:
        """Parse a status line and the headers the proxy needs; True for a 1xx response, which precedes the
        real one. Headers are found by name in the lower-cased head rather than split line by line."""
        line_end = head.find(b"\r\n")
        status_line = head if line_end < 0 else head[:line_end]
        version, _, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError("not HTTP/1.x")
        status = int(rest[:3])
        if 100 <= status < 200:
            return True
        self.status = status
        low = head.lower()
        framing, length = _UNTIL_CLOSE, 0
        value = _header(low, b"\r\ntransfer-encoding:")
        if value is not None and value.endswith(b"chunked"):
            framing = _CHUNKED
        else:
            value = _header(low, b"\r\ncontent-length:")
            if value is not None:
                framing, length = _LENGTH, int(value)
                if length < 0:
                    raise ValueError("negative Content-Length")
        at = low.find(b"\r\ncontent-type:")
        if at >= 0:
            at += 15
            stop = head.find(b"\r\n", at)
            self.content_type = head[at : stop if stop >= 0 else len(head)].strip().decode("latin-1")
        keep_alive = version == b"HTTP/1.1"
        value = _header(low, b"\r\nconnection:")
        if value is not None:
            if b"close" in value:
                keep_alive = False
            elif b"keep-alive" in value:
                keep_alive = True
        self._framing = framing
        self._left = length
        self._keep_alive = keep_alive and framing != _UNTIL_CLOSE
        return False

    def _body(self, data: bytes, pos: int) -> None:
        """Body bytes: find the payload in them, then account, time and deliver it."""
        n = len(data)
        ended = False
        term = -1  # data[pos:term] is whole chunks, and the last chunk starts at term if the message ended
        if self._framing == _CHUNKED:
            try:
                spans, term, ended = self._dechunk(data, pos)
            except ValueError:
                self._fail(f"{'stream' if self._stream else 'read'}: BadChunk")
                return
        elif self._framing == _LENGTH:
            take = min(self._left, n - pos)
            self._left -= take
            spans = [(pos, pos + take)] if take else []
            ended = self._left == 0
            if ended and pos + take < n:
                self._keep_alive = False
        else:
            spans = [(pos, n)] if n > pos else []
        if spans and self._counting:
            self._account(data, spans)
        if self._down is not None:
            if term >= 0 and self._down_chunked:
                # Whole chunks: forwarded as received, the last chunk too (without trailers).
                if ended:
                    out = data if n - term == 5 and data.endswith(b"0\r\n\r\n") else data[:term] + b"0\r\n\r\n"
                    self.sent_last_chunk = True
                else:
                    out = data
                self._send(out)
            elif spans:
                payload = data[spans[0][0] : spans[0][1]] if len(spans) == 1 else _join(data, spans)
                self._send(_frame(payload) if self._down_chunked else payload)
        elif spans:
            pieces = self._pieces
            for a, b in spans:
                pieces.append(data if a == 0 and b == n else data[a:b])
            if self._counting and not self._first:
                self._first = True
                self._ready()
        if ended:
            self._complete()
        elif self._down is not None:
            self._fast = self._can_be_fast()

    def _can_be_fast(self) -> bool:
        """Whether the next read may take the fast path of :meth:`data_received`."""
        return (
            self._down_chunked
            and self._counting
            and self._first
            and self._framing == _CHUNKED
            and not (self._left or self._line or self._crlf or self._trailer)
        )

    def _dechunk(self, data: bytes, pos: int) -> tuple[list[tuple[int, int]], int, bool]:
        """Payload spans of ``data[pos:]``, the end of the whole chunks it holds (``len(data)``, or where the
        last chunk starts) or -1 when it does not start and end on chunk boundaries, and whether the message
        ended."""
        n = len(data)
        spans: list[tuple[int, int]] = []
        left = self._left
        clean = not (left or self._line or self._crlf or self._trailer)
        last_chunk = -1
        ended = False
        if clean:
            # Whole chunks, as a stream's reads nearly always are: one find and one int() per chunk. Anything
            # else (a chunk cut by the read, extensions, trailers) is left to the line-by-line walk below.
            append = spans.append
            while pos < n:
                eol = data.find(b"\r\n", pos, pos + 18)
                if eol < 0:
                    break
                try:
                    size = int(data[pos:eol], 16)
                except ValueError:
                    break
                start = eol + 2
                if size <= 0:
                    if size == 0 and data[start : start + 2] == b"\r\n":
                        if start + 2 < n:
                            self._keep_alive = False  # bytes after the response: do not reuse
                        return spans, pos, True
                    break
                end = start + size
                if data[end : end + 2] != b"\r\n":
                    break
                append((start, end))
                pos = end + 2
            else:
                return spans, n, False
        while pos < n:
            if left:
                end = pos + left
                if end > n:
                    spans.append((pos, n))
                    left = end - n
                    break
                spans.append((pos, end))
                pos, left = end, 0
                self._crlf = True
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                self._line += data[pos:]
                break
            start = pos if not self._line else -1
            line = data[pos:eol] if not self._line else self._line + data[pos:eol]
            self._line = b""
            pos = eol + 1
            if self._crlf:
                self._crlf = False
                if line.strip():
                    raise ValueError("chunk data longer than its size")
            elif self._trailer:
                if not line.strip():
                    ended = True
                    if pos < n:
                        self._keep_alive = False  # bytes after the response: do not reuse
                    break
            else:
                size = int(line.split(b";", 1)[0], 16)
                if size < 0:
                    raise ValueError("negative chunk size")
                if size:
                    left = size
                else:
                    self._trailer = True
                    last_chunk = start
        self._left = left
        if not clean:
            return spans, -1, ended
        if ended:
            return spans, last_chunk, ended
        if left or self._line or self._crlf or self._trailer:
            return spans, -1, ended
        return spans, n, ended

    def _account(self, data: bytes, spans: list[tuple[int, int]]) -> None:
        """Count the SSE events (also when one is split across reads), time the read, refresh the deadline."""
        # Framing between spans holds CR and LF, so no event can match across it: one count covers them all.
        count = data.count(_EVENT, spans[0][0], spans[-1][1])
        if self._carry or len(spans) > 1 or data[spans[0][1] - 1] in _EVENT_PREFIX_ENDS:
            count += self._split_events(data, spans)
        if count:
            assert self._on_tokens is not None
            self._on_tokens(count)
        recent = self._recent
        recent.append((data, spans))
        if len(recent) > _RECENT_READS:
            self._trim_recent()
        now = _perf()
        if self._first:
            assert self._itl is not None
            self._itl.observe(now - self._last)
            self._deadline = now + self._inter_chunk_s
        else:
            # From the first payload on, the (usually shorter) inter-chunk timeout applies.
            self._deadline = deadline = now + self._inter_chunk_s
            if deadline < self._timer_at and self._timer is not None:
                self._timer.cancel()
                self._timer = self._loop.call_later(self._inter_chunk_s, self._on_timer)
                self._timer_at = deadline
        self._last = now

    def _split_events(self, data: bytes, spans: Sequence[tuple[int, int]]) -> int:
        """Events cut where a span ends (by a read or a chunk boundary) and completed by the next span."""
        count = 0
        carry = self._carry
        for a, b in spans:
            if carry:
                count += (carry + data[a : a + 6]).count(_EVENT)
                carry = _event_prefix(carry + data[a:b])
            elif data[b - 1] in _EVENT_PREFIX_ENDS:
                carry = _event_prefix(data[max(a, b - 6) : b])
        self._carry = carry
        return count

    def _trim_recent(self) -> None:
        """Keep the fewest last reads that hold at least ``_TAIL_BYTES``: enough for the usage event."""
        recent = self._recent
        total = 0
        for i in range(len(recent) - 1, -1, -1):
            total += len(recent[i][0])
            if total >= _TAIL_BYTES:
                del recent[:i]
                return

    # ------------------------------------------------------------------ delivery and endings
    def _send(self, out: bytes) -> None:
        down = self._down
        assert down is not None
        if down.is_closing():
            # The client left; its handler is being cancelled and will close this connection.
            return
        down.write(out)
        protocol = self._down_protocol
        if protocol is not None and protocol.writing_paused and self._drainer is None and self.transport is not None:
            # The client reads slower than the replica writes: stop reading until its buffer drains.
            self.transport.pause_reading()
            self._drainer = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        writer = self._down_writer
        try:
            if writer is not None:
                await writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self._drainer = None
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def _on_timer(self) -> None:
        self._timer = None
        left = self._deadline - _perf()
        if left > 0.0005:
            self._timer = self._loop.call_later(left, self._on_timer)
            self._timer_at = self._deadline
            return
        if self._phase == _HEAD:
            reason = "first_byte_timeout"
        elif not self._stream or self.status != 200:
            reason = "read: TimeoutError"
        elif not self._first:
            reason = "first_token_timeout"
        else:
            reason = "inter_chunk_timeout"
        self._fail(reason)

    def _ready(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _complete(self) -> None:
        self._phase = _DONE
        self._fast = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ready()

    def _fail(self, reason: str) -> None:
        self._finish(UpstreamError(reason))

    def _finish(self, error: BaseException) -> None:
        if self._phase in (_DONE, _FAILED):
            return
        self._phase = _FAILED
        self._error = error
        self._fast = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(error)


def _header(low: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (given as ``b"\\r\\nname:"``) in the lower-cased head ``low``, stripped."""
    at = low.find(name)
    if at < 0:
        return None
    at += len(name)
    stop = low.find(b"\r\n", at)
    return low[at : stop if stop >= 0 else len(low)].strip()


def _lost_name(exc: BaseException | None) -> str:
    return "ServerDisconnected" if exc is None else type(exc).__name__


def _join(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    return b"".join([data[a:b] for a, b in spans])


def _frame(payload: bytes) -> bytes:
    """``payload`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def _event_prefix(tail: bytes) -> bytes:
    """The longest suffix of ``tail`` that is a proper prefix of ``data: {`` (an event split across reads)."""
    for k in range(min(len(tail), len(_EVENT) - 1), 0, -1):
        if tail.endswith(_EVENT[:k]):
            return tail[-k:]
    return b""
