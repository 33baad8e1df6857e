"""llm-d's default scheduling profile, rebuilt on the generic pipeline for side-by-side comparison.

Source: llm-d/llm-d-router ``pkg/epp/config/loader/defaults.go`` and the Helm chart's
``config/charts/epplib/templates/_config.yaml`` (reference anchors §3): no filters, ``prefix-cache-scorer``
weight 3, ``queue-scorer`` 2, ``kv-cache-utilization-scorer`` 2, ``max-score-picker`` (ties at random).

* prefix: matched / total prompt blocks → ``prefix_match_tokens / prompt_tokens`` capped at 1. llm-d's
  approximate producer hashes ``16 × 4``-character blocks of the request body and caps a match at 256 blocks;
  the router's index hashes 256-byte blocks (live) or ``prefix_block_tokens``-token blocks (simulator) with no
  cap. Same ratio, different granularity.
* queue: ``(max − q) / (max − min)`` over scraped ``num_waiting``, all equal → 1.
* kv: ``1 − kv_usage`` (scraped ``kv_cache_usage_perc``).
* Missing scraped values (never scraped): scored as saturated by default, the rule llm-d's utilization
  detector applies to stale or missing metrics; ``missing_signals="idle"`` instead reads them as 0, as
  scorers over zero-initialised metrics do. Present-but-old values are used as they are, like llm-d's
  scorers (which read the last scrape).
"""

from __future__ import annotations

from typing import Any

from policies.routing.pipeline import WeightedPolicy, check_float


class LlmdScorer(WeightedPolicy):
    """prefix 3 : queue 2 : kv-utilisation 2, max-score picker with seeded random tie-break."""

    name = "llmd_scorer"

    def __init__(
        self,
        prefix_weight: float = 3.0,
        queue_weight: float = 2.0,
        kv_cache_weight: float = 2.0,
        seed: int = 0,
        missing_signals: str = "saturated",
    ) -> None:
        weights = {
            "prefix": check_float("prefix_weight", prefix_weight, minimum=0.0),
            "queue": check_float("queue_weight", queue_weight, minimum=0.0),
            "kv_usage": check_float("kv_cache_weight", kv_cache_weight, minimum=0.0),
        }
        super().__init__(filters=(), scorers=weights, picker="max_score", seed=seed, missing_signals=missing_signals)
        self._weights = weights

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prefix_weight": self._weights["prefix"],
            "queue_weight": self._weights["queue"],
            "kv_cache_weight": self._weights["kv_usage"],
            "picker": "max_score",
            "seed": self.seed,
            "missing_signals": self.missing_signals,
        }
