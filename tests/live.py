"""Helpers to run emulated replicas over real loopback HTTP inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import aiohttp
import openai
from aiohttp import web

from emulator.profiles import EngineProfile, load_profile
from emulator.server import Replica, ReplicaConfig
from router.app import RouterService
from router.config import load_settings
from router.fleet import Health

OPEN_CLIENTS: list[openai.AsyncOpenAI] = []


def openai_client(base_url: str) -> openai.AsyncOpenAI:
    """The official client, no retries (tests see every failure); closed by the conftest fixture."""
    c = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
    OPEN_CLIENTS.append(c)
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LiveReplica:
    replica: Replica
    url: str

    @property
    def api(self) -> str:
        return f"{self.url}/v1"


@asynccontextmanager
async def live_replica(
    profile: EngineProfile | str = "h100-llama3-8b", speed: float = 50.0, **config: object
) -> AsyncIterator[LiveReplica]:
    """An emulated replica listening on a free loopback port for the duration of the block."""
    prof = load_profile(profile) if isinstance(profile, str) else profile
    replica = Replica(ReplicaConfig(profile=prof, speed=speed, **config))  # type: ignore[arg-type]
    runner = web.AppRunner(replica.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield LiveReplica(replica, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@dataclass
class LiveRouter:
    service: RouterService

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.service.admin_port}"


@asynccontextmanager
async def live_router(
    replicas: list[str], wait_ready: int | None = None, **settings: object
) -> AsyncIterator[LiveRouter]:
    """A router on free loopback ports, in front of ``replicas``; waits until ``wait_ready`` replicas
    (default: all) are healthy."""
    overrides: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "admin_port": 0,
        "replicas": replicas,
        "log_json": False,
        "health": {"interval_s": 0.1, "timeout_s": 1.0},
        "scrape_interval_s": 0.2,
    }
    overrides.update(settings)
    service = RouterService(load_settings(overrides))
    await service.start()
    try:
        want = len(replicas) if wait_ready is None else wait_ready
        deadline = asyncio.get_running_loop().time() + 10
        while sum(1 for r in service.fleet.all() if r.health is Health.HEALTHY) < want:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("replicas did not become healthy")
            await asyncio.sleep(0.02)
        yield LiveRouter(service)
    finally:
        await service.stop()


@dataclass
class EngineProcess:
    """An emulated replica in its own process, so a test can kill it."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def start_engine_process(*args: str, speed: float = 20.0) -> EngineProcess:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "engine", "--port", str(port), "--speed", str(speed), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return EngineProcess(proc, port)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"emulated replica on port {port} did not start") from None
            time.sleep(0.05)


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port (never 6379), killable and restartable in place."""

    port: int
    workdir: str
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--protected-mode", "no", *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients, as when a Redis pod dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def command(self, *args: str) -> str:
        """Run one ``redis-cli`` command against this server and return its raw output."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), "--no-raw", *args], capture_output=True, check=True, timeout=10
        )
        return out.stdout.decode().strip()


@contextmanager
def redis_server(*extra_args: str) -> Iterator[RedisServer]:
    port = free_port()
    while port == 6379:
        port = free_port()
    with tempfile.TemporaryDirectory(prefix="fleetroute-redis-") as workdir:
        server = RedisServer(port, workdir, extra_args=list(extra_args))
        server.start()
        try:
            yield server
        finally:
            server.kill()


@dataclass
class RouterProcess:
    """``fleetroute serve`` in its own process (own event loop, as in production), killable."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def kill(self) -> None:
        """SIGKILL the router: no cleanup of anything it shared."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_router_process(replicas: list[str], *args: str) -> RouterProcess:
    """Spawn ``fleetroute serve`` in front of ``replicas`` with extra flags ``args`` (not yet ready)."""
    port = free_port()
    argv = [sys.executable, "-m", "router.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--admin-port", "0", "--log-level", "WARNING", *args]
    for url in replicas:
        argv += ["--replica", url]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return RouterProcess(proc, port)


@asynccontextmanager
async def router_process(replicas: list[str], *args: str) -> AsyncIterator[RouterProcess]:
    """A router process in front of ``replicas`` (extra ``fleetroute serve`` flags in ``args``), once /ready."""
    router = start_router_process(replicas, *args)
    proc = router.proc
    try:
        deadline = asyncio.get_running_loop().time() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"fleetroute serve exited with {proc.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{router.url}/ready") as resp:
                        if resp.status == 200:
                            break
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError("router process did not become ready")
                await asyncio.sleep(0.05)
        yield router
    finally:
        router.kill()
