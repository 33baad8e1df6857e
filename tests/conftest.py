"""Shared fixtures: every openai client a test opens is closed before its event loop ends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests import live


@pytest.fixture(autouse=True)
async def _close_openai_clients() -> AsyncIterator[None]:
    yield
    while live.OPEN_CLIENTS:
        await live.OPEN_CLIENTS.pop().close()
