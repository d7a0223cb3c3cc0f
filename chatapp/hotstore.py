"""Shared state read on every request: key principals, the catalog version, limiter counters.

With ``REDIS_URL`` it lives in Redis, read through one ``redis.asyncio`` client per
event loop (no thread hop, unlike Django's cache API whose async methods run the
sync client in a thread).  Without Redis (the single-process embedded mode) it is
a plain in-process dictionary.  Writes from synchronous code (signals, commands)
use a synchronous client.

Values are pickled: only this process family writes them.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
import weakref
from typing import Any

from django.conf import settings

PREFIX = "switchboard:hot:"
MAX_CONNECTIONS = 50  # per process and event loop


class _Local:
    """In-process store with per-key expiry, for the embedded mode."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[float | None, Any]] = {}
        self.lock = threading.Lock()

    def get(self, key: str) -> Any:
        entry = self.data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires is not None and expires < time.monotonic():
            self.data.pop(key, None)
            return None
        return value

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self.data[key] = (time.monotonic() + ttl if ttl else None, value)

    def add(self, key: str, value: Any, ttl: float | None) -> None:
        with self.lock:
            if self.get(key) is None:
                self.set(key, value, ttl)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.data.pop(key, None)

    def clear(self) -> None:
        self.data.clear()


_local = _Local()
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
    weakref.WeakKeyDictionary()
)
_sync_client: Any = None


def _redis_url() -> str | None:
    return settings.REDIS_URL


def _required_url() -> str:
    url = settings.REDIS_URL
    assert url is not None, "the Redis clients are only used when REDIS_URL is set"
    return url


def async_client() -> Any:
    """This event loop's ``redis.asyncio`` client (Redis mode only)."""
    import redis.asyncio

    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        # A blocking pool: under a burst, requests wait (up to 5 s) for one of a
        # bounded number of connections instead of failing.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            _required_url(),
            max_connections=MAX_CONNECTIONS,
            timeout=5,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        _async_clients[loop] = client
    return client


def sync_client() -> Any:
    global _sync_client
    if _sync_client is None:
        import redis

        _sync_client = redis.Redis.from_url(
            _required_url(), socket_timeout=5, socket_connect_timeout=5
        )
    return _sync_client


async def aget(key: str) -> Any:
    if _redis_url() is None:
        return _local.get(key)
    raw = await async_client().get(PREFIX + key)
    return None if raw is None else pickle.loads(raw)


async def aset(key: str, value: Any, ttl: float | None = None) -> None:
    if _redis_url() is None:
        _local.set(key, value, ttl)
        return
    await async_client().set(PREFIX + key, pickle.dumps(value), ex=int(ttl) if ttl else None)


async def aadd(key: str, value: Any, ttl: float | None = None) -> None:
    """Set ``key`` only if it is absent (so a slow reader cannot overwrite a fresher write)."""
    if _redis_url() is None:
        _local.add(key, value, ttl)
        return
    await async_client().set(
        PREFIX + key, pickle.dumps(value), ex=int(ttl) if ttl else None, nx=True
    )


def set(key: str, value: Any, ttl: float | None = None) -> None:  # noqa: A001 - mirrors aset
    if _redis_url() is None:
        _local.set(key, value, ttl)
        return
    sync_client().set(PREFIX + key, pickle.dumps(value), ex=int(ttl) if ttl else None)


def delete(*keys: str) -> None:
    if not keys:
        return
    if _redis_url() is None:
        _local.delete(list(keys))
        return
    sync_client().delete(*(PREFIX + key for key in keys))


def clear() -> None:
    """Drop everything (tests)."""
    if _redis_url() is None:
        _local.clear()
        return
    client = sync_client()
    for key in client.scan_iter(PREFIX + "*"):
        client.delete(key)


async def aclose() -> None:
    client = _async_clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()
