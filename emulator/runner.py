"""Drives an :class:`EngineCore` in wall-clock time for the live replica.

Each iteration is planned, then the runner sleeps for the step's duration divided by the speed-up
factor, then completes it: a token leaves the server when the step that produced it ends, exactly as
in a real engine. Requests that arrive mid-step join the next plan.

Steps follow a schedule of their own (each starts when the previous one was due to end), not the
event loop's punctuality: when the host CPU falls behind (Python serving many streams on a shared
core), the next steps are not slept for until the schedule is caught up. The engine's timestamps, and so
its metrics, follow the schedule; the lag is counted (``lag_s``) so a too-high ``--speed`` is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from emulator.engine import EngineCore, RequestOutput
from emulator.request import EngineRequest

log = logging.getLogger(__name__)


class RequestStream:
    """The outputs of one request, in order; the HTTP handler consumes them."""

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()


class EngineRunner:
    """Owns the engine's iteration loop and the per-request output streams."""

    def __init__(self, engine: EngineCore, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.engine = engine
        self.speed = speed
        self._streams: dict[str, RequestStream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.healthy = True
        #: Total and worst delay of step completions behind their schedule, in wall seconds.
        self.lag_s = 0.0
        self.max_lag_s = 0.0
        self._last_submit = 0.0

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def submit(self, request: EngineRequest) -> RequestStream:
        """Add a request to the engine; raises ValueError (bad request) before anything is queued."""
        if not self.healthy:
            raise RuntimeError("engine is dead")
        now = self.now()
        self.engine.add_request(request, now)
        self._last_submit = now
        stream = RequestStream(request)
        self._streams[request.request_id] = stream
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (client gone); its KV is released at the latest when the current step ends."""
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort(request_id, self.now())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        due = loop.time()  # when the next step may start, on the engine's own schedule
        try:
            while True:
                # Catch up at most a quarter second, and never start a step before a request that
                # may join it arrived.
                start = max(due, loop.time() - 0.25)
                if engine.num_waiting:
                    start = max(start, self._last_submit)
                step = engine.schedule(start) if engine.has_work() else None
                if step is None:
                    # Idle, or nothing schedulable right now (a policy may defer work): wait for an
                    # arrival, but re-plan soon in case time alone makes work schedulable.
                    self._wake.clear()
                    timeout = None if not engine.has_work() else 0.005
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout)
                    due = loop.time()
                    continue
                end = step.start_time + step.duration_s / self.speed
                delay = end - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                lag = loop.time() - end
                if lag > 0.001:
                    self.lag_s += lag
                    self.max_lag_s = max(self.max_lag_s, lag)
                due = end
                for output in engine.complete_step(step, end):
                    rid = output.request.request_id
                    stream = self._streams.get(rid)
                    if stream is None:
                        continue
                    stream.queue.put_nowait(output)
                    if output.finished:
                        del self._streams[rid]
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug in the engine must not leave clients hanging: fail every open stream.
            log.exception("engine loop crashed; replica marked unhealthy")
            self.healthy = False
            for stream in self._streams.values():
                stream.queue.put_nowait(RequestOutput(stream.request, None, None))
            self._streams.clear()
