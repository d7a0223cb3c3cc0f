"""One shared ``httpx.AsyncClient`` per process (per event loop), with a connection pool.

httpx's own async transport is the bottleneck at high concurrency; the aiohttp
transport (``httpx-aiohttp``) keeps the httpx API at about three times the
throughput.
"""

from __future__ import annotations

import asyncio
import weakref

import httpx
from httpx_aiohttp import AiohttpTransport

LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30)

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    existing = _clients.get(loop)
    if existing is None or existing.is_closed:
        # The transport keeps its own pool: give it our limits (its default is 100).
        existing = httpx.AsyncClient(
            transport=AiohttpTransport(limits=LIMITS), limits=LIMITS, follow_redirects=False
        )
        _clients[loop] = existing
    return existing


async def aclose() -> None:
    """Close this event loop's client (server shutdown, tests)."""
    existing = _clients.pop(asyncio.get_running_loop(), None)
    if existing is not None:
        await existing.aclose()


def is_timeout(exc: httpx.HTTPError) -> bool:
    """Whether ``exc`` is a real timeout.

    httpx-aiohttp maps every aiohttp connection error, a refused connection included,
    to ``httpx.ConnectTimeout``; the underlying cause tells them apart.
    """
    cause = exc.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
        return False
    return isinstance(exc, httpx.TimeoutException)
