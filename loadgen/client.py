"""One streamed request over a shared aiohttp session, timed into a :class:`RequestRecord`.

Every failure (connection refused, HTTP error status, an error object mid-stream, a stream cut before
``[DONE]``, a read timeout) ends up in ``record.error``; nothing is raised, so one bad request never stops
an open-loop run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping

import aiohttp

from loadgen.records import RequestRecord
from loadgen.sse import StreamState, error_message

__all__ = ["send_request"]

_MAX_ERROR_CHARS = 500


async def _http_error(response: aiohttp.ClientResponse) -> str:
    try:
        raw = await response.content.read(64 * 1024)
        try:
            detail = error_message(json.loads(raw))
        except ValueError:
            detail = raw.decode("utf-8", "replace").strip()
    except (aiohttp.ClientError, TimeoutError):
        detail = ""
    return f"HTTP {response.status}: {detail or response.reason}"[:_MAX_ERROR_CHARS]


async def _read_events(response: aiohttp.ClientResponse, state: StreamState) -> None:
    """Feed every ``data:`` line to ``state``; each network read is timed once, before it is parsed."""
    clock = time.perf_counter
    pending = b""
    async for data in response.content.iter_any():
        now = clock()
        lines = (pending + data).split(b"\n") if pending else data.split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                state.feed(line[5:].strip(), now)
                if state.finished:
                    return
    if pending.startswith(b"data:"):
        state.feed(pending[5:].strip(), clock())


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    record: RequestRecord,
    origin: float,
    want_text: bool = False,
) -> str:
    """POST ``body`` to ``url`` and fill ``record`` (start, TTFT, ITLs, E2E, tokens, error). ``origin`` is the
    run's ``perf_counter`` zero. Returns the reply text when ``want_text`` (else an empty string)."""
    start = time.perf_counter()
    record.start = start - origin
    state = StreamState(start, want_text)
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                record.error = await _http_error(response)
            else:
                await _read_events(response, state)
                if state.error is None and not state.done:
                    state.error = "stream ended without [DONE]"
                record.error = state.error
    except asyncio.CancelledError:
        record.error = "cancelled"
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        detail = str(exc) or "no detail"
        kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        record.error = f"{kind}: {detail}"[:_MAX_ERROR_CHARS]
    except Exception as exc:  # a run records failures, it never dies of one
        record.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
    finally:
        record.e2e = time.perf_counter() - start
        record.ttft = state.ttft
        record.itls = state.itls
        record.output_len = state.output_tokens if state.output_tokens is not None else state.chunks
        record.prompt_tokens = state.prompt_tokens
        record.cached_tokens = state.cached_tokens
    return "".join(state.texts)
