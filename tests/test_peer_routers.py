"""The Rust routers we benchmark against (sglang-router, vllm-router), in front of an emulated replica.

The overhead benchmark (``bench/overhead.py``) is only meaningful if the peers proxy our emulator
correctly: these tests start each router as a subprocess on loopback, send a streaming chat request and
a non-streaming completion with the official openai client, and check that everything arrived. They are
skipped, with the install command, when the ``bench`` extra is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from emulator.tokenizer import synthesize_text
from tests.live import free_port, live_replica, openai_client

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
OUTPUT_TOKENS = 7
INSTALL_HINT = "install the bench extra: pip install -e '.[bench]'"
READY_TIMEOUT_S = 30.0  # sglang-router registers a worker after a /health retry backoff of up to 5 s


def _vllm_router_binary() -> str | None:
    """The venv's script first: pytest may run from a venv that is not on PATH."""
    beside = Path(sys.executable).with_name("vllm-router")
    return str(beside) if beside.exists() else shutil.which("vllm-router")


def _sglang_command(port: int, metrics_port: int, worker: str) -> list[str]:
    if importlib.util.find_spec("sglang_router") is None:
        pytest.skip(f"sglang-router is not installed (no module sglang_router): {INSTALL_HINT}")
    # --host/--prometheus-host: it binds 0.0.0.0 otherwise.
    return [
        sys.executable, "-m", "sglang_router.launch_router",
        "--host", "127.0.0.1", "--port", str(port), "--worker-urls", worker, "--policy", "round_robin",
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), "--log-level", "warn",
    ]  # fmt: skip


def _vllm_command(port: int, metrics_port: int, worker: str) -> list[str]:
    binary = _vllm_router_binary()
    if binary is None:
        pytest.skip(f"vllm-router is not installed (no vllm-router executable): {INSTALL_HINT}")
    # It binds its port only once a worker is healthy, polling every --worker-startup-check-interval s.
    return [
        binary,
        "--host", "127.0.0.1", "--port", str(port), "--worker-urls", worker, "--policy", "round_robin",
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), "--log-level", "warning",
        "--worker-startup-check-interval", "1",
    ]  # fmt: skip


CommandFactory = Callable[[int, int, str], list[str]]
ROUTERS: dict[str, CommandFactory] = {"sglang-router": _sglang_command, "vllm-router": _vllm_command}


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


async def _wait_until_routing(url: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    """Poll with a real request: listening is not enough (sglang-router listens before it has a worker)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if proc.returncode is not None:
                pytest.fail(f"router exited with {proc.returncode}:\n{_tail(log)}")
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"router did not route within {READY_TIMEOUT_S} s:\n{_tail(log)}")
            await asyncio.sleep(0.25)


@asynccontextmanager
async def running_router(name: str, worker: str, log: Path) -> AsyncIterator[str]:
    """The router as a subprocess on free loopback ports; killed on the way out, whatever happened."""
    port, metrics_port = free_port(), free_port()
    command = ROUTERS[name](port, metrics_port, worker)
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_until_routing(url, proc, log)
        yield url
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: takes any helper process with it
        await proc.wait()


@pytest.mark.parametrize("name", sorted(ROUTERS))
async def test_peer_router_proxies_streaming_and_plain_requests(name: str, tmp_path: Path) -> None:
    async with live_replica() as replica, running_router(name, replica.url, tmp_path / f"{name}.log") as url:
        c = openai_client(f"{url}/v1")
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": synthesize_text(40, 3)}],
            max_tokens=OUTPUT_TOKENS,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        contents = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(contents) == OUTPUT_TOKENS
        finished = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finished == ["length"]

        done = await c.completions.create(
            model=MODEL, prompt=synthesize_text(64, 4), max_tokens=OUTPUT_TOKENS, extra_body={"ignore_eos": True}
        )
        assert done.choices[0].finish_reason == "length"
        assert done.choices[0].text
        assert done.usage is not None
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (64, OUTPUT_TOKENS)
