"""When TEST_DATABASE_URL / TEST_REDIS_URL are set, the suite really uses them."""

from __future__ import annotations

import pytest
from channels.layers import get_channel_layer
from django.core.cache import cache
from django.db import connection

from tests.services import USING_POSTGRES, USING_REDIS


@pytest.mark.skipif(not USING_POSTGRES, reason="TEST_DATABASE_URL not set: embedded SQLite run")
@pytest.mark.django_db
def test_the_database_is_postgresql_through_psycopg3_with_a_pool() -> None:
    assert connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database(), version()")
        name, version = cursor.fetchone()
    assert name.startswith("test_")
    assert version.startswith("PostgreSQL")
    assert connection.settings_dict["OPTIONS"]["pool"]
    assert connection.pool is not None  # type: ignore[attr-defined]


@pytest.mark.skipif(not USING_REDIS, reason="TEST_REDIS_URL not set: embedded run")
async def test_cache_and_channel_layer_are_redis() -> None:
    from django.core.cache import caches
    from django.core.cache.backends.redis import RedisCache

    assert isinstance(caches["default"], RedisCache)
    await cache.aset("services-probe", 42)
    assert await cache.aget("services-probe") == 42

    from redis.utils import HIREDIS_AVAILABLE

    from chatapp.layers import RedisPubSubChannelLayer

    assert HIREDIS_AVAILABLE  # redis-py parses replies in C (pyproject: redis[hiredis])
    layer = get_channel_layer()
    assert isinstance(layer, RedisPubSubChannelLayer)
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "probe", "n": 1})
    assert (await layer.receive(channel))["n"] == 1


@pytest.mark.skipif(USING_POSTGRES or USING_REDIS, reason="services run")
@pytest.mark.django_db
def test_the_embedded_run_uses_sqlite_and_memory() -> None:
    from django.core.cache import caches
    from django.core.cache.backends.locmem import LocMemCache

    from chatapp.layers import InMemoryChannelLayer

    assert connection.vendor == "sqlite"
    assert isinstance(caches["default"], LocMemCache)
    assert isinstance(get_channel_layer(), InMemoryChannelLayer)
