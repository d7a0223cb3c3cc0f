"""A change made by another process (``manage.py``) reaches a serving process on its next lookup.

The test process plays the server: it warms its caches through the calls the relay
makes on every request (``keys.auth.aprincipal``, ``catalog.aget_model``), then runs
the real management command in a subprocess against the same database and checks
the very next lookup.  The subprocess needs committed rows, hence transactional
tests, and a database it can open: the run's SQLite file (the settings give tests a
file database, ``DATA_DIR/test.sqlite3``, passed on as ``DATABASE_URL=sqlite:///…``)
or the PostgreSQL test database.  In the embedded mode the news travels through
hotstore's version file in the shared data directory; with Redis, through Redis.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.db import connection

from accounts.models import User
from chatapp import hotstore
from chatapp.models import CatalogModel, Provider, Route
from chatapp.relay import catalog
from keys import auth
from keys.actions import do_create_key
from keys.models import ApiKey
from tests.services import USING_REDIS

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")
# A chat stream snapshot's key (chatapp's generation module): this process's alone.
SNAPSHOT = "stream:7"


def manage(*args: str) -> str:
    """Run ``manage.py`` in another process, on this test's database and data directory."""
    database = connection.settings_dict
    if database["ENGINE"] == "django.db.backends.sqlite3":
        url = f"sqlite:///{database['NAME']}"
    else:
        # The configured URL (credentials and all), pointed at the test database.
        url = urlsplit(os.environ["DATABASE_URL"])._replace(path=f"/{database['NAME']}").geturl()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        # The same secrets (generated there) and, embedded, the same version file.
        "SWITCHBOARD_DATA_DIR": str(settings.DATA_DIR),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("REDIS_URL", None)
    if settings.REDIS_URL:
        env["REDIS_URL"] = settings.REDIS_URL
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def lookup(call: Callable[[], Awaitable[T]]) -> T:
    """One request's lookup, on its own event loop like a request served by the test process."""

    async def request() -> T:
        try:
            return await call()
        finally:
            await hotstore.aclose()

    return asyncio.run(request())


def principal_of(key: ApiKey) -> auth.Principal | None:
    return lookup(lambda: auth.aprincipal(key.key_hash))


def model_named(name: str) -> catalog.ModelInfo | None:
    return lookup(lambda: catalog.aget_model(name))


@pytest.fixture
def key(alice: User) -> ApiKey:
    return do_create_key(user=alice, name="laptop")[0]


@pytest.fixture
def chat_model() -> CatalogModel:
    provider = Provider.objects.create(
        name="fake", type="openai", base_url="http://127.0.0.1:9/v1", timeout=5
    )
    model = CatalogModel.objects.create(name="chat-model")
    Route.objects.create(model=model, provider=provider, upstream_model="up")
    return model


def warm(key: ApiKey) -> None:
    """Cache the key's principal as a request would, and check it is served from the cache."""
    principal = principal_of(key)
    assert principal is not None
    assert principal.state == "active"
    assert lookup(lambda: hotstore.aget(auth.cache_key(key.key_hash))) == principal


def test_a_key_revoked_by_manage_py_is_refused_on_the_next_request(key: ApiKey) -> None:
    # Given a serving process with the key's principal and a chat stream snapshot cached
    warm(key)
    lookup(lambda: hotstore.aset(SNAPSHOT, (3, "partial reply"), 60))

    # When another process revokes the key
    manage("key", "revoke", key.prefix)

    # Then the very next lookup sees it, and the process's own entries stay
    principal = principal_of(key)
    assert principal is not None
    assert principal.state == "revoked"
    assert lookup(lambda: hotstore.aget(SNAPSHOT)) == (3, "partial reply")


def test_a_user_disabled_by_manage_py_has_their_keys_refused_on_the_next_request(
    key: ApiKey,
) -> None:
    warm(key)

    manage("user", "disable", "alice@example.com")

    principal = principal_of(key)
    assert principal is not None
    assert principal.state == "owner_disabled"


def test_a_model_disabled_by_manage_py_is_gone_on_the_next_request(
    chat_model: CatalogModel,
) -> None:
    assert model_named("chat-model") is not None

    manage("model", "disable", "chat-model")

    assert model_named("chat-model") is None


def test_a_model_added_by_manage_py_is_served_on_the_next_request(
    chat_model: CatalogModel,
) -> None:
    assert model_named("new-model") is None

    manage("model", "add", "new-model", "--provider", "fake", "--upstream-model", "up-2")

    model = model_named("new-model")
    assert model is not None
    assert [route.target.upstream_model for route in model.routes] == ["up-2"]


def test_a_price_set_by_manage_py_applies_on_the_next_request(chat_model: CatalogModel) -> None:
    model = model_named("chat-model")
    assert model is not None
    assert model.prices == ()

    manage("price", "set", "chat-model", "--input", "1.25", "--output", "10")

    model = model_named("chat-model")
    assert model is not None
    assert [(price.input, price.output) for price in model.prices] == [
        (Decimal("1.25"), Decimal("10"))
    ]


embedded_only = pytest.mark.skipif(USING_REDIS, reason="with Redis the hot store is shared")


@embedded_only
def test_every_change_looks_new_even_when_the_clock_stands_still(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Kernels stamp files from a clock that may tick only every few milliseconds, a
    # wall clock can step back, and the version file's inodes get reused: each change
    # must still leave an mtime the serving processes have not seen.
    path = Path(settings.DATA_DIR, hotstore.VERSION_FILE)
    hotstore._bump_version()
    mtimes = [path.stat().st_mtime_ns]
    with monkeypatch.context() as patched:
        patched.setattr(hotstore.time, "time_ns", lambda: 10**18)
        for _ in range(5):
            hotstore._bump_version()
            mtimes.append(path.stat().st_mtime_ns)
    assert mtimes == sorted(set(mtimes))


@embedded_only
def test_a_lookup_that_straddles_another_process_change_is_not_cached() -> None:
    async def scenario() -> Any:
        # Request A misses the key and goes to the database (maybe before the change commits)…
        assert await hotstore.aget("apikey:a") is None
        # …another process commits a change to the keys…
        hotstore._bump_version()
        # …request B notices it and drops the cached principals…
        await asyncio.create_task(hotstore.aget("apikey:b"))
        # …then A's read, which may predate the change, comes back.
        await hotstore.aadd("apikey:a", "what A read", 300)
        return await hotstore.aget("apikey:a")

    assert lookup(scenario) is None

    async def undisturbed() -> Any:
        assert await hotstore.aget("apikey:a") is None
        await hotstore.aadd("apikey:a", "what A read", 300)
        return await hotstore.aget("apikey:a")

    assert lookup(undisturbed) == "what A read"
