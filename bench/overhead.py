"""Router overhead: the latency a router adds to a streaming request, and how many it proxies per CPU-second.

Measured side by side, in one run, on one emulated fleet, for four targets: ``direct`` (the client
round-robins over the replicas itself, no router), ``fleetroute``, ``sglang-router`` and ``vllm-router``
(the Rust routers from PyPI, skipped with a note when not installed). Every router uses ``round_robin``,
so what differs is the cost of proxying, not the quality of routing.

Layout (on a 2-core machine): the replicas (one ``fleetroute engine --replicas N`` process) and this load
generator share core 0 (``taskset -c 0``); the routers run on core 1 (``taskset -c 1``), where the only
busy process of ours at any time is the router under test (the others sit idle between their turns). The engine
runs at a high ``--speed`` with a short fixed prompt and ``ignore_eos`` outputs, so a request's latency
is almost entirely HTTP and event-loop time: the part a router can add to.

Two measurements:

1. Fixed open-loop rates (uniformly spaced arrivals). Each rate's duration is split into rounds; in each
   round every target gets one segment, in an order that rotates between rounds, so slow drift of the
   machine is shared out. Added latency = router percentile − direct percentile at the same rate, for
   TTFT (first content token) and end-to-end latency, with a bootstrap 95 % interval. The router's CPU
   time per request at each rate is recorded too: that comparison holds at equal load.
2. Maximum rate: a closed loop of C concurrent streams per target. Completed requests/s, and the
   router's CPU time over the same window (its kernel CPU-time clock: ``utime + stime`` of all threads
   and child processes, in ns) give requests per router CPU-second: proxied requests/s per router core.

With ``--baseline DIR`` (a checkout of fleetroute, e.g. ``git worktree add /tmp/base HEAD``), that checkout's
router runs too, as target ``fleetroute-baseline``, interleaved with the others like any target: a change
to the router is measured against the code it replaces in the same run, on the same fleet and machine.

Usage: ``python bench/overhead.py --output DIR``; writes ``overhead.json``, ``overhead.md`` and
``overhead.png`` to DIR and prints the Markdown table. Every process it starts is in its own session and
is killed on the way out, on errors and on Ctrl-C / SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import aiohttp
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emulator.tokenizer import chat_overhead_tokens, synthesize_text

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "bench" / "results" / "overhead"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CHAT_PATH = "/v1/chat/completions"
HEADERS = {"Content-Type": "application/json"}  # both Rust routers reject bodies without it
DIRECT = "direct"
FLEETROUTE = "fleetroute"
BASELINE = "fleetroute-baseline"  # fleetroute from another checkout (--baseline)
SGLANG = "sglang-router"
VLLM = "vllm-router"
ALL_TARGETS = (DIRECT, FLEETROUTE, SGLANG, VLLM)
RUST_ROUTERS = (SGLANG, VLLM)
# Targets of the brief: added p50 ≤ 0.5 ms, added p99 ≤ 2 ms, proxied requests per core ≥ the Rust routers'.
TARGET_P50_MS = 0.5
TARGET_P99_MS = 2.0
READY_TIMEOUT_S = 45.0  # sglang-router retries a worker's /health with a 1–5 s backoff
REQUEST_TIMEOUT_S = 30.0
BOOTSTRAP = 400
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A content delta with at least one character: the role chunk carries ``"content":""`` and does not count.
CONTENT = re.compile(rb'"content":"[^"]')
DONE = b"data: [DONE]"
STALL_S = 0.035  # a delayed ACK holding back a Nagle-buffered segment costs ~40 ms on Linux


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True, slots=True)
class Config:
    output: Path
    replicas: int
    speed: float
    prompt_tokens: int
    output_tokens: int
    rates: tuple[float, ...]
    duration_s: float
    rounds: int
    warmup_s: float
    concurrency: int
    max_duration_s: float
    ramp_s: float
    targets: tuple[str, ...]
    pin: bool
    load_core: int
    router_core: int
    nice: int
    baseline: Path | None = None


def parse_args(argv: Sequence[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="directory for overhead.{json,md,png}")
    p.add_argument("--replicas", type=int, default=4, help="emulated replicas (default 4)")
    p.add_argument("--speed", type=float, default=1000.0, help="engine speed factor: model time / K (default 1000)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length incl. chat template (default 64)")
    p.add_argument("--output-tokens", type=int, default=8, help="output tokens per request, ignore_eos (default 8)")
    p.add_argument("--rates", default="50,100,200", help="open-loop rates in req/s, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per rate per target (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds the duration is split into")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target, discarded (default 2)")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop concurrent streams (default 64)")
    p.add_argument("--max-duration", type=float, default=10.0, help="closed-loop seconds per target (default 10)")
    p.add_argument("--ramp", type=float, default=1.0, help="closed-loop seconds before the window opens")
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help="subset of: " + ", ".join(ALL_TARGETS))
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--load-core", type=int, default=0, help="core of the load generator and replicas (default 0)")
    p.add_argument("--router-core", type=int, default=1, help="core of the routers (default 1)")
    p.add_argument(
        "--baseline",
        type=Path,
        help="a fleetroute checkout (e.g. a git worktree of the commit before a change) whose router also runs, "
        f"as target {BASELINE!r}",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of this run and every process it starts; negative (root only) shields the measurement "
        "from other jobs on a shared machine (default 0)",
    )
    a = p.parse_args(argv)
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown or DIRECT not in targets:
        p.error(f"--targets must include {DIRECT!r} and name only {', '.join(ALL_TARGETS)} (got {a.targets!r})")
    rates = tuple(float(r) for r in a.rates.split(",") if r.strip())
    if not rates or min(rates) <= 0:
        p.error("--rates must be positive numbers")
    if a.baseline is not None and not (a.baseline / "router" / "cli.py").is_file():
        p.error(f"--baseline {a.baseline} is not a fleetroute checkout (no router/cli.py)")
    if a.prompt_tokens <= chat_overhead_tokens(1):
        p.error(f"--prompt-tokens must exceed the chat template's {chat_overhead_tokens(1)} tokens")
    return Config(
        output=a.output,
        replicas=a.replicas,
        speed=a.speed,
        prompt_tokens=a.prompt_tokens,
        output_tokens=a.output_tokens,
        rates=rates,
        duration_s=a.duration,
        rounds=max(1, a.rounds),
        warmup_s=a.warmup,
        concurrency=a.concurrency,
        max_duration_s=a.max_duration,
        ramp_s=a.ramp,
        targets=tuple(t for t in ALL_TARGETS if t in targets) + ((BASELINE,) if a.baseline is not None else ()),
        pin=not a.no_pin,
        load_core=a.load_core,
        router_core=a.router_core,
        nice=a.nice,
        baseline=a.baseline.resolve() if a.baseline is not None else None,
    )


# --------------------------------------------------------------------------------------------- processes


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` (all threads, dead ones included) plus its live descendants.

    Read from the kernel's per-process CPU-time clock (nanoseconds; what ``clock_getcpuclockid`` returns),
    as ``/proc/PID/stat`` counts in 10 ms ticks: too coarse for per-request figures at low rates.
    """
    total = 0.0
    for p in (pid, *_descendants(pid)):
        try:
            total += time.clock_gettime((~p << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
        except OSError:
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{p}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def proc_memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB, summed over ``pid`` and its descendants."""
    rss = hwm = 0
    for p in (pid, *_descendants(pid)):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
    return rss / 1024, hwm / 1024


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out.append(int(child))
                out.extend(_descendants(int(child)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port_range(count: int) -> int:
    """A first port of ``count`` consecutive free loopback ports (the engine takes a base port)."""
    for _ in range(200):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports found")


class Processes:
    """Every subprocess of the run, each in its own session; all are stopped on exit, whatever happened.

    Own sessions keep Ctrl-C from reaching them half-way; ``close`` sends SIGTERM to each group, then
    SIGKILL to whatever is left after a grace period.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, argv: list[str], core: int | None, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        command = (["taskset", "-c", str(core)] if core is not None else []) + argv
        log = (self.log_dir / f"{name}.log").open("wb")
        try:
            proc = subprocess.Popen(
                command,
                cwd=cwd,  # ``python -m router.cli`` imports the router of this directory
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self._procs.append((name, proc, log))
        return proc

    def check_alive(self) -> None:
        for name, proc, _ in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir / (name + '.log')}")

    def close(self) -> None:
        for _, proc, _ in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc, log in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            log.close()
        self._procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- targets


@dataclass(slots=True)
class Target:
    """Where requests go: the replicas themselves (``direct``) or one router in front of them."""

    name: str
    urls: list[str]
    pid: int | None = None
    version: str = ""


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _vllm_router_binary() -> str | None:
    beside = Path(sys.executable).with_name("vllm-router")
    return str(beside) if beside.exists() else shutil.which("vllm-router")


def router_command(name: str, port: int, replicas: list[str]) -> list[str] | None:
    """The command line of a router on ``port`` with round_robin, or None when it is not installed."""
    if name in (FLEETROUTE, BASELINE):
        reps = [a for url in replicas for a in ("--replica", url)]
        return [
            sys.executable, "-m", "router.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *reps,
            "--policy", "round_robin", "--admin-port", "0", "--log-level", "WARNING",
        ]  # fmt: skip
    if name == SGLANG:
        if importlib.util.find_spec("sglang_router") is None:
            return None
        # --host/--prometheus-host: it binds 0.0.0.0 otherwise.
        return [
            sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *replicas, "--policy", "round_robin", "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(free_port()), "--log-level", "warn",
        ]  # fmt: skip
    if name == VLLM:
        binary = _vllm_router_binary()
        if binary is None:
            return None
        # It binds its port only once a worker is healthy, checking every --worker-startup-check-interval s.
        return [
            binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *replicas, "--policy", "round_robin",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), "--log-level", "warning",
            "--worker-startup-check-interval", "1",
        ]  # fmt: skip
    raise ValueError(name)


def router_version(name: str, baseline: Path | None = None) -> str:
    if name == FLEETROUTE:
        return _package_version("fleetroute") + _git_commit(REPO)
    if name == BASELINE and baseline is not None:
        return _package_version("fleetroute") + _git_commit(baseline)
    return _package_version(name)


def _git_commit(path: Path) -> str:
    """`` (commit abc1234, modified)`` for a git checkout, so a report says which code each target ran."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "router"], capture_output=True)
    except OSError:
        return ""
    if head.returncode != 0:
        return ""
    return f" (commit {head.stdout.strip()}{', router/ modified' if dirty.stdout.strip() else ''})"


# ------------------------------------------------------------------------------------------------ client


@dataclass(slots=True)
class Sample:
    ttft: float  # seconds from send to the first content token
    e2e: float  # seconds from send to the end of the stream
    end: float  # perf_counter at the end of the stream


@dataclass(slots=True)
class Outcome:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    lags: list[float] = field(default_factory=list)  # open loop: send time minus scheduled time

    def fail(self, reason: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = reason


class Client:
    """Streaming chat requests to one target (round-robin over its URLs), timed with ``perf_counter``."""

    def __init__(self, session: aiohttp.ClientSession, target: Target, body: bytes, output_tokens: int) -> None:
        self._session = session
        self._urls = itertools.cycle([url + CHAT_PATH for url in target.urls])
        self._body = body
        self._output_tokens = output_tokens

    async def one(self, outcome: Outcome) -> None:
        url = next(self._urls)
        start = time.perf_counter()
        ttft: float | None = None
        parts: list[bytes] = []
        tail = b""
        try:
            async with self._session.post(url, data=self._body, headers=HEADERS) as resp:
                if resp.status != 200:
                    text = (await resp.read())[:200].decode(errors="replace")
                    outcome.fail(f"HTTP {resp.status}: {text}")
                    return
                async for chunk in resp.content.iter_any():
                    if ttft is None:
                        if CONTENT.search(tail + chunk):
                            ttft = time.perf_counter() - start
                        tail = chunk[-16:]
                    parts.append(chunk)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            outcome.fail(f"{type(exc).__name__}: {exc}")
            return
        end = time.perf_counter()
        body = b"".join(parts)
        tokens = len(CONTENT.findall(body))
        if ttft is None or tokens != self._output_tokens or DONE not in body[-32:]:
            outcome.fail(f"incomplete stream: {tokens} content tokens, ends {body[-40:]!r}")
            return
        outcome.samples.append(Sample(ttft, end - start, end))


async def open_loop(client: Client, rate: float, duration_s: float) -> Outcome:
    """Uniformly spaced arrivals at ``rate``, whatever the responses do (no coordinated omission)."""
    loop = asyncio.get_running_loop()
    outcome = Outcome()
    count = max(1, round(rate * duration_s))
    t0 = loop.time() + 0.005
    tasks: list[asyncio.Task[None]] = []
    for i in range(count):
        due = t0 + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        outcome.lags.append(loop.time() - due)
        tasks.append(asyncio.create_task(client.one(outcome)))
    await asyncio.gather(*tasks)
    return outcome


def core_jiffies() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per core from ``/proc/stat``: what the whole machine did, not just our processes."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]
            out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))  # minus idle and iowait
    return out


@dataclass(slots=True)
class Window:
    """What happened between two :meth:`Meter.mark` calls: wall time, our processes' CPU, each core's load.

    ``*_core_other`` is the share of a core used by anything but our processes on it: on a shared machine
    it says which segments other jobs disturbed.
    """

    wall_s: float = 0.0
    router_cpu_s: float = 0.0
    replicas_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    router_core_other: float = 0.0
    load_core_other: float = 0.0


@dataclass(frozen=True, slots=True)
class Mark:
    at: float
    router: float
    replicas: float
    client: float
    cores: dict[int, tuple[int, int]]


class Meter:
    """Snapshots of time and CPU for one target; two snapshots make a :class:`Window`."""

    def __init__(self, router_pid: int | None, replicas_pid: int, cfg: Config) -> None:
        self._router_pid = router_pid
        self._replicas_pid = replicas_pid
        self._cores = (cfg.load_core, cfg.router_core) if cfg.pin else None

    def mark(self) -> Mark:
        router = proc_cpu_seconds(self._router_pid) if self._router_pid is not None else 0.0
        return Mark(
            time.perf_counter(), router, proc_cpu_seconds(self._replicas_pid), time.process_time(), core_jiffies()
        )

    def window(self, a: Mark, b: Mark) -> Window:
        w = Window(b.at - a.at, b.router - a.router, b.replicas - a.replicas, b.client - a.client)
        if self._cores is not None and w.wall_s > 0:
            load, router = self._cores

            def busy(core: int) -> float:
                (b0, t0), (b1, t1) = a.cores[core], b.cores[core]
                return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

            w.router_core_other = max(0.0, busy(router) - w.router_cpu_s / w.wall_s)
            w.load_core_other = max(0.0, busy(load) - (w.replicas_cpu_s + w.client_cpu_s) / w.wall_s)
        return w


async def closed_loop(
    client: Client, concurrency: int, ramp_s: float, duration_s: float, meter: Meter
) -> tuple[Outcome, Window, int]:
    """``concurrency`` streams back to back; counts completions inside a window opened after a ramp."""
    loop = asyncio.get_running_loop()
    outcome = Outcome()
    stop = loop.time() + ramp_s + duration_s
    marks: dict[str, Mark] = {}

    async def worker() -> None:
        while loop.time() < stop:
            await client.one(outcome)

    loop.call_later(ramp_s, lambda: marks.__setitem__("open", meter.mark()))
    loop.call_at(stop, lambda: marks.__setitem__("close", meter.mark()))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    window = meter.window(marks["open"], marks["close"])
    t0, t1 = marks["open"].at, marks["close"].at
    outcome.samples = [s for s in outcome.samples if t0 <= s.end <= t1]
    return outcome, window, len(outcome.samples)


async def wait_until_routing(session: aiohttp.ClientSession, target: Target, procs: Processes) -> None:
    """Poll with a real request: sglang-router listens before it has registered a worker."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        procs.check_alive()
        try:
            async with session.post(target.urls[0] + CHAT_PATH, json=body, timeout=aiohttp.ClientTimeout(2)) as r:
                if r.status == 200:
                    await r.read()
                    return
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target.name} did not route a request within {READY_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------- results


def pct_ms(values: Sequence[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values), q) * 1000) if len(values) else float("nan")


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values)
    if not len(arr):
        return {}
    return {
        "mean": float(arr.mean() * 1000),
        "p50": pct_ms(arr, 50),
        "p90": pct_ms(arr, 90),
        "p99": pct_ms(arr, 99),
        "max": float(arr.max() * 1000),
    }


def diff_ci_ms(a: np.ndarray, b: np.ndarray, q: float, rng: np.random.Generator) -> list[float]:
    """Bootstrap 95 % interval of percentile(a) − percentile(b): how much of an added figure is noise."""
    if not len(a) or not len(b):
        return [float("nan"), float("nan")]
    da = np.percentile(a[rng.integers(0, len(a), (BOOTSTRAP, len(a)))], q, axis=1)
    db = np.percentile(b[rng.integers(0, len(b), (BOOTSTRAP, len(b)))], q, axis=1)
    lo, hi = np.percentile((da - db) * 1000, [2.5, 97.5])
    return [float(lo), float(hi)]


@dataclass(slots=True)
class RateCell:
    """One target at one open-loop rate, pooled over rounds."""

    rate: float
    target: str
    outcome: Outcome = field(default_factory=Outcome)
    sent: int = 0
    router_cpu_s: float = 0.0
    round_p50_e2e_ms: list[float] = field(default_factory=list)
    round_cpu_us_per_req: list[float] = field(default_factory=list)  # per segment: how noisy the pooled figure is
    router_core_other: list[float] = field(default_factory=list)
    load_core_other: list[float] = field(default_factory=list)


def rate_rows(cells: dict[tuple[float, str], RateCell], cfg: Config, targets: list[str]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for rate in cfg.rates:
        direct = cells[(rate, DIRECT)].outcome.samples
        d_ttft = np.array([s.ttft for s in direct])
        d_e2e = np.array([s.e2e for s in direct])
        for name in targets:
            cell = cells[(rate, name)]
            ttft = np.array([s.ttft for s in cell.outcome.samples])
            e2e = np.array([s.e2e for s in cell.outcome.samples])
            row: dict[str, Any] = {
                "rate": rate,
                "target": name,
                "sent": cell.sent,
                "completed": len(cell.outcome.samples),
                "errors": cell.outcome.errors,
                "first_error": cell.outcome.first_error,
                "ttft_ms": summary_ms(list(ttft)),
                "e2e_ms": summary_ms(list(e2e)),
                "client_lag_ms": {"p50": pct_ms(cell.outcome.lags, 50), "p99": pct_ms(cell.outcome.lags, 99)},
                "stalled": int((e2e >= STALL_S).sum()),
                "round_p50_e2e_ms": cell.round_p50_e2e_ms,
                "round_cpu_us_per_req": cell.round_cpu_us_per_req,
                "router_core_other_max": max(cell.router_core_other, default=0.0),
                "load_core_other_max": max(cell.load_core_other, default=0.0),
            }
            if name != DIRECT:
                row["added_ms"] = {
                    "ttft_p50": pct_ms(ttft, 50) - pct_ms(d_ttft, 50),
                    "ttft_p99": pct_ms(ttft, 99) - pct_ms(d_ttft, 99),
                    "e2e_p50": pct_ms(e2e, 50) - pct_ms(d_e2e, 50),
                    "e2e_p99": pct_ms(e2e, 99) - pct_ms(d_e2e, 99),
                }
                row["added_ci95_ms"] = {
                    "ttft_p50": diff_ci_ms(ttft, d_ttft, 50, rng),
                    "ttft_p99": diff_ci_ms(ttft, d_ttft, 99, rng),
                    "e2e_p50": diff_ci_ms(e2e, d_e2e, 50, rng),
                    "e2e_p99": diff_ci_ms(e2e, d_e2e, 99, rng),
                }
                done = len(cell.outcome.samples) + cell.outcome.errors
                row["router_cpu_us_per_req"] = cell.router_cpu_s / done * 1e6 if done else float("nan")
            rows.append(row)
    return rows


def max_row(
    target: Target, cfg: Config, outcome: Outcome, window: Window, completed: int, memory: tuple[float, float]
) -> dict[str, Any]:
    wall = window.wall_s or float("nan")
    row: dict[str, Any] = {
        "target": target.name,
        "concurrency": cfg.concurrency,
        "window_s": window.wall_s,
        "completed": completed,
        "errors": outcome.errors,
        "first_error": outcome.first_error,
        "req_per_s": completed / wall,
        "ttft_ms": summary_ms([s.ttft for s in outcome.samples]),
        "e2e_ms": summary_ms([s.e2e for s in outcome.samples]),
        # core 0: the replicas and this client together; near 1.0 means the load side was the limit
        "load_core_util": (window.replicas_cpu_s + window.client_cpu_s) / wall,
        "router_core_other": window.router_core_other,
        "load_core_other": window.load_core_other,
    }
    if target.pid is not None:
        row["router_cpu_s"] = window.router_cpu_s
        row["router_core_util"] = window.router_cpu_s / wall
        row["req_per_cpu_s"] = completed / window.router_cpu_s if window.router_cpu_s > 0 else float("nan")
        row["rss_mib"], row["peak_rss_mib"] = memory
    return row


def _f(value: float, digits: int = 2) -> str:
    return "—" if value != value else f"{value:.{digits}f}"  # NaN → dash


def _ci(value: float, ci: list[float]) -> str:
    return f"{_f(value)} [{_f(ci[0])}, {_f(ci[1])}]"


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "### Added latency at fixed rates (ms; added = router − direct at the same rate, 95 % bootstrap CI)",
        "",
        f"{cfg['replicas']} emulated replicas at speed {cfg['speed']:g}, {cfg['prompt_tokens']}-token prompt, "
        f"{cfg['output_tokens']} output tokens, streaming chat, round_robin; "
        f"{cfg['duration_s']:g} s per rate per target in {cfg['rounds']} interleaved rounds.",
        "",
        "| rate | target | ok/sent | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | added TTFT p50 | added TTFT p99 "
        f"| added E2E p50 | added E2E p99 | router CPU µs/req | E2E ≥ {STALL_S * 1000:.0f} ms "
        "| other load on router core |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["open_loop"]:
        t, e = row["ttft_ms"], row["e2e_ms"]
        head = (
            f"| {row['rate']:g} | {row['target']} | {row['completed']}/{row['sent']} "
            f"| {_f(t.get('p50', float('nan')))} | {_f(t.get('p99', float('nan')))} "
            f"| {_f(e.get('p50', float('nan')))} | {_f(e.get('p99', float('nan')))} "
        )
        if "added_ms" in row:
            a, ci = row["added_ms"], row["added_ci95_ms"]
            head += (
                f"| {_ci(a['ttft_p50'], ci['ttft_p50'])} | {_ci(a['ttft_p99'], ci['ttft_p99'])} "
                f"| {_ci(a['e2e_p50'], ci['e2e_p50'])} | {_ci(a['e2e_p99'], ci['e2e_p99'])} "
                f"| {_f(row['router_cpu_us_per_req'], 0)} | {row['stalled']} "
            )
        else:
            head += f"| — | — | — | — | — | {row['stalled']} "
        head += f"| {row['router_core_other_max']:.0%} |"
        lines.append(head)
    lines += [
        "",
        f"### Maximum rate: closed loop, {cfg['concurrency']} concurrent streams, {cfg['max_duration_s']:g} s window",
        "",
        "| target | req/s | errors | E2E p50 ms | E2E p99 ms | router core util | req per router CPU-s "
        "| load core util | other load on router core | RSS MiB (peak) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["max_rate"]:
        e = row["e2e_ms"]
        rss = f"{row['rss_mib']:.0f} ({row['peak_rss_mib']:.0f})" if "rss_mib" in row else "—"
        lines.append(
            f"| {row['target']} | {_f(row['req_per_s'], 0)} | {row['errors']} | {_f(e.get('p50', float('nan')))} "
            f"| {_f(e.get('p99', float('nan')))} | {_f(row.get('router_core_util', float('nan')))} "
            f"| {_f(row.get('req_per_cpu_s', float('nan')), 0)} | {_f(row['load_core_util'])} "
            f"| {row['router_core_other']:.0%} | {rss} |"
        )
    verdict = report.get("verdict")
    if verdict:
        lines += ["", "### fleetroute against the brief", ""]
        lines += [f"- {line}" for line in verdict["lines"]]
    if report["notes"]:
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """fleetroute against the brief's numbers, from the worst rate (the targets are not per-rate)."""
    ours = [r for r in report["open_loop"] if r["target"] == FLEETROUTE]
    if not ours:
        return {}
    worst = {k: max(r["added_ms"][k] for r in ours) for k in ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99")}
    p50_ok = max(worst["ttft_p50"], worst["e2e_p50"]) <= TARGET_P50_MS
    p99_ok = max(worst["ttft_p99"], worst["e2e_p99"]) <= TARGET_P99_MS
    lines = [
        f"added p50, worst rate: TTFT {worst['ttft_p50']:.2f} ms, E2E {worst['e2e_p50']:.2f} ms "
        f"(target ≤ {TARGET_P50_MS} ms): {'met' if p50_ok else 'NOT met'}",
        f"added p99, worst rate: TTFT {worst['ttft_p99']:.2f} ms, E2E {worst['e2e_p99']:.2f} ms "
        f"(target ≤ {TARGET_P99_MS} ms): {'met' if p99_ok else 'NOT met'}",
    ]
    out: dict[str, Any] = {"worst_added_ms": worst, "p50_met": p50_ok, "p99_met": p99_ok}
    per_core = {r["target"]: r.get("req_per_cpu_s", float("nan")) for r in report["max_rate"] if r["target"] != DIRECT}
    rust = {k: v for k, v in per_core.items() if k in RUST_ROUTERS and v == v}
    if FLEETROUTE in per_core and rust:
        best = max(rust, key=lambda k: rust[k])
        ok = per_core[FLEETROUTE] >= rust[best]
        out["per_core_met"] = ok
        lines.append(
            f"requests per router CPU-second: fleetroute {per_core[FLEETROUTE]:.0f} vs {best} {rust[best]:.0f} "
            f"({per_core[FLEETROUTE] / rust[best]:.2f}×): {'met' if ok else 'NOT met'}"
        )
        cpu = {
            r["target"]: r["router_cpu_us_per_req"]
            for r in report["open_loop"]
            if r["rate"] == max(report["config"]["rates"]) and "router_cpu_us_per_req" in r
        }
        if FLEETROUTE in cpu and best in cpu:
            lines.append(
                f"router CPU per request at {max(report['config']['rates']):g} req/s: fleetroute "
                f"{cpu[FLEETROUTE]:.0f} µs vs {best} {cpu[best]:.0f} µs"
            )
    lines += _against_baseline(report)
    out["lines"] = lines
    return out


def _against_baseline(report: dict[str, Any]) -> list[str]:
    """fleetroute against ``--baseline`` (the same router before a change), from the same run."""
    per_core = {r["target"]: r.get("req_per_cpu_s", float("nan")) for r in report["max_rate"]}
    if BASELINE not in per_core or FLEETROUTE not in per_core:
        return []
    lines = [
        f"against the baseline (closed loop): {per_core[FLEETROUTE]:.0f} vs {per_core[BASELINE]:.0f} requests per "
        f"router CPU-second ({per_core[FLEETROUTE] / per_core[BASELINE]:.2f}×)"
    ]
    rows = {(r["rate"], r["target"]): r for r in report["open_loop"]}
    for rate in report["config"]["rates"]:
        ours, base = rows.get((rate, FLEETROUTE)), rows.get((rate, BASELINE))
        if ours is None or base is None:
            continue
        lines.append(
            f"against the baseline at {rate:g} req/s: CPU {ours['router_cpu_us_per_req']:.0f} vs "
            f"{base['router_cpu_us_per_req']:.0f} µs/req, added TTFT p50 {ours['added_ms']['ttft_p50']:.2f} vs "
            f"{base['added_ms']['ttft_p50']:.2f} ms, p99 {ours['added_ms']['ttft_p99']:.2f} vs "
            f"{base['added_ms']['ttft_p99']:.2f} ms"
        )
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    routers = [t for t in report["targets"] if t != DIRECT]
    rates = report["config"]["rates"]
    fig = Figure(figsize=(15, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    colors = {FLEETROUTE: "#1f77b4", BASELINE: "#9ecae1", SGLANG: "#d62728", VLLM: "#2ca02c"}
    rows = {(r["rate"], r["target"]): r for r in report["open_loop"]}
    width = 0.8 / max(1, len(routers))
    for ax, q, target in ((axes[0], "p50", TARGET_P50_MS), (axes[1], "p99", TARGET_P99_MS)):
        _added_panel(ax, q, target, routers, rates, rows, width, colors)
    ax = axes[2]
    per_core = [r for r in report["max_rate"] if "req_per_cpu_s" in r]
    names = [r["target"] for r in per_core]
    values = [r["req_per_cpu_s"] for r in per_core]
    bars = ax.bar(names, values, color=[colors.get(n, "grey") for n in names])
    for bar, row in zip(bars, per_core, strict=True):
        ax.annotate(
            f"{row['req_per_cpu_s']:.0f}\n({row['req_per_s']:.0f} req/s,\n{row['router_core_util']:.0%} core)",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_title(
        f"proxied streaming requests per router CPU-second\n(closed loop, {report['config']['concurrency']} streams)"
    )
    ax.set_ylabel("requests / CPU-second")
    ax.margins(y=0.25)
    fig.suptitle("Router overhead vs direct-to-replica, same emulated fleet, one run")
    fig.tight_layout()
    fig.savefig(path)


def _added_panel(
    ax: Axes,
    q: str,
    target_ms: float,
    routers: list[str],
    rates: list[float],
    rows: dict[tuple[float, str], dict[str, Any]],
    width: float,
    colors: dict[str, str],
) -> None:
    x = np.arange(len(rates))
    top = 5 * target_ms  # a 40 ms stall would flatten every sub-millisecond bar: clip, and print its value
    lows: list[float] = [0.0]
    for i, name in enumerate(routers):
        offs = x - 0.4 + width * (i + 0.5)
        e2e = [rows[(r, name)]["added_ms"][f"e2e_{q}"] for r in rates]
        ttft = [rows[(r, name)]["added_ms"][f"ttft_{q}"] for r in rates]
        ci = np.array([rows[(r, name)]["added_ci95_ms"][f"e2e_{q}"] for r in rates])
        err = np.abs(ci.T - np.array(e2e))
        ax.bar(offs, e2e, width * 0.9, color=colors.get(name, "grey"), label=f"{name} (E2E)", yerr=err, capsize=2)
        ax.scatter(
            offs,
            np.minimum(ttft, top),
            marker="_",
            s=120,
            color="black",
            zorder=3,
            label="TTFT-based" if i == 0 else None,
        )
        for xpos, value in zip(offs, e2e, strict=True):
            if value > top:
                ax.annotate(f"{value:.0f}↑", (xpos, top), ha="center", va="top", fontsize=8, color="white")
        lows += [float(v) for v in ci[:, 0]] + ttft
    ax.set_ylim(min(lows) * 1.1 - 0.1 * target_ms, top)
    ax.axhline(target_ms, color="black", linestyle="--", linewidth=1, label=f"target {target_ms} ms")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xticks(x, [f"{r:g} req/s" for r in rates])
    ax.set_ylabel("added latency (ms)")
    ax.set_title(f"added {q} latency vs direct (95 % CI; clipped at {top:g} ms)")
    ax.legend(fontsize=8, loc="upper left")


# -------------------------------------------------------------------------------------------------- run


def prompt_body(cfg: Config) -> bytes:
    """One fixed request: the chat renders to exactly ``prompt_tokens`` tokens in the emulator."""
    text = synthesize_text(cfg.prompt_tokens - chat_overhead_tokens(1), 7)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": cfg.output_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    return json.dumps(body).encode()


def estimate_seconds(cfg: Config, targets: int) -> float:
    return targets * (cfg.warmup_s + len(cfg.rates) * cfg.duration_s + cfg.ramp_s + cfg.max_duration_s + 2) + 20


def machine_busy(seconds: float = 1.0) -> dict[int, float]:
    """Each core's busy share before anything starts: a loaded machine makes every figure noisier."""
    a = core_jiffies()
    time.sleep(seconds)
    b = core_jiffies()
    return {c: (b[c][0] - a[c][0]) / max(1, b[c][1] - a[c][1]) for c in a}


async def run(cfg: Config, procs: Processes, notes: list[str]) -> dict[str, Any]:
    busy = await asyncio.to_thread(machine_busy)
    if max(busy.values()) > 0.1:
        shares = ", ".join(f"core {c} {v:.0%}" for c, v in busy.items())
        notes.append(f"the machine was already busy before the run ({shares}): expect noisy figures")
        print(f"warning: machine already busy ({shares})", file=sys.stderr)
    cores = (cfg.load_core, cfg.router_core) if cfg.pin else (None, None)
    engine_port = free_port_range(cfg.replicas)
    replicas = [f"http://127.0.0.1:{engine_port + i}" for i in range(cfg.replicas)]
    engine = procs.start(
        "replicas",
        [
            sys.executable, "-m", "router.cli", "engine", "--replicas", str(cfg.replicas),
            "--base-port", str(engine_port), "--speed", f"{cfg.speed:g}", "--model", MODEL,
        ],
        cores[0],
    )  # fmt: skip
    targets = [Target(DIRECT, replicas)]
    for name in cfg.targets:
        if name == DIRECT:
            continue
        port = free_port()
        command = router_command(name, port, replicas)
        if command is None:
            notes.append(f"{name} is not installed: skipped (pip install -e '.[bench]')")
            continue
        cwd = cfg.baseline if name == BASELINE and cfg.baseline is not None else REPO
        proc = procs.start(name, command, cores[1], cwd)
        targets.append(Target(name, [f"http://127.0.0.1:{port}"], proc.pid, router_version(name, cfg.baseline)))
    names = [t.name for t in targets]
    print(f"targets: {', '.join(names)}; about {estimate_seconds(cfg, len(targets)):.0f} s", file=sys.stderr)

    body = prompt_body(cfg)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    sessions = {
        t.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) for t in targets
    }
    try:
        clients = {t.name: Client(sessions[t.name], t, body, cfg.output_tokens) for t in targets}
        meters = {t.name: Meter(t.pid, engine.pid, cfg) for t in targets}
        probe = sessions[DIRECT]
        for url in replicas:
            await wait_until_routing(probe, Target(DIRECT, [url]), procs)
        await asyncio.gather(*(wait_until_routing(probe, t, procs) for t in targets))

        for t in targets:  # connection pools on every hop, JIT-free but cache-warm paths
            await open_loop(clients[t.name], max(cfg.rates), cfg.warmup_s)
            await asyncio.sleep(0.2)

        cells = {(rate, t.name): RateCell(rate, t.name) for rate in cfg.rates for t in targets}
        segment_s = cfg.duration_s / cfg.rounds
        for rate in cfg.rates:
            for rnd in range(cfg.rounds):
                order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
                for t in order:
                    procs.check_alive()
                    before = meters[t.name].mark()
                    got = await open_loop(clients[t.name], rate, segment_s)
                    window = meters[t.name].window(before, meters[t.name].mark())
                    cell = cells[(rate, t.name)]
                    cell.router_cpu_s += window.router_cpu_s
                    cell.router_core_other.append(window.router_core_other)
                    cell.load_core_other.append(window.load_core_other)
                    cell.sent += len(got.lags)
                    cell.outcome.samples += got.samples
                    cell.outcome.lags += got.lags
                    for _ in range(got.errors):
                        cell.outcome.fail(got.first_error or "?")
                    cell.round_p50_e2e_ms.append(pct_ms([s.e2e for s in got.samples], 50))
                    if t.pid is not None and got.lags:
                        cell.round_cpu_us_per_req.append(window.router_cpu_s / len(got.lags) * 1e6)
                    await asyncio.sleep(0.2)
            line = "  ".join(
                f"{t.name} {pct_ms([s.e2e for s in cells[(rate, t.name)].outcome.samples], 50):.2f}" for t in targets
            )
            print(f"{rate:g} req/s, E2E p50 ms: {line}", file=sys.stderr)

        max_rows = []
        for t in targets:
            procs.check_alive()
            outcome, window, completed = await closed_loop(
                clients[t.name], cfg.concurrency, cfg.ramp_s, cfg.max_duration_s, meters[t.name]
            )
            memory = proc_memory_mib(t.pid) if t.pid is not None else (0.0, 0.0)
            max_rows.append(max_row(t, cfg, outcome, window, completed, memory))
            print(f"closed loop {t.name}: {completed / window.wall_s:.0f} req/s", file=sys.stderr)
            await asyncio.sleep(0.5)
    finally:
        for s in sessions.values():
            await s.close()

    open_rows = rate_rows(cells, cfg, names)
    for name in names:
        stalled = sum(r["stalled"] for r in open_rows if r["target"] == name)
        total = sum(r["completed"] for r in open_rows if r["target"] == name)
        if stalled > 0.01 * total:
            notes.append(
                f"{name}: {stalled} of {total} open-loop requests took ≥ {STALL_S * 1000:.0f} ms; a fixed ~40 ms is "
                "the signature of Nagle's algorithm meeting a delayed ACK (no TCP_NODELAY), see docs/overhead.md"
            )
    disturbed = [(r["router_core_other_max"], f"{r['target']} at {r['rate']:g} req/s") for r in open_rows] + [
        (r["router_core_other"], f"{r['target']} closed loop") for r in max_rows
    ]
    worst = max(disturbed)
    if worst[0] > 0.05:
        notes.append(
            f"other processes used up to {worst[0]:.0%} of the router core ({worst[1]}): this machine is shared, "
            "so segments with a high 'router_core_other' in overhead.json are noisier"
        )
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "targets": names,
        "versions": {t.name: t.version for t in targets if t.name != DIRECT},
        "open_loop": open_rows,
        "max_rate": max_rows,
        "notes": notes,
        "busy_before_start": busy,
    }
    return report


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }


def write_outputs(report: dict[str, Any], out: Path) -> str:
    report["verdict"] = verdict(report)
    table = markdown(report)
    (out / "overhead.json").write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    (out / "overhead.md").write_text(table)
    plot(report, out / "overhead.png")
    return table


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same cleanup path as Ctrl-C


@contextlib.contextmanager
def pinned(cfg: Config, notes: list[str]) -> Iterator[Config]:
    """Pin this process to the load core and set its niceness (children inherit both), or say why not."""
    allowed = os.sched_getaffinity(0)
    if cfg.pin and (shutil.which("taskset") is None or not {cfg.load_core, cfg.router_core} <= allowed):
        notes.append(f"not pinned: needs taskset and cores {cfg.load_core},{cfg.router_core} (have {sorted(allowed)})")
        cfg = Config(**{**asdict(cfg), "pin": False})
    if cfg.pin:
        os.sched_setaffinity(0, {cfg.load_core})
        notes.append(
            f"load generator and replicas pinned to core {cfg.load_core}, routers to core {cfg.router_core} "
            "(taskset); one router is busy at a time"
        )
    if cfg.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, cfg.nice)  # inherited by every process started after this
            notes.append(f"all processes of the run at niceness {cfg.nice}")
        except OSError as exc:
            notes.append(f"--nice {cfg.nice} refused ({exc.strerror}): running at the default priority")
    try:
        yield cfg
    finally:
        if cfg.pin:
            os.sched_setaffinity(0, allowed)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.output.mkdir(parents=True, exist_ok=True)
    (cfg.output / "logs").mkdir(exist_ok=True)
    notes: list[str] = []
    signal.signal(signal.SIGTERM, _raise_interrupt)
    loop_factory: Any = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with (
            pinned(cfg, notes) as cfg,
            Processes(cfg.output / "logs") as procs,
            asyncio.Runner(loop_factory=loop_factory) as runner,
        ):
            report = runner.run(run(cfg, procs, notes))
    except KeyboardInterrupt:
        print("interrupted; all processes stopped", file=sys.stderr)
        return 130
    report["machine"] = machine()
    table = write_outputs(report, cfg.output)
    print(table)
    print(f"wrote {cfg.output}/overhead.{{json,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
