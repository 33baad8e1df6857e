"""What sharing state through Redis adds to routing latency, against the in-memory store, side by side.

Run: ``.venv/bin/python bench/state_store.py`` (``--quick`` for a short run). Needs ``redis-server`` on PATH;
the bench starts its own on a free port. Two measurements, both interleaved so drift of a shared machine
falls on both stores alike:

1. **Decision path** (in process): what the router's request path does per request, around the policy
   (``router/proxy.py``): eligible replicas, ``PrefixIndex.match``, the fleet snapshot (with the other routers'
   load added when there is any), the ``default`` policy, the lease, the local prefix record, first token and
   release, and the store's hooks (``on_load`` x3, ``on_record``). With Redis, the store is connected and a
   second router in the same fleet publishes load changes and prefix records all along, so the first one's
   fleet carries remote load and its background tasks have work to do between the timed calls.
2. **Through the proxy** (processes): two ``fleetroute serve`` processes in front of the same emulated replicas
   (one ``fleetroute engine --replicas N`` process at a high speed, so model time is small), one with the
   in-memory store and one with Redis, plus a third router on the same Redis carrying its own traffic all
   along (the Redis router receives its load changes and records). Closed-loop clients each send a short
   streamed completion to each of the two routers in turn, in random order, so both see the same machine at
   the same moments; time to first token and to the end of the stream are measured at the client. Added
   latency = Redis percentile - in-memory percentile, with a bootstrap 95 % interval of the p50 difference.
   Run with one client (latency without queueing) and with four (the router's extra work for Redis then
   delays other requests too). The routers' CPU time per request (``/proc``) is reported as well: it
   depends less on what else the machine runs.

Target (the issue): at most 0.2 ms more at p50 with Redis. Results: a Markdown table on stdout and
``bench/results/state_store.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emulator.tokenizer import synthesize_text  # noqa: E402
from policies.routing import RequestFeatures, make_routing_policy  # noqa: E402
from policies.routing.base import prefill_work  # noqa: E402
from router.discovery.base import ReplicaSpec  # noqa: E402
from router.fleet import Fleet, Health, Lease, ReplicaState  # noqa: E402
from router.prefix_index import PrefixIndex, prompt_block_hashes  # noqa: E402
from router.state import InMemoryStateStore, StateStore  # noqa: E402
from router.state.redis_store import RedisStateStore  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "state_store.json"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TARGET_MS = 0.2


# ---------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port != 6379 and port < 60000:
            return port


def free_port_range(count: int) -> int:
    for _ in range(200):
        base = random.randint(20000, 50000)
        try:
            for p in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Processes:
    """Every process the bench starts, each in its own session, killed on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.close()


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"process on port {port} did not start")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- 1: decision path
def make_fleet(replicas: int) -> tuple[Fleet, PrefixIndex, list[ReplicaState]]:
    index = PrefixIndex(64 << 20)
    fleet = Fleet()
    fleet.update([ReplicaSpec(f"http://10.1.0.{i}:8000") for i in range(replicas)])
    states = fleet.all()
    for r in states:
        r.health = Health.HEALTHY
        r.models = frozenset({MODEL})
        index.add_replica(r.id)
    return fleet, index, states


class PathBench:
    """One router's request path over a fleet of its own, with a given store."""

    def __init__(self, store_kind: str, replicas: int, redis_url: str | None, prompts: list[bytes]) -> None:
        self.fleet, self.index, self.states = make_fleet(replicas)
        self.policy = make_routing_policy("default", {})
        self.prompts = prompts
        self.store: StateStore
        if store_kind == "redis":
            assert redis_url is not None
            self.store = RedisStateStore(redis_url, self.fleet, self.index, namespace="bench")
            for r in self.states:
                self.store.replica_added(r)
        else:
            self.store = InMemoryStateStore()
        self.n = 0

    def one(self) -> float:
        """Time the synchronous request path once (seconds)."""
        data = self.prompts[self.n % len(self.prompts)]
        self.n += 1
        started = time.perf_counter()
        hashes = prompt_block_hashes(data, 256)
        features = RequestFeatures(
            request_id="r", prompt_tokens=len(data) // 4, max_tokens=64, model=MODEL, block_hashes=hashes
        )
        candidates = self.fleet.eligible(MODEL)
        matched = self.index.match(hashes)
        view = self.fleet.snapshot(candidates, {rid: n * 64 for rid, n in matched.items()})
        decision = self.policy.choose(features, view)
        replica = self.fleet.get(decision.replica.replica_id)
        assert replica is not None
        new, attention = prefill_work(features.prompt_tokens, decision.replica.prefix_match_tokens)
        lease = Lease(replica, features.prompt_tokens, features.max_tokens, new, attention)
        store = self.store
        store.on_load(replica)
        store.on_record(replica.id, hashes)
        self.index.record(replica.id, hashes)
        lease.first_token()
        store.on_load(replica)
        lease.tokens_generated(8)
        lease.release()
        store.on_load(replica)
        return time.perf_counter() - started


async def peer_traffic(store: RedisStateStore, states: list[ReplicaState], prompts: list[bytes]) -> None:
    """Another router's changing load and new records, all along."""
    rng = random.Random(1)
    leases: list[Lease] = []
    while True:
        replica = rng.choice(states)
        leases.append(Lease(replica, 500, 64))
        store.on_load(replica)
        store.on_record(replica.id, prompt_block_hashes(rng.choice(prompts), 256))
        if len(leases) > 20:
            old = leases.pop(0)
            old.release()
            store.on_load(old.replica)
        await asyncio.sleep(0.002)


async def bench_path(replicas: int, redis_url: str, runs: int, rounds: int) -> dict[str, Any]:
    prompts = [synthesize_text(1000, i).encode() for i in range(64)]  # ~5 KB prompts, 20 blocks each
    mem = PathBench("memory", replicas, None, prompts)
    red = PathBench("redis", replicas, redis_url, prompts)
    peer_fleet, peer_index, peer_states = make_fleet(replicas)
    peer = RedisStateStore(redis_url, peer_fleet, peer_index, namespace="bench")
    for r in peer_states:
        peer.replica_added(r)
    assert isinstance(red.store, RedisStateStore)
    await red.store.start()
    await peer.start()
    traffic = asyncio.get_running_loop().create_task(peer_traffic(peer, peer_states, prompts))
    try:
        deadline = time.monotonic() + 10
        while not (red.store.up and peer.up and any(r.remote for r in red.states)):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis store did not connect")
            await asyncio.sleep(0.01)
        times: dict[str, list[float]] = {"memory": [], "redis": []}
        for rnd in range(rounds):
            order = [("memory", mem), ("redis", red)] if rnd % 2 == 0 else [("redis", red), ("memory", mem)]
            for name, bench in order:
                for _ in range(runs // rounds // 50):
                    times[name] += [bench.one() for _ in range(50)]
                    await asyncio.sleep(0)  # the stores' background tasks run between chunks
        remote = sum(1 for r in red.states if r.remote is not None)
    finally:
        traffic.cancel()
        await asyncio.gather(traffic, return_exceptions=True)
        await red.store.stop()
        await peer.stop()
    out: dict[str, Any] = {"replicas": replicas, "runs_per_store": len(times["memory"]), "remote_replicas": remote}
    for name, values in times.items():
        out[name] = {q: pct(values, p) * 1e6 for q, p in (("p50_us", 0.5), ("p90_us", 0.9), ("p99_us", 0.99))}
    return out


# ---------------------------------------------------------------------------------------------- 2: proxy
async def one_request(session: aiohttp.ClientSession, url: str, body: bytes, out: list[tuple[float, float]]) -> None:
    started = time.perf_counter()
    first: float | None = None
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                return
            async for chunk in resp.content.iter_any():
                if first is None and b'"text"' in chunk:
                    first = time.perf_counter()
    except aiohttp.ClientError:
        return
    end = time.perf_counter()
    if first is not None:
        out.append((first - started, end - started))


async def open_loop(session: aiohttp.ClientSession, url: str, rate: float, seconds: float, seed: int) -> list[Any]:
    out: list[tuple[float, float]] = []
    tasks = []
    n = round(rate * seconds)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = json.dumps(
            {
                "model": MODEL,
                "prompt": synthesize_text(120, seed + i),
                "max_tokens": 8,
                "stream": True,
                "ignore_eos": True,
            }
        ).encode()
        tasks.append(asyncio.get_running_loop().create_task(one_request(session, url, body, out)))
    await asyncio.gather(*tasks)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_proxy(cfg: argparse.Namespace, redis_url: str, procs: Processes) -> dict[str, Any]:
    base = free_port_range(cfg.replicas)
    engine = procs.start(
        [sys.executable, "-m", "router.cli", "engine", "--replicas", str(cfg.replicas), "--base-port", str(base),
         "--speed", "200"]
    )  # fmt: skip
    for p in range(base, base + cfg.replicas):
        wait_port(p, engine)
    replicas = [f"http://127.0.0.1:{p}" for p in range(base, base + cfg.replicas)]
    targets: dict[str, str] = {}
    pids: dict[str, int] = {}
    for name, extra in (
        ("memory", []),
        ("redis", ["--redis-url", redis_url, "--fleet", "proxy"]),
        ("peer", ["--redis-url", redis_url, "--fleet", "proxy"]),
    ):
        port = free_port()
        argv = [sys.executable, "-m", "router.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--admin-port", "0", "--log-level", "WARNING", *extra]  # fmt: skip
        for url in replicas:
            argv += ["--replica", url]
        proc = procs.start(argv)
        wait_port(port, proc)
        targets[name] = f"http://127.0.0.1:{port}/v1/completions"
        pids[name] = proc.pid
    runs: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for url in targets.values():  # until every router has marked every replica healthy
            deadline = time.monotonic() + 30
            while len(await open_loop(session, url, 50, 0.2, 0)) < 10:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} does not route")
        stop = asyncio.Event()

        async def peer_load() -> None:
            seed = 10_000_000
            while not stop.is_set():
                await open_loop(session, targets["peer"], cfg.peer_rate, 1.0, seed)
                seed += 1000

        peer = asyncio.get_running_loop().create_task(peer_load())
        await asyncio.sleep(1.0)
        for workers in cfg.workers:
            runs.append(await paired_run(session, targets, pids, workers, cfg.requests))
        stop.set()
        await peer
    return {"replicas": cfg.replicas, "peer_rate": cfg.peer_rate, "runs": runs}


async def paired_run(
    session: aiohttp.ClientSession, targets: dict[str, str], pids: dict[str, int], workers: int, requests: int
) -> dict[str, Any]:
    """``workers`` closed-loop clients; each step sends one request to each store, in a random order."""
    results: dict[str, list[tuple[float, float]]] = {"memory": [], "redis": []}

    async def worker(w: int) -> None:
        rng = random.Random(w)
        for i in range(requests // workers):
            order = ["memory", "redis"]
            rng.shuffle(order)
            for name in order:
                body = json.dumps(
                    {"model": MODEL, "prompt": synthesize_text(120, 100_000 * workers + 1000 * w + i),
                     "max_tokens": 8, "stream": True, "ignore_eos": True}
                ).encode()  # fmt: skip
                await one_request(session, targets[name], body, results[name])

    cpu_before = {name: cpu_seconds(pids[name]) for name in results}
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    elapsed = time.perf_counter() - started
    cpu_after = {name: cpu_seconds(pids[name]) for name in results}
    out: dict[str, Any] = {"workers": workers, "seconds": elapsed}
    for name, values in results.items():
        row: dict[str, float] = {
            "requests": len(values),
            "cpu_ms_per_request": (cpu_after[name] - cpu_before[name]) / max(1, len(values)) * 1000,
        }
        for label, col in (("ttft", 0), ("e2e", 1)):
            series = [v[col] for v in values]
            for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                row[f"{label}_{q}_ms"] = pct(series, p) * 1000
        out[name] = row
    for label, col in (("ttft", 0), ("e2e", 1)):
        a = np.array([v[col] for v in results["redis"]]) * 1000
        b = np.array([v[col] for v in results["memory"]]) * 1000
        out[f"{label}_p50_added_ci95_ms"] = bootstrap_diff(a, b)
    return out


def bootstrap_diff(a: np.ndarray, b: np.ndarray, resamples: int = 2000) -> list[float]:
    """95 % interval of median(a) - median(b), by resampling both."""
    rng = np.random.default_rng(0)
    diffs = np.median(rng.choice(a, (resamples, a.size)), axis=1) - np.median(
        rng.choice(b, (resamples, b.size)), axis=1
    )
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


# ---------------------------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    path, proxy = report["decision_path"], report["proxy"]
    lines = [
        f"Redis vs in-memory state store ({report['machine']['cpus']} CPUs, load average "
        f"{report['machine']['loadavg_before']} before the run)",
        "",
        f"Decision path, in process ({path['replicas']} replicas, {path['runs_per_store']} requests per store, "
        f"remote load on {path['remote_replicas']} replicas):",
        "",
        "| store | p50 (µs) | p90 (µs) | p99 (µs) |",
        "|---|---:|---:|---:|",
    ]
    for name in ("memory", "redis"):
        v = path[name]
        lines.append(f"| {name} | {v['p50_us']:.1f} | {v['p90_us']:.1f} | {v['p99_us']:.1f} |")
    m, r = path["memory"], path["redis"]
    lines.append(
        f"| **added** | **{r['p50_us'] - m['p50_us']:+.1f}** | {r['p90_us'] - m['p90_us']:+.1f} | "
        f"{r['p99_us'] - m['p99_us']:+.1f} |"
    )
    lines += [
        "",
        f"Through the proxy ({proxy['replicas']} emulated replicas; closed-loop clients, each sending one short "
        "streamed completion to each router in turn, in random order; meanwhile a third router on the same Redis "
        f"carries {proxy['peer_rate']:g} req/s, whose load changes and records the Redis router receives). "
        "Times in ms; CPU is the router process's, per request it served:",
    ]
    for run in proxy["runs"]:
        lines += [
            "",
            f"{run['workers']} client(s), {run['memory']['requests']} requests per store:",
            "",
            "| store | TTFT p50 | TTFT p90 | TTFT p99 | end p50 | end p90 | end p99 | router CPU / request |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in ("memory", "redis"):
            v = run[name]
            lines.append(
                f"| {name} | {v['ttft_p50_ms']:.2f} | {v['ttft_p90_ms']:.2f} | {v['ttft_p99_ms']:.2f} | "
                f"{v['e2e_p50_ms']:.2f} | {v['e2e_p90_ms']:.2f} | {v['e2e_p99_ms']:.2f} | "
                f"{v['cpu_ms_per_request']:.3f} |"
            )
        m, r = run["memory"], run["redis"]
        keys = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms")
        cells = [f"{r[k] - m[k]:+.2f}" for k in keys]
        lo, hi = run["ttft_p50_added_ci95_ms"]
        cells[0] = f"**{cells[0]}** [{lo:+.2f}, {hi:+.2f}]"
        lo, hi = run["e2e_p50_added_ci95_ms"]
        cells[3] = f"**{cells[3]}** [{lo:+.2f}, {hi:+.2f}]"
        cpu = r["cpu_ms_per_request"] - m["cpu_ms_per_request"]
        lines.append("| **added** | " + " | ".join(cells) + f" | {cpu:+.3f} |")
    verdict = report["verdict"]
    lines += ["", f"Target: at most {TARGET_MS} ms more at p50 with Redis."]
    lines.append(f"- decision path: {verdict['path_added_p50_ms']:+.4f} ms: {_met(verdict['path_added_p50_ms'])}")
    for run in verdict["proxy"]:
        lines.append(
            f"- through the proxy, {run['workers']} client(s): TTFT {run['ttft_added_p50_ms']:+.3f} ms, end "
            f"{run['e2e_added_p50_ms']:+.3f} ms: {_met(max(run['ttft_added_p50_ms'], run['e2e_added_p50_ms']))}"
        )
    return "\n".join(lines)


def _met(added_ms: float) -> str:
    return "met" if added_ms <= TARGET_MS else "NOT met"


async def run(cfg: argparse.Namespace) -> dict[str, Any]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench/state_store.py needs redis-server on PATH")
    loadavg = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir, processes() as procs:
        port = free_port()
        redis = procs.start(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
        )
        wait_port(port, redis)
        redis_url = f"redis://127.0.0.1:{port}/0"
        path = await bench_path(cfg.path_replicas, redis_url, cfg.path_runs, cfg.rounds)
        proxy = await bench_proxy(cfg, redis_url, procs)
    path_added = (path["redis"]["p50_us"] - path["memory"]["p50_us"]) / 1000
    runs = [
        {
            "workers": run["workers"],
            "ttft_added_p50_ms": run["redis"]["ttft_p50_ms"] - run["memory"]["ttft_p50_ms"],
            "e2e_added_p50_ms": run["redis"]["e2e_p50_ms"] - run["memory"]["e2e_p50_ms"],
        }
        for run in proxy["runs"]
    ]
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in loadavg],
            "python": platform.python_version(),
        },
        "decision_path": path,
        "proxy": proxy,
        "verdict": {
            "target_ms": TARGET_MS,
            "path_added_p50_ms": path_added,
            "proxy": runs,
            "met": max([path_added] + [max(r["ttft_added_p50_ms"], r["e2e_added_p50_ms"]) for r in runs]) <= TARGET_MS,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (fewer requests)")
    parser.add_argument("--replicas", type=int, default=4, help="emulated replicas behind the routers")
    parser.add_argument("--workers", default="1,4", help="closed-loop client counts to run, comma-separated")
    parser.add_argument("--requests", type=int, default=4000, help="requests per store through the proxy")
    parser.add_argument("--peer-rate", type=float, default=50.0, help="req/s through the third (peer) router")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved segments per store (decision path)")
    parser.add_argument("--path-replicas", type=int, default=16, help="replicas in the decision-path fleet")
    parser.add_argument("--path-runs", type=int, default=40_000, help="decision-path requests per store")
    parser.add_argument("--output", type=Path, default=RESULTS)
    cfg = parser.parse_args(argv)
    cfg.workers = [int(w) for w in str(cfg.workers).split(",")]
    if cfg.quick:
        cfg.requests, cfg.path_runs, cfg.rounds = 800, 8000, 4
    report = asyncio.run(run(cfg))
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
