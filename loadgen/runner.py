"""The open-loop run: every request is sent when it is due, whatever happened to the earlier ones.

Independent requests (trace rows, first turns) are launched by one dispatcher at their arrival times. A
conversation runs as one task: each follow-up turn waits for the previous reply plus its think time, and
sends that reply back as context. Different conversations stay open-loop with respect to each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loadgen.client import send_request
from loadgen.progress import Progress
from loadgen.prompts import ENDPOINT_PATHS, Conversation, Endpoint, encode_body
from loadgen.records import RequestRecord
from loadgen.report import DEFAULT_PERCENTILES, DEFAULT_SLOS, summarize
from loadgen.traces import TraceRequest

__all__ = ["LoadOptions", "LoadResult", "base_url", "fetch_model", "run_load"]


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How to run a load (times in seconds)."""

    endpoint: Endpoint = "completions"
    #: Model name to send; None asks the server (first id of ``GET /v1/models``).
    model: str | None = None
    #: Send at most the first N requests (in arrival order).
    max_requests: int | None = None
    #: Stop issuing requests this long after the start; requests in flight get ``drain_timeout`` more.
    duration: float | None = None
    drain_timeout: float = 60.0
    #: At most this many requests in flight; later ones wait (their wait is not part of TTFT, as in vLLM).
    max_concurrency: int | None = None
    #: Longest silence on a connection before the request counts as failed.
    request_timeout: float = 600.0
    connect_timeout: float = 10.0
    seed: int = 0
    slos: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SLOS))
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    detailed: bool = False
    progress: bool = False
    api_key: str | None = None
    #: Prefix of the ``X-Request-Id`` headers (a random one by default, so ids are unique across runs).
    request_id_prefix: str | None = None

    def validate(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINT_PATHS)}, got {self.endpoint!r}")
        for name in ("max_requests", "max_concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("duration", "drain_timeout", "request_timeout", "connect_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(slots=True)
class LoadResult:
    """Per-request records (in request order) and their summary (:func:`loadgen.report.summarize`)."""

    records: list[RequestRecord]
    summary: dict[str, Any]
    model: str | None
    wall_time: float


def base_url(url: str) -> str:
    """The server root of ``url``: ``http://host:8000/v1/`` and ``http://host:8000`` both give the latter."""
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


async def fetch_model(session: aiohttp.ClientSession, root: str, wait_s: float = 10.0) -> str | None:
    """The first model id the server lists, or None if it cannot be asked (the run then omits ``model``
    and records whatever the requests run into)."""
    try:
        async with session.get(f"{root}/v1/models", timeout=aiohttp.ClientTimeout(total=wait_s)) as response:
            if response.status != 200:
                return None
            data = await response.json(content_type=None)
        return str(data["data"][0]["id"])
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError):
        return None


class _Run:
    """State of one run: the shared session, the clock, the records."""

    def __init__(self, session: aiohttp.ClientSession, url: str, model: str | None, options: LoadOptions) -> None:
        self.session = session
        self.url = url
        self.model = model
        self.options = options
        self.prefix = options.request_id_prefix or uuid.uuid4().hex[:8]
        self.limit = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else None
        self.records: dict[int, RequestRecord] = {}
        self.progress: Progress | None = None
        self.origin = time.perf_counter()
        self.headers: dict[str, str] = {"Content-Type": "application/json"}
        if options.api_key:
            self.headers["Authorization"] = f"Bearer {options.api_key}"

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def issuing(self, at: float) -> bool:
        """Whether a request due at ``at`` may still be sent (``duration`` not yet over)."""
        return self.options.duration is None or at < self.options.duration

    def _record(self, index: int, request: TraceRequest, due: float) -> RequestRecord:
        record = RequestRecord(
            request_id=f"{self.prefix}-{index}",
            tenant=request.tenant,
            session_id=request.session_id,
            turn=request.turn,
            scheduled=due,
            start=due,
        )
        self.records[index] = record
        return record

    def _finished(self, record: RequestRecord) -> None:
        if self.progress is not None:
            self.progress.finished(record.ok)

    async def _send(
        self, conversation: Conversation, index: int, request: TraceRequest, due: float, want_text: bool
    ) -> RequestRecord:
        record = self._record(index, request, due)
        fields, record.input_len = conversation.prompt(request, index)
        body = encode_body(fields, self.model, request.output_length)
        headers = {**self.headers, "X-Request-Id": record.request_id, "X-Tenant-Id": request.tenant}
        if request.session_id is not None:
            headers["X-Session-Id"] = request.session_id
        try:
            if self.limit is None:
                reply = await send_request(self.session, self.url, body, headers, record, self.origin, want_text)
            else:
                async with self.limit:
                    reply = await send_request(self.session, self.url, body, headers, record, self.origin, want_text)
        except asyncio.CancelledError:
            record.error = record.error or "cancelled before it was sent"
            self._finished(record)
            raise
        if want_text and record.ok:
            conversation.add_reply(reply, record.output_len)
        self._finished(record)
        return record

    async def conversation(self, turns: Sequence[tuple[int, TraceRequest]]) -> None:
        """Send the turns of one session in order (a standalone request is a one-turn session)."""
        conversation = Conversation(self.options.endpoint, self.options.seed)
        due = turns[0][1].arrival
        for position, (index, request) in enumerate(turns):
            if position:
                due = self.now() + request.think_time
                if not self.issuing(due):
                    return
                await asyncio.sleep(request.think_time)
            record = await self._send(conversation, index, request, due, want_text=position < len(turns) - 1)
            if not record.ok:
                self._skip_rest(turns[position + 1 :], record)
                return

    def _skip_rest(self, turns: Sequence[tuple[int, TraceRequest]], failed: RequestRecord) -> None:
        """Later turns of a failed conversation have no context to send: record them as failed, unsent."""
        at = failed.end
        for index, request in turns:
            record = self._record(index, request, at)
            record.error = f"not sent: turn {failed.turn} of session {failed.session_id} failed"
            self._finished(record)

    async def dispatch(self, units: Sequence[list[tuple[int, TraceRequest]]]) -> set[asyncio.Task[None]]:
        """Launch every unit at its first request's arrival; stop when ``duration`` is over."""
        tasks: set[asyncio.Task[None]] = set()
        for unit in units:
            due = unit[0][1].arrival
            if not self.issuing(due):
                break
            delay = due - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.add(asyncio.create_task(self.conversation(unit)))
        return tasks


def _units(requests: Sequence[TraceRequest]) -> list[list[tuple[int, TraceRequest]]]:
    """Requests grouped into independently scheduled units (one per session, one per standalone request),
    ordered by arrival; each request keeps its index in ``requests``."""
    sessions: dict[str, list[tuple[int, TraceRequest]]] = {}
    units: list[list[tuple[int, TraceRequest]]] = []
    for index, request in enumerate(requests):
        if request.session_id is None:
            units.append([(index, request)])
        elif request.session_id in sessions:
            sessions[request.session_id].append((index, request))
        else:
            sessions[request.session_id] = [(index, request)]
            units.append(sessions[request.session_id])
    for unit in units:
        unit.sort(key=lambda item: (item[1].turn, item[1].arrival))
    units.sort(key=lambda unit: unit[0][1].arrival)
    return units


async def run_load(url: str, requests: Sequence[TraceRequest], options: LoadOptions | None = None) -> LoadResult:
    """Replay ``requests`` (due at their ``arrival``, seconds from now) against an OpenAI-compatible server
    at ``url`` and summarise. Request failures are recorded, never raised; only invalid options raise."""
    options = options or LoadOptions()
    options.validate()
    ordered = sorted(requests, key=lambda r: r.arrival)
    if options.max_requests is not None:
        ordered = ordered[: options.max_requests]
    root = base_url(url)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.connect_timeout, sock_read=options.request_timeout)
    # No connection cap unless asked: a capped pool would queue requests and quietly close the loop.
    connector = aiohttp.TCPConnector(limit=options.max_concurrency or 0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = options.model or await fetch_model(session, root, options.connect_timeout)
        run = _Run(session, root + ENDPOINT_PATHS[options.endpoint], model, options)
        progress_task: asyncio.Task[None] | None = None
        if options.progress:
            run.progress = Progress(len(ordered))
            progress_task = asyncio.create_task(run.progress.run())
        try:
            tasks = await run.dispatch(_units(ordered))
            await _drain(tasks, run, options)
        finally:
            if progress_task is not None and run.progress is not None:
                progress_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress_task
                run.progress.close()
        wall = run.now()
    records = [run.records[i] for i in sorted(run.records)]
    summary = summarize(records, options.slos, options.percentiles, options.detailed)
    return LoadResult(records, summary, model, wall)


async def _drain(tasks: set[asyncio.Task[None]], run: _Run, options: LoadOptions) -> None:
    """Wait for the conversations still running; past ``duration + drain_timeout``, cancel them (their
    requests are recorded as cancelled)."""
    if not tasks:
        return
    timeout = None
    if options.duration is not None:
        timeout = max(0.0, options.duration + options.drain_timeout - run.now())
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # request failures are records; anything raised here is a bug and must surface
