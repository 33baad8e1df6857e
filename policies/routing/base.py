"""The snapshot a routing policy decides from, and the policy contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What the router knows of one eligible replica at decision time.

    Router accounting (``inflight_*``) is exact and current: the router updates it at dispatch, first
    token, each chunk and completion. Scraped engine signals (``num_running``, ``num_waiting``,
    ``kv_usage``) lag by up to one scrape interval plus the engine's own reporting delay, and are None
    when never scraped; ``scrape_age_s`` says how old they are.
    """

    replica_id: str
    index: int
    inflight_requests: int = 0
    #: Prompt tokens sent to the replica whose first token has not come back yet.
    inflight_prefill_tokens: int = 0
    #: Tokens the replica still has to generate for requests in flight (from max_tokens).
    inflight_decode_tokens: int = 0
    #: KV the requests in flight occupy: their prompts plus the tokens generated so far.
    inflight_kv_tokens: int = 0
    #: Of ``inflight_prefill_tokens``, those expected to miss the prefix cache (at dispatch time), and their
    #: causal-attention work (:func:`prefill_work`): what the replica still has to compute before it answers.
    inflight_prefill_new_tokens: int = 0
    inflight_prefill_attention: float = 0.0
    #: Σ 1/(max_tokens − 1) over the requests in flight that stream more than one token: how much their
    #: TPOTs rise, summed, per millisecond added to the steps they share (a 5-token reply feels it 125×
    #: more than a 500-token one).
    tpot_sensitivity: float = 0.0
    num_running: int | None = None
    num_waiting: int | None = None
    kv_usage: float | None = None
    scrape_age_s: float | None = None
    #: KV capacity in tokens, when the engine publishes it (vLLM's cache_config_info).
    kv_capacity_tokens: int | None = None
    #: Leading tokens of *this* request the replica is believed to hold in its prefix cache.
    prefix_match_tokens: int = 0

    @property
    def inflight_tokens(self) -> int:
        return self.inflight_prefill_tokens + self.inflight_decode_tokens


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """What routing needs of a request, parsed once on the hot path."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    model: str = ""
    #: Chained hashes of the prompt's full blocks of ``block_size`` tokens (router-side tokenisation).
    block_hashes: Sequence[int] = ()
    block_size: int = 16
    tenant: str = "default"
    session_id: str | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class FleetView:
    """The eligible replicas (healthy, not draining, serving the model) at one instant."""

    replicas: Sequence[ReplicaView]
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """The chosen replica, and why (logged and exported as a metric label)."""

    replica: ReplicaView
    reason: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)


class NoEligibleReplica(LookupError):
    """No replica can take the request (none healthy, all draining, or none serves the model)."""


class RoutingPolicy(ABC):
    """Chooses a replica. May keep internal state (a counter, an approximate tree) but does no I/O."""

    name: ClassVar[str]

    @abstractmethod
    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        """Pick one of ``fleet.replicas``; raise :class:`NoEligibleReplica` when there is none."""

    def describe(self) -> dict[str, Any]:
        """The policy's parameters, for logs and the admin API."""
        return {"name": self.name}


def prefill_work(prompt_tokens: int, cached_tokens: int) -> tuple[int, float]:
    """New (uncached) prompt tokens and their causal-attention units ``n·(m + n/2)``.

    ``m`` cached tokens are reused; at least one token is always computed, as engines do.
    """
    m = max(0, min(cached_tokens, prompt_tokens - 1))
    n = prompt_tokens - m
    return n, n * (m + n / 2)


def tpot_sensitivity(max_tokens: int) -> float:
    """One request's share of :attr:`ReplicaView.tpot_sensitivity`: 0 when it streams at most one token."""
    return 1.0 / (max_tokens - 1) if max_tokens > 1 else 0.0


def require_replicas(fleet: FleetView) -> Sequence[ReplicaView]:
    if not fleet.replicas:
        raise NoEligibleReplica("no healthy replica can serve this request")
    return fleet.replicas
