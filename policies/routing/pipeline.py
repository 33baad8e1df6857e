"""Filter → score → pick: a routing decision assembled from small named plugins, weighted in config.

This is the shape of llm-d's scheduler (llm-d/llm-d-router ``pkg/epp/framework/plugins/scheduling/*``;
reference anchors §3): filters narrow the candidates, each scorer maps every candidate to [0, 1], a picker
chooses from the weighted sum. Small named parts let an operator write a profile in config::

    {"filters": ["healthy_signals"], "scorers": {"prefix": 3, "queue": 2, "kv_usage": 2}, "picker": "max_score"}

and let the anchors' own profiles be rebuilt from the same parts (``llmd_scorer`` is this pipeline with
llm-d's default weights). Plugins see only the snapshot, so the pipeline stays a pure function of it plus
its seeded RNG and the session scorer's bounded memory.

Scraped engine signals can be missing (never scraped). ``missing_signals`` says how scorers read that:
``"saturated"`` (default) scores it as the worst candidate, as llm-d's utilization detector treats stale or
missing metrics as 100 % saturated (anchors §3, llm-d-router issue #2408); ``"idle"`` reads it as zero,
which is what a scorer over zero-initialised metrics sees before the first scrape. Staleness of *present*
values is the ``healthy_signals`` filter's job: llm-d's scorers also use the last value they hold.

The module also holds the parameter checks the other policies share, so every policy rejects a bad setting
with the same kind of message.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import xxhash

from policies.routing.base import Decision, FleetView, ReplicaView, RequestFeatures, RoutingPolicy, require_replicas

MissingSignals = Literal["saturated", "idle"]
_MISSING_MODES: tuple[MissingSignals, ...] = ("saturated", "idle")

# -- shared helpers ------------------------------------------------------------------------------------------


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as an int, or a ValueError naming the parameter (bools are rejected: ``True`` is not 1 here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """``value`` as a finite float within bounds (open bounds exclude the endpoint), or a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (v < minimum or (min_open and v == minimum)):
        raise ValueError(f"{name} must be {'>' if min_open else '>='} {minimum}, got {value!r}")
    if maximum is not None and (v > maximum or (max_open and v == maximum)):
        raise ValueError(f"{name} must be {'<' if max_open else '<='} {maximum}, got {value!r}")
    return v


def check_missing(value: object) -> MissingSignals:
    if value == "saturated":
        return "saturated"
    if value == "idle":
        return "idle"
    raise ValueError(f"missing_signals must be one of {', '.join(_MISSING_MODES)}; got {value!r}")


def stable_hash(text: str) -> int:
    """64-bit hash of ``text`` that is equal in every process (Python's ``hash`` is salted per process), so
    several router replicas map a session or key to the same place."""
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


def prefix_ratio(prompt_tokens: int, match_tokens: int) -> float:
    """Share of the prompt the replica is believed to cache, in [0, 1]; 0 for an empty prompt."""
    if prompt_tokens <= 0 or match_tokens <= 0:
        return 0.0
    return min(1.0, match_tokens / prompt_tokens)


def _lower_is_better(values: Sequence[float | None], missing: MissingSignals) -> list[float]:
    """llm-d's min-max normalisation, ``(max − v) / (max − min)``, all equal → 1. A missing value scores 0 when
    ``missing`` is ``"saturated"`` (worse than the worst known), or counts as 0 when ``"idle"``."""
    if missing == "idle":
        values = [0.0 if v is None else v for v in values]
    known = [v for v in values if v is not None]
    if not known:
        return [1.0] * len(values)
    lo, hi = min(known), max(known)
    span = hi - lo
    if span == 0:
        return [0.0 if v is None else 1.0 for v in values]
    return [0.0 if v is None else (hi - v) / span for v in values]


# -- scorers ---------------------------------------------------------------------------------------------------


class Scorer(ABC):
    """Maps each candidate to a score in [0, 1], higher meaning a better place for this request."""

    name: ClassVar[str]
    #: Whether the scorer reads scraped engine signals (and so honours ``missing``).
    scraped: ClassVar[bool] = False

    def __init__(self, *, missing: MissingSignals = "saturated") -> None:
        self.missing = check_missing(missing)

    @abstractmethod
    def score(self, request: RequestFeatures, replicas: Sequence[ReplicaView]) -> list[float]: ...

    def observe(self, request: RequestFeatures, chosen: ReplicaView) -> None:
        """Learn from the decision (stateful scorers only)."""

    def describe(self) -> dict[str, Any]:
        return {"missing": self.missing} if self.scraped else {}


class PrefixScorer(Scorer):
    """llm-d ``prefix-cache-scorer``: matched / total prompt blocks. Here ``prefix_match_tokens / prompt_tokens``
    capped at 1, from the router's prefix index (matched at the index's block granularity)."""

    name = "prefix"

    def score(self, request: RequestFeatures, replicas: Sequence[ReplicaView]) -> list[float]:
        p = request.prompt_tokens
        return [prefix_ratio(p, r.prefix_match_tokens) for r in replicas]


class QueueScorer(Scorer):
    """llm-d ``queue-scorer``: min-max normalised waiting queue (scraped ``num_waiting``)."""

    name = "queue"
    scraped = True

    def score(self, request: RequestFeatures, replicas: Sequence[ReplicaView]) -> list[float]:
        return _lower_is_better([r.num_waiting for r in replicas], self.missing)


class KvUsageScorer(Scorer):
    """llm-d ``kv-cache-utilization-scorer``: ``1 − kv_usage`` (scraped)."""

    name = "kv_usage"
    scraped = True

    def score(self, request: RequestFeatures, replicas: Sequence[ReplicaView]) -> list[float]:
        absent = 0.0 if self.missing == "saturated" else 1.0
        return [absent if r.kv_usage is None else 1.0 - min(1.0, max(0.0, r.kv_usage)) for r in replicas]


class RunningScorer(Scorer):
    """llm-d ``running-requests-size-scorer``: min-max normalised running batch (scraped ``num_running``)."""

    name = "running"
    scraped = True

    def score(self, request: RequestFeatures, replicas: Sequence[ReplicaView]) -> list[float]:
        return _lower_is_better([r.num_running for r in replicas], self.missing)


class InflightRequestsScorer(Scorer):
    """Router-tracked requests in flight, min-max normalised; current at every decision, unlike a scrape
    (the signal of llm-d's ``active-request-scorer``, normalised like the queue scorer)."""

    name = "inflight_requests"

    def score(self, request: RequestFeatures, replicas: Sequence[ReplicaView]) -> list[float]:
        return _lower_is_better([r.inflight_requests for r in replicas], "idle")


class InflightTokensScorer(Scorer):
    """Router-tracked outstanding prefill + decode tokens, min-max normalised (the signal of llm-d's
    ``token-load-scorer``; that plugin divides by a fixed 4,194,304-token cap, which leaves realistic loads
    nearly indistinguishable, so this one normalises over the candidates instead)."""

    name = "inflight_tokens"

    def score(self, request: RequestFeatures, replicas: Sequence[ReplicaView]) -> list[float]:
        return _lower_is_better([r.inflight_prefill_tokens + r.inflight_decode_tokens for r in replicas], "idle")


class SessionScorer(Scorer):
    """llm-d ``session-affinity-scorer``: 1 for the replica that served the request's session last, else 0.

    llm-d carries the pod in a response header the client sends back; here the scorer remembers it, in an
    LRU map of at most ``max_sessions`` entries keyed by a 64-bit hash of the session id (so an entry's size
    does not depend on the id's length).
    """

    name = "session"

    def __init__(self, *, missing: MissingSignals = "saturated", max_sessions: int = 65536) -> None:
        super().__init__(missing=missing)
        self.max_sessions = check_int("max_sessions", max_sessions, minimum=1)
        self._last: OrderedDict[int, str] = OrderedDict()

    def score(self, request: RequestFeatures, replicas: Sequence[ReplicaView]) -> list[float]:
        if request.session_id is None:
            return [0.0] * len(replicas)
        bound = self._last.get(stable_hash(request.session_id))
        return [1.0 if r.replica_id == bound else 0.0 for r in replicas]

    def observe(self, request: RequestFeatures, chosen: ReplicaView) -> None:
        if request.session_id is None:
            return
        key = stable_hash(request.session_id)
        self._last[key] = chosen.replica_id
        self._last.move_to_end(key)
        if len(self._last) > self.max_sessions:
            self._last.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        return {"max_sessions": self.max_sessions}


# -- filters ---------------------------------------------------------------------------------------------------


class Filter(ABC):
    """Narrows the candidates. Filters here fail open: they never return an empty set from a non-empty one."""

    name: ClassVar[str]

    @abstractmethod
    def apply(
        self, request: RequestFeatures, replicas: Sequence[ReplicaView], rng: random.Random
    ) -> Sequence[ReplicaView]: ...

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class HealthySignalsFilter(Filter):
    """Drop replicas whose scraped signals are older than ``max_age_s`` or were never scraped, so load scorers
    compare fresh numbers; keep everyone if that would drop everyone (fail open, like llm-d's saturation
    filter: a scraper outage must not become an outage of the pool)."""

    name = "healthy_signals"

    def __init__(self, max_age_s: float = 5.0) -> None:
        self.max_age_s = check_float("max_age_s", max_age_s, minimum=0.0)

    def apply(
        self, request: RequestFeatures, replicas: Sequence[ReplicaView], rng: random.Random
    ) -> Sequence[ReplicaView]:
        limit = self.max_age_s
        fresh = [r for r in replicas if r.scrape_age_s is not None and r.scrape_age_s <= limit]
        return fresh or replicas

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "max_age_s": self.max_age_s}


class PrefixAffinityFilter(Filter):
    """llm-d ``prefix-cache-affinity-filter``: keep replicas whose prefix score is ≥ ``threshold`` (0.80), except
    with probability ``epsilon`` (0.01), which explores so the sticky set can change; if none qualifies, keep
    all. llm-d's third rule (break stickiness when the sticky set's predicted TTFT is worse by > 5 s) needs
    its latency predictor, which the snapshot does not carry, so it is left out."""

    name = "prefix_affinity"

    def __init__(self, threshold: float = 0.8, epsilon: float = 0.01) -> None:
        self.threshold = check_float("threshold", threshold, minimum=0.0, maximum=1.0)
        self.epsilon = check_float("epsilon", epsilon, minimum=0.0, maximum=1.0)

    def apply(
        self, request: RequestFeatures, replicas: Sequence[ReplicaView], rng: random.Random
    ) -> Sequence[ReplicaView]:
        if self.epsilon > 0.0 and rng.random() < self.epsilon:
            return replicas
        p, t = request.prompt_tokens, self.threshold
        sticky = [r for r in replicas if prefix_ratio(p, r.prefix_match_tokens) >= t]
        return sticky or replicas

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold, "epsilon": self.epsilon}


# -- pickers ---------------------------------------------------------------------------------------------------


class Picker(ABC):
    name: ClassVar[str]

    @abstractmethod
    def pick(self, scores: Sequence[float], rng: random.Random) -> int:
        """Index of the chosen candidate."""


class MaxScorePicker(Picker):
    """llm-d ``max-score-picker``: the highest total; ties broken at random (seeded), so equal replicas share
    load instead of the first one taking it all."""

    name = "max_score"

    def pick(self, scores: Sequence[float], rng: random.Random) -> int:
        best = max(scores)
        ties = [i for i, s in enumerate(scores) if s == best]
        return ties[0] if len(ties) == 1 else rng.choice(ties)


class WeightedRandomPicker(Picker):
    """llm-d ``weighted-random-picker``: probability proportional to the total score (uniform if all are 0)."""

    name = "weighted_random"

    def pick(self, scores: Sequence[float], rng: random.Random) -> int:
        weights = [max(0.0, s) for s in scores]
        total = sum(weights)
        if total <= 0.0:
            return rng.randrange(len(scores))
        target = rng.random() * total
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w
            if target < acc:
                return i
        return max(i for i, w in enumerate(weights) if w > 0.0)


class RandomPicker(Picker):
    """llm-d ``random-picker``: uniform over the candidates left by the filters."""

    name = "random"

    def pick(self, scores: Sequence[float], rng: random.Random) -> int:
        return rng.randrange(len(scores))


FILTERS: dict[str, type[Filter]] = {f.name: f for f in (HealthySignalsFilter, PrefixAffinityFilter)}
SCORERS: dict[str, type[Scorer]] = {
    s.name: s
    for s in (
        PrefixScorer,
        QueueScorer,
        KvUsageScorer,
        RunningScorer,
        InflightRequestsScorer,
        InflightTokensScorer,
        SessionScorer,
    )
}
PICKERS: dict[str, type[Picker]] = {p.name: p for p in (MaxScorePicker, WeightedRandomPicker, RandomPicker)}

#: llm-d's built-in default profile (``pkg/epp/config/loader/defaults.go``): prefix 3 : queue 2 : kv 2.
LLMD_DEFAULT_SCORERS: dict[str, float] = {"prefix": 3.0, "queue": 2.0, "kv_usage": 2.0}


def _split_filter_spec(spec: object) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        params = {str(k): v for k, v in spec.items() if k != "name"}
        return str(spec["name"]), params
    raise ValueError(f"a filter is a name or a mapping with a 'name' key, got {spec!r}")


def _split_scorer_spec(name: str, spec: object) -> tuple[float, dict[str, Any]]:
    if isinstance(spec, Mapping):
        params = {str(k): v for k, v in spec.items() if k != "weight"}
        weight = spec.get("weight", 1.0)
    else:
        params, weight = {}, spec
    return check_float(f"weight of scorer {name!r}", weight, minimum=0.0), params


def _construct(kind: str, name: str, cls: type[Any], params: Mapping[str, Any]) -> Any:
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"invalid parameters for {kind} {name!r}: {exc}") from None


class WeightedPolicy(RoutingPolicy):
    """The configurable pipeline: ``filters`` (names, or ``{"name": ..., **params}``), ``scorers`` (name →
    weight, or name → ``{"weight": w, **params}``), ``picker`` (``max_score`` | ``weighted_random`` |
    ``random``). Defaults to llm-d's profile. Cost: O(replicas × plugins) per decision."""

    name = "weighted"

    def __init__(
        self,
        filters: Sequence[str | Mapping[str, Any]] = (),
        scorers: Mapping[str, float | Mapping[str, Any]] | None = None,
        picker: str = "max_score",
        seed: int = 0,
        missing_signals: str = "saturated",
    ) -> None:
        self.seed = check_int("seed", seed)
        self.missing_signals = check_missing(missing_signals)
        if isinstance(filters, str | bytes) or not isinstance(filters, Sequence):
            raise ValueError(f"filters must be a list, got {filters!r}")
        scorer_specs: Mapping[str, object] = LLMD_DEFAULT_SCORERS if scorers is None else scorers
        if not isinstance(scorer_specs, Mapping):
            raise ValueError(f"scorers must be a mapping of name to weight, got {scorers!r}")
        filter_specs = [_split_filter_spec(f) for f in filters]
        unknown = [f"filter {n!r}" for n, _ in filter_specs if n not in FILTERS]
        unknown += [f"scorer {n!r}" for n in scorer_specs if n not in SCORERS]
        if picker not in PICKERS:
            unknown.append(f"picker {picker!r}")
        if unknown:
            raise ValueError(
                f"unknown routing plugin(s): {', '.join(unknown)}; available filters: {', '.join(sorted(FILTERS))};"
                f" scorers: {', '.join(sorted(SCORERS))}; pickers: {', '.join(sorted(PICKERS))}"
            )
        self._filters: list[Filter] = [_construct("filter", n, FILTERS[n], p) for n, p in filter_specs]
        self._scorers: list[tuple[Scorer, float]] = []
        for n, spec in scorer_specs.items():
            weight, params = _split_scorer_spec(n, spec)
            cls = SCORERS[n]
            params.setdefault("missing", self.missing_signals)
            self._scorers.append((_construct("scorer", n, cls, params), weight))
        self._picker: Picker = PICKERS[picker]()
        self._rng = random.Random(self.seed)

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        candidates = require_replicas(fleet)
        for f in self._filters:
            kept = f.apply(request, candidates, self._rng)
            if kept:  # fail open: a filter may narrow the set, never empty it
                candidates = kept
        totals = [0.0] * len(candidates)
        parts: list[tuple[str, list[float]]] = []
        for scorer, weight in self._scorers:
            if weight == 0.0:
                continue
            values = scorer.score(request, candidates)
            parts.append((scorer.name, values))
            totals = [t + weight * v for t, v in zip(totals, values, strict=True)]
        i = self._picker.pick(totals, self._rng)
        chosen = candidates[i]
        for scorer, _ in self._scorers:
            scorer.observe(request, chosen)
        scores = {name: values[i] for name, values in parts}
        scores["total"] = totals[i]
        scores["candidates"] = float(len(candidates))
        return Decision(chosen, f"{self.name}:{self._picker.name}", scores)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "filters": [f.describe() for f in self._filters],
            "scorers": {s.name: {"weight": w, **s.describe()} for s, w in self._scorers},
            "picker": self._picker.name,
            "seed": self.seed,
            "missing_signals": self.missing_signals,
        }
