"""Llumnix dispatch (``dispatch_policy='load'``): send to the instance with the most free KV per request.

Source: Sun et al., "Llumnix" (OSDI'24), and AlibabaPAI/llumnix ``llumnix/instance_info.py`` at 37d8e5ea
(reference papers §5.2-5.3; anchors §6). Llumnix's dispatch load is the negated *freeness*::

    freeness = (free_blocks − watermark_blocks − blocks_of_all_waiting_requests) / (num_running + num_waiting)

(+inf with no requests), i.e. how many more decode steps the instance's batch can take before it runs out
of KV. Dividing by the batch size is the point: an instance with a large batch consumes its free memory
faster. The instance with the highest freeness wins; Llumnix sorts stably, so ties go to the first.

Signals (the llumlet reports exact block counts; the router has scrapes plus its own accounting):

* capacity ``C``: ``kv_capacity_tokens``; if a replica does not publish it, the largest capacity another
  replica publishes (one model on like hardware), else the ``kv_capacity_tokens`` parameter, else the largest
  demand in the fleet (so the most loaded replica has nothing free).
* demand (Llumnix's used blocks + blocks of waiting requests): ``max(kv_usage · C, inflight_kv_tokens)``. The
  router's ``inflight_kv_tokens`` is the sum of the *virtual usages* of every request it has in flight: the
  KV of running ones, the demand (prompt) of queued ones, and requests dispatched after the last scrape that
  no engine metric shows yet; that last part is what Llumnix's virtual usage exists to count. The scrape
  adds what the router cannot see (other traffic, block rounding). The larger of the two, not the sum, so a
  request visible in both is not counted twice.
* batch ``B``: ``max(num_running + num_waiting, inflight_requests)``, for the same reason.
* watermark: the fraction of ``C`` vLLM keeps free (``watermark`` 0.01, vLLM's default), applied only when
  the capacity is known.
* Missing scraped signals fall back to router accounting alone. Freeness is in tokens rather than 16-token
  blocks: the same ordering.

As in Llumnix, an over-committed replica (negative free memory) with a larger batch reads as less negative:
that is the published formula, kept as is.
"""

from __future__ import annotations

import math
from typing import Any

from policies.routing.base import Decision, FleetView, RequestFeatures, RoutingPolicy, require_replicas
from policies.routing.pipeline import check_float, check_int


class KvFreeness(RoutingPolicy):
    """The freest replica by Llumnix's freeness, with router accounting as virtual usage."""

    name = "kv_freeness"

    def __init__(self, watermark: float = 0.01, kv_capacity_tokens: int | None = None) -> None:
        self.watermark = check_float("watermark", watermark, minimum=0.0, maximum=1.0, max_open=True)
        self.kv_capacity_tokens = (
            None if kv_capacity_tokens is None else check_int("kv_capacity_tokens", kv_capacity_tokens, minimum=1)
        )

    def choose(self, request: RequestFeatures, fleet: FleetView) -> Decision:
        replicas = require_replicas(fleet)
        published = [r.kv_capacity_tokens for r in replicas if r.kv_capacity_tokens]
        fleet_capacity = max(published) if published else self.kv_capacity_tokens
        demands: list[float] = []
        batches: list[int] = []
        capacities: list[float | None] = []
        for r in replicas:
            cap = r.kv_capacity_tokens or fleet_capacity
            used = r.kv_usage * cap if (r.kv_usage is not None and cap) else 0.0
            demands.append(max(used, float(r.inflight_kv_tokens)))
            engine_batch = (r.num_running or 0) + (r.num_waiting or 0)
            batches.append(max(engine_batch, r.inflight_requests))
            capacities.append(float(cap) * (1.0 - self.watermark) if cap else None)
        floor = max(demands)
        best, best_free = 0, -math.inf
        for i, (demand, batch, usable) in enumerate(zip(demands, batches, capacities, strict=True)):
            free = (floor if usable is None else usable) - demand
            freeness = math.inf if batch == 0 else free / batch
            if freeness > best_free:
                best, best_free = i, freeness
        return Decision(
            replicas[best],
            "kv_freeness",
            {"freeness_tokens": best_free, "demand_tokens": demands[best], "batch": float(batches[best])},
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "watermark": self.watermark, "kv_capacity_tokens": self.kv_capacity_tokens}
