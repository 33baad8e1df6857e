"""The router's per-replica books: what a lease adds to its replica, and that release returns all of it."""

from __future__ import annotations

import pytest

from router.discovery.base import ReplicaSpec
from router.fleet import Lease, RemoteLoad, ReplicaState


def test_tpot_sensitivity_follows_leases_and_other_routers() -> None:
    replica = ReplicaState(spec=ReplicaSpec("http://127.0.0.1:1"), index=0)
    short = Lease(replica, 1_000, 5)  # a 5-token reply: 4 gaps, each counts 1/4 of its TPOT
    long = Lease(replica, 1_000, 501)
    single = Lease(replica, 1_000, 1)  # one token has no TPOT to harm
    assert replica.view(0.0).tpot_sensitivity == pytest.approx(1 / 4 + 1 / 500)
    short.first_token()
    short.tokens_generated(2)  # the reply's length, not its progress, sets the share
    assert replica.local_load().tpot_sensitivity == pytest.approx(1 / 4 + 1 / 500)
    replica.remote = RemoteLoad(requests=1, tpot_sensitivity=0.5)
    assert replica.view(0.0).tpot_sensitivity == pytest.approx(0.5 + 1 / 4 + 1 / 500)
    short.release()
    short.release()  # idempotent
    assert replica.view(0.0).tpot_sensitivity == pytest.approx(0.5 + 1 / 500)
    for lease in (long, single):
        lease.release()
    replica.remote = None
    assert replica.inflight_tpot_sensitivity == 0.0 and replica.inflight_requests == 0
