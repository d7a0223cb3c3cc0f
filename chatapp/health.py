"""Liveness of the three shared services: database, cache, channel layer."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.core.cache import cache
from django.db import connection


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def check_database() -> None:
    await database_sync_to_async(_check_database)()


async def check_cache() -> None:
    key = f"healthz:{secrets.token_hex(8)}"
    await cache.aset(key, "ok", timeout=10)
    value = await cache.aget(key)
    await cache.adelete(key)
    if value != "ok":
        raise RuntimeError("value written was not read back")


async def check_channel_layer() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    channel = await layer.new_channel("healthz.")
    await layer.send(channel, {"type": "healthz.ping"})
    message = await layer.receive(channel)
    if message.get("type") != "healthz.ping":
        raise RuntimeError("message sent was not received")


CHECKS = {
    "database": check_database,
    "cache": check_cache,
    "channel_layer": check_channel_layer,
}


CHECK_SECONDS = 3.0


async def run_checks() -> dict[str, dict[str, str]]:
    """Run every check concurrently, each bounded by ``CHECK_SECONDS``."""
    timeout = CHECK_SECONDS

    async def one(check: Callable[[], Awaitable[None]]) -> dict[str, str]:
        try:
            await asyncio.wait_for(check(), timeout)
        except TimeoutError:
            return {"status": "down", "error": f"no answer within {timeout:g}s"}
        except Exception as exc:
            return {"status": "down", "error": f"{type(exc).__name__}: {exc}"}
        return {"status": "up"}

    results = await asyncio.gather(*(one(check) for check in CHECKS.values()))
    return dict(zip(CHECKS, results, strict=True))
