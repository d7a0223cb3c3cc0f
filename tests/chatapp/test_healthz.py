"""``GET /healthz`` reports the database, cache and channel layer."""

from __future__ import annotations

import pytest
from django.test import AsyncClient

pytestmark = pytest.mark.django_db(transaction=True)


async def test_healthz_is_200_when_everything_answers() -> None:
    response = await AsyncClient().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {
            "database": {"status": "up"},
            "cache": {"status": "up"},
            "channel_layer": {"status": "up"},
        },
    }


async def test_healthz_is_503_naming_the_cache_when_it_is_down(settings) -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
        }
    }
    response = await AsyncClient().get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down"
    assert body["down"] == ["cache"]
    assert body["checks"]["cache"]["status"] == "down"
    assert "ConnectionError" in body["checks"]["cache"]["error"]
    assert body["checks"]["database"] == {"status": "up"}


async def test_healthz_is_503_naming_the_channel_layer_when_it_is_down(settings) -> None:
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]},
        }
    }
    response = await AsyncClient().get("/healthz")
    assert response.status_code == 503
    assert response.json()["down"] == ["channel_layer"]
