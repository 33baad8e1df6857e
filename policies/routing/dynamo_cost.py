"""NVIDIA Dynamo's KV router cost: prefill work the request adds plus the decode KV already on the worker.

Source: ai-dynamo/dynamo ``lib/llm/src/kv_router/`` (``DefaultWorkerSelector`` in the scheduler's selector,
``ActiveSequences::potential_blocks_and_tokens``) and ``docs/components/router/`` (reference anchors §5,
§10.1)::

    prefill_blocks(w) = (new tokens of this request on w + w's outstanding prefill tokens) / block_size
                        with new tokens = isl − overlap_blocks(w) · block_size
    decode_blocks(w)  = w's active KV blocks (router-predicted, not scraped)
    cost(w)           = overlap_score_weight · prefill_blocks(w) + decode_blocks(w)

``--kv-overlap-score-weight`` 1.0 ("higher → better TTFT, lower → better ITL"), ``--router-temperature`` 0:
argmin, ties at random (Dynamo first prefers the worker with the smaller radix tree; the snapshot has no
tree size, so it is random among the tied, seeded). With temperature > 0 Dynamo samples
``softmax(−cost / (max − min) / temperature)``, uniform when all costs are equal; the same here, seeded.

Substitutions (the router's accounting stands in for Dynamo's, which it closely resembles):

* overlap: ``prefix_match_tokens`` (router prefix index, 256-byte or ``prefix_block_tokens`` blocks) floored to
  whole ``block_size``-token blocks, instead of Dynamo's KV-event-fed radix index of 16-token engine blocks.
* outstanding prefill: ``inflight_prefill_tokens`` (prompts sent whose first token has not returned); Dynamo
  counts only their uncached part, so this over-counts on cache hits.
* active blocks: ``ceil(inflight_kv_tokens / block_size)``. Dynamo deduplicates blocks shared by sequences
  in flight on a worker and adds this request's blocks not already active there; the router counts each
  request's KV separately, and leaves out this request's own blocks, which is the same for every worker
  (as a constant it changes neither the argmin nor the softmax, whose normalisation cancels it).
"""

from __future__ import annotations

import math
import random
from typing import Any

from policies.routing.base import Decision, FleetView, RequestFeatures, RoutingPolicy, require_replicas
from policies.routing.pipeline import check_float, check_int


class DynamoCost(RoutingPolicy):
    """argmin (or softmax sample) of ``overlap_score_weight · prefill_blocks + decode_blocks``."""

    name = "dynamo_cost"

    def __init__(
        self, overlap_score_weight: float = 1.0, temperature: float = 0.0, block_size: int = 16, seed: int = 0
    ) -> None:
        self.overlap_score_weight = check_float("overlap_score_weight", overlap_score_weight, minimum=0.0)
        self.temperature = check_float("temperature", temperature, minimum=0.0)
        self.block_size = check_int("block_size", block_size, minimum=1)
        self.seed = check_int("seed", seed)
        self._rng = random.Random(self.seed)

    def costs(self, request: RequestFeatures, fleet: FleetView) -> list[tuple[float, float, float]]:
        """Per replica: (cost, prefill_blocks, decode_blocks)."""
        bs, w, isl = self.block_size, self.overlap_score_weight, max(0, request.prompt_tokens)
        out: list[tuple[float, float, float]] = []
        for r in fleet.replicas:
            overlap_tokens = (min(max(0, r.prefix_match_tokens), isl) // bs) * bs
            prefill = (isl - overlap_tokens + max(0, r.inflight_prefill_tokens)) / bs
            decode = float(-(-max(0, r.inflight_kv_tokens) // bs))
            out.append((w * prefill + decode, prefill, decode))
        return out

    def _sample(self, logits: list[float]) -> int:
        lo, hi = min(logits), max(logits)
        if lo == hi:
            return self._rng.randrange(len(logits))
        span, t = hi - lo, self.temperature
        scaled = [-(v / span) / t for v in logits]
        top = max(scaled)
        weights = [math.exp(s - top) for s in scaled]
        target = self._rng.random() * sum(weights)
        acc = 0.0
        for i, wt in enumerate(weights):
            acc += wt
            if target < acc:
                return i
        return len(logits) - 1

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        costs = self.costs(request, fleet)
        logits = [c for c, _, _ in costs]
        if self.temperature == 0.0:
            best = min(logits)
            ties = [i for i, c in enumerate(logits) if c == best]
            pick = ties[0] if len(ties) == 1 else self._rng.choice(ties)
            reason = "argmin"
        else:
            pick = self._sample(logits)
            reason = "softmax"
        cost, prefill, decode = costs[pick]
        return Decision(replicas[pick], reason, {"cost": cost, "prefill_blocks": prefill, "decode_blocks": decode})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "overlap_score_weight": self.overlap_score_weight,
            "temperature": self.temperature,
            "block_size": self.block_size,
            "seed": self.seed,
        }
