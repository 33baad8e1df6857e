"""The event loop of the fleet simulator.

Events are request arrivals (from the trace, or a think time after a session's previous turn), engine
admissions (an arrival plus the profile's frontend overhead) and engine step completions. An engine
whose batch is stable advances by a :class:`~emulator.engine.DecodeSpan` — many decode steps at once,
capped at one scrape interval — instead of step by step; when a request is routed to an engine in the
middle of a span, the span is cut at the step in progress. Everything is deterministic for a seed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from emulator.engine import DecodeSpan, EngineCore, EngineStep, RequestOutput
from emulator.profiles import EngineProfile
from emulator.request import EngineRequest, SamplingParams
from emulator.scheduler import ScheduledStep
from emulator.sim.router_model import ReplicaBook, RouterModel
from emulator.sim.workload import SimRequest, prefix_keys
from loadgen.records import RequestRecord
from loadgen.report import DEFAULT_SLOS, summarize
from loadgen.traces import TraceRequest
from policies.routing import make_routing_policy
from policies.routing.base import RequestFeatures, prefill_work, tpot_sensitivity
from policies.scheduling import make_scheduling_policy

_ARRIVAL, _ADMIT, _ENGINE = 0, 1, 2


@dataclass(frozen=True)
class SimConfig:
    profile: EngineProfile
    replicas: int
    policy: str = "default"
    policy_params: dict[str, Any] = field(default_factory=dict)
    engine_scheduler: str = "fcfs"
    scrape_interval_s: float = 1.0
    prefix_block_tokens: int = 64
    prefix_index_bytes: int = 64 * 1024 * 1024
    seed: int = 0
    slos: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SLOS))
    #: Advance stable decode batches many steps at once (exact up to KV-allocation order; off = step by step).
    decode_spans: bool = True


@dataclass
class SimResult:
    records: list[RequestRecord]
    summary: dict[str, Any]
    replicas: list[dict[str, Any]]
    virtual_time_s: float
    events: int
    #: From the last arrival to the last completion: work the fleet still owed when the load stopped. A
    #: finite trace lets a policy defer work past its end; a long drain at a "passing" load means the fleet
    #: could not have sustained that load.
    drain_s: float = 0.0


class _Observer:
    """Collects what per-request records need: inter-token gaps and first-token times."""

    def __init__(self, sim: FleetSimulator, book_index: int) -> None:
        self._sim = sim
        self._book = book_index

    def on_step(self, step: ScheduledStep, duration_s: float, now: float) -> None:
        pass

    def on_first_token(self, request: EngineRequest, now: float) -> None:
        self._sim._first_token(self._book, request)

    def on_token(self, request: EngineRequest, now: float, since_last_s: float) -> None:
        self._sim._itls[request.request_id].append(since_last_s)
        book = self._sim.books[self._book]
        book.decode_tokens -= 1
        book.kv_tokens += 1

    def on_preempted(self, request: EngineRequest) -> None:
        pass

    def on_finished(self, request: EngineRequest, now: float) -> None:
        pass

    def on_decode_span(self, span: DecodeSpan, steps: int) -> None:
        gaps = span.step_durations_s(0, steps)
        itls = self._sim._itls
        for r in span.requests:
            itls[r.request_id].extend(gaps)
        book = self._sim.books[self._book]
        book.decode_tokens -= steps * span.num_seqs
        book.kv_tokens += steps * span.num_seqs


class FleetSimulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engines: list[EngineCore] = []
        for i in range(config.replicas):
            self.engines.append(
                EngineCore(
                    config.profile,
                    make_scheduling_policy(config.engine_scheduler),
                    token_source=lambda seed, index: 0,
                    eos_token_id=-1,
                    observer=_Observer(self, i),
                    seed=config.seed + i,
                )
            )
        policy = make_routing_policy(config.policy, config.policy_params, seed=config.seed)
        self.router = RouterModel(
            self.engines, policy, config.scrape_interval_s, config.prefix_block_tokens, config.prefix_index_bytes
        )
        self.books: list[ReplicaBook] = self.router.books
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self._itls: dict[str, list[float]] = {}
        self._prefill_owed: dict[str, tuple[int, float]] = {}
        self._requests: dict[str, tuple[SimRequest, int]] = {}
        self._records: list[RequestRecord | None] = []
        self._busy: list[EngineStep | DecodeSpan | _Pending | None] = [None] * config.replicas
        self._busy_time = [0.0] * config.replicas
        self._engine_token = [0] * config.replicas
        self._session_len: dict[str, int] = {}
        self._followups: dict[str, list[TraceRequest]] = {}
        self.now = 0.0
        self.events = 0

    # ------------------------------------------------------------------ public
    def run(self, trace: Sequence[TraceRequest]) -> SimResult:
        first_turns = []
        for r in trace:
            if r.session_id is not None and r.turn > 0:
                self._followups.setdefault(r.session_id, []).append(r)
            else:
                first_turns.append(r)
        for turns in self._followups.values():
            turns.sort(key=lambda r: r.turn)
        for r in first_turns:
            self._push(r.arrival, _ARRIVAL, r)
        self._records = []
        while self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            self.now = t
            self.events += 1
            if kind == _ARRIVAL:
                self._arrive(payload)
            elif kind == _ADMIT:
                self._admit(*payload)
            else:
                index, token = payload
                if token == self._engine_token[index]:
                    self._engine_done(index)
        records = [r for r in self._records if r is not None]
        for record in records:
            if record.error is None and record.ttft is None:
                record.error = "did not complete before the simulation ended"
        summary = summarize(records, self.config.slos)
        last_arrival = max((r.start for r in records), default=0.0)
        return SimResult(
            records, summary, self._replica_stats(), self.now, self.events, drain_s=max(0.0, self.now - last_arrival)
        )

    # ------------------------------------------------------------------ events
    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def _arrive(self, trace: TraceRequest) -> None:
        index = len(self._records)
        history = self._session_len.get(trace.session_id, 0) if trace.session_id is not None else 0
        sim = SimRequest(index, trace, trace.input_length + history, trace.output_length)
        record = RequestRecord(
            request_id=f"sim-{index}",
            tenant=trace.tenant,
            session_id=trace.session_id,
            turn=trace.turn,
            scheduled=self.now,
            start=self.now,
            input_len=sim.prompt_tokens,
        )
        self._records.append(record)
        profile = self.config.profile
        if sim.prompt_tokens + sim.output_tokens > profile.max_model_len:
            record.error = (
                f"prompt of {sim.prompt_tokens} tokens plus {sim.output_tokens} output tokens exceeds "
                f"max_model_len {profile.max_model_len}"
            )
            self._session_next(trace, failed=True)
            return
        bs = profile.block_size
        engine_keys = prefix_keys(trace, index, sim.prompt_tokens, bs, history)
        router_keys = prefix_keys(trace, index, sim.prompt_tokens, self.config.prefix_block_tokens, history)
        features = RequestFeatures(
            request_id=record.request_id,
            prompt_tokens=sim.prompt_tokens,
            max_tokens=sim.output_tokens,
            block_hashes=router_keys,
            block_size=self.config.prefix_block_tokens,
            tenant=trace.tenant,
            session_id=trace.session_id,
        )
        book, decision = self.router.choose(features, router_keys, self.now)
        new_tokens, attention = prefill_work(sim.prompt_tokens, decision.replica.prefix_match_tokens)
        self._prefill_owed[record.request_id] = (new_tokens, attention)
        book.prefill_new_tokens += new_tokens
        book.prefill_attention += attention
        book.inflight_requests += 1
        book.tpot_sensitivity += tpot_sensitivity(sim.output_tokens)
        book.kv_tokens += sim.prompt_tokens
        book.prefill_tokens += sim.prompt_tokens
        book.decode_tokens += sim.output_tokens
        request = EngineRequest(
            request_id=record.request_id,
            num_prompt_tokens=sim.prompt_tokens,
            sampling=SamplingParams(max_tokens=sim.output_tokens, min_tokens=sim.output_tokens, ignore_eos=True),
            arrival_time=self.now,
            block_size=bs,
            prompt_block_hashes=engine_keys,
            tenant=trace.tenant,
            seed=self.config.seed * 1_000_003 + index,
        )
        self._requests[record.request_id] = (sim, book.index)
        self._itls[record.request_id] = []
        self._push(self.now + profile.frontend_overhead_ms / 1000.0, _ADMIT, (book.index, request))

    def _admit(self, index: int, request: EngineRequest) -> None:
        engine = self.engines[index]
        busy = self._busy[index]
        if isinstance(busy, DecodeSpan):
            self._cut_span(index, busy)
        engine.add_request(request, self.now)
        if self._busy[index] is None:
            self._start(index)

    def _cut_span(self, index: int, span: DecodeSpan) -> None:
        """A request arrives mid-span: keep the steps done plus the one in progress; replan after it."""
        done = min(span.steps, span.steps_done_by(self.now) + 1)
        end = span.start_time + span.elapsed_s(done)
        if done < span.steps:
            self._busy_time[index] -= span.end_time - end
            self._finish_span(index, span, done)
            self._busy[index] = _Pending(end)
            self._schedule_engine(index, end)

    def _engine_done(self, index: int) -> None:
        busy = self._busy[index]
        engine = self.engines[index]
        if isinstance(busy, DecodeSpan):
            self._finish_span(index, busy, busy.steps)
        elif isinstance(busy, EngineStep):
            self._handle_outputs(index, engine.complete_step(busy, self.now))
        self._busy[index] = None
        self._start(index)

    def _finish_span(self, index: int, span: DecodeSpan, steps: int) -> None:
        self.books[index].span = None
        self._handle_outputs(index, self.engines[index].commit_decode_span(span, steps))

    def _start(self, index: int) -> None:
        engine = self.engines[index]
        if not engine.has_work():
            return
        span = engine.plan_decode_span(self.now, self._max_span_steps(engine)) if self.config.decode_spans else None
        if span is not None:
            self._busy[index] = span
            self.books[index].span = span
            self._busy_time[index] += span.end_time - self.now
            self._schedule_engine(index, span.end_time)
            return
        step = engine.schedule(self.now)
        if step is None:
            # Work exists but nothing can run now (a policy deferred it): look again shortly.
            self._busy[index] = _Pending(self.now + 0.001)
            self._schedule_engine(index, self.now + 0.001)
            return
        self._busy[index] = step
        self._busy_time[index] += step.duration_s
        self._schedule_engine(index, self.now + step.duration_s)

    def _max_span_steps(self, engine: EngineCore) -> int:
        """Cap a span at about one scrape interval, so scraped signals stay as fresh as live."""
        c = engine.profile.step_time
        floor_ms = max(c.weight_floor_ms, c.linear_base_ms) + c.step_overhead_ms
        return max(2, int(self.config.scrape_interval_s * 1000.0 / max(floor_ms, 0.1)))

    def _schedule_engine(self, index: int, t: float) -> None:
        self._engine_token[index] += 1
        self._push(t, _ENGINE, (index, self._engine_token[index]))

    # ------------------------------------------------------------------ request bookkeeping
    def _first_token(self, index: int, request: EngineRequest) -> None:
        book = self.books[index]
        book.prefill_tokens -= request.num_prompt_tokens
        new_tokens, attention = self._prefill_owed.pop(request.request_id)
        book.prefill_new_tokens -= new_tokens
        book.prefill_attention -= attention
        book.decode_tokens -= 1
        book.kv_tokens += 1

    def _handle_outputs(self, index: int, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.finished:
                self._complete(index, output.request)

    def _complete(self, index: int, request: EngineRequest) -> None:
        sim, _ = self._requests.pop(request.request_id)
        book = self.books[index]
        book.inflight_requests -= 1
        book.tpot_sensitivity -= tpot_sensitivity(request.sampling.max_tokens)
        if book.inflight_requests == 0:
            book.prefill_attention = 0.0  # float sums drift; an idle replica owes nothing
            book.tpot_sensitivity = 0.0
        book.kv_tokens -= request.num_prompt_tokens + request.num_output_tokens
        record = self._records[sim.index]
        assert record is not None
        itls = self._itls.pop(request.request_id)
        first = request.first_token_time if request.first_token_time is not None else self.now
        record.ttft = first - record.start
        record.e2e = (request.finished_time or self.now) - record.start
        record.output_len = request.num_output_tokens
        record.itls = itls
        record.cached_tokens = max(0, request.num_cached_tokens)
        record.prompt_tokens = request.num_prompt_tokens
        trace = sim.trace
        if trace.session_id is not None:
            self._session_len[trace.session_id] = sim.prompt_tokens + request.num_output_tokens
        self._session_next(trace, failed=False, at=request.finished_time or self.now)

    def _session_next(self, trace: TraceRequest, failed: bool, at: float | None = None) -> None:
        if trace.session_id is None:
            return
        pending = self._followups.get(trace.session_id)
        if not pending:
            return
        follow = pending.pop(0)
        if failed:
            # The real client sends nothing after a failed turn; record the rest as failed.
            for r in [follow, *pending]:
                self._records.append(
                    RequestRecord(
                        request_id=f"sim-{len(self._records)}",
                        tenant=r.tenant,
                        session_id=r.session_id,
                        turn=r.turn,
                        scheduled=self.now,
                        start=self.now,
                        error=f"not sent: turn {trace.turn} of session {trace.session_id} failed",
                    )
                )
            pending.clear()
            return
        self._push((self.now if at is None else at) + follow.think_time, _ARRIVAL, follow)

    def _replica_stats(self) -> list[dict[str, Any]]:
        out = []
        total = max(self.now, 1e-9)
        for i, engine in enumerate(self.engines):
            stats = engine.kv.pool.stats
            out.append(
                {
                    "replica": self.books[i].replica_id,
                    "prefix_cache_queries_tokens": stats.prefix_queries_tokens,
                    "prefix_cache_hits_tokens": stats.prefix_hit_tokens,
                    "prefix_cache_hit_rate": stats.prefix_hit_tokens / stats.prefix_queries_tokens
                    if stats.prefix_queries_tokens
                    else 0.0,
                    "preemptions": engine.num_preemptions,
                    "steps": engine.num_steps,
                    "utilisation": min(1.0, self._busy_time[i] / total),
                    "evicted_blocks": stats.evicted_blocks,
                }
            )
        return out


@dataclass(frozen=True, slots=True)
class _Pending:
    """An engine finishing the step that was in progress when its span was cut."""

    until: float
