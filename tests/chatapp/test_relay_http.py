"""The relay's shared HTTP client: closed with its event loop, never left for the collector."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import httpx
import pytest

from chatapp.relay import http as relay_http
from tests.fake_upstream import FakeUpstream
from tests.live import CountingUpstream

ROOT = Path(__file__).resolve().parents[2]

# A process that calls an upstream and leaves the connection in the pool, then exits:
# with its loop run by asyncio.run (a command, a Celery task, a test, uvicorn), or by
# Twisted's asyncio reactor (Daphne).
SCRIPTS = {
    "asyncio.run": """
import asyncio, gc, sys
from chatapp.relay import http as relay_http

async def call_upstream(url):
    response = await relay_http.client().get(url)
    return response.status_code

for _ in range(2):
    assert asyncio.run(call_upstream(sys.argv[1])) == 200
gc.collect()
print("done")
""",
    "twisted reactor": """
import asyncio, gc, sys
loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
from twisted.internet import asyncioreactor
asyncioreactor.install(loop)
from twisted.internet import defer, reactor
from chatapp.relay import http as relay_http

async def call_upstream(url):
    response = await relay_http.client().get(url)
    assert response.status_code == 200

def start():
    done = defer.Deferred.fromFuture(asyncio.ensure_future(call_upstream(sys.argv[1])))
    done.addBoth(lambda _: reactor.stop())

reactor.callWhenRunning(start)
reactor.run(installSignalHandlers=False)
gc.collect()
print("done")
""",
}


def _python(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``script`` run by a fresh Python process from the project's root."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("runner", SCRIPTS)
def test_a_process_that_used_the_client_exits_without_unclosed_session_errors(
    fake_upstream: FakeUpstream, runner: str
) -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatapp.settings"}
    result = _python(SCRIPTS[runner], fake_upstream.openai_base_url + "/models", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert "Unclosed" not in result.stderr, result.stderr
    assert "Task was destroyed" not in result.stderr, result.stderr


def test_the_client_is_closed_and_forgotten_when_its_loop_ends() -> None:
    async def open_client() -> httpx.AsyncClient:
        return relay_http.client()

    client = asyncio.run(open_client())
    assert client.is_closed
    assert client not in relay_http._clients.values()


def test_aclose_closes_the_client_at_once() -> None:
    async def open_and_close() -> bool:
        client = relay_http.client()
        await relay_http.aclose()
        return client.is_closed

    assert asyncio.run(open_and_close())


def test_a_worker_loads_the_tls_settings_at_startup_not_at_its_first_upstream_call(
    tmp_path: Path,
) -> None:
    # Loading the CA bundle takes tens of milliseconds: spent on the event loop by the
    # first reply of a worker, it delayed every reply started in the same burst.
    env = {**os.environ, "SWITCHBOARD_DATA_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    script = """
import asyncio, ssl
import chatapp.asgi
from chatapp.relay import http as relay_http

def refused(*args, **kwargs):
    raise AssertionError("a TLS context was built on the event loop")

ssl.create_default_context = refused

async def clients():
    return relay_http.client().__class__.__name__

print(asyncio.run(clients()), asyncio.run(clients()))
"""
    result = _python(script, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["AsyncClient", "AsyncClient"]


async def test_every_loops_client_shares_the_one_tls_context() -> None:
    transport = relay_http.client()._transport
    assert transport.ssl_context is relay_http.ssl_context()  # type: ignore[attr-defined]
    assert transport.ssl_context.verify_mode == ssl.CERT_REQUIRED  # type: ignore[attr-defined]


async def test_connections_opened_ahead_serve_the_next_requests_and_no_more_are_opened(
    counting_upstream: CountingUpstream,
) -> None:
    # Given two connections opened ahead (two tabs open)...
    for _ in range(2):
        assert await relay_http.preconnect(counting_upstream.url, wanted=2, connect_timeout=5)
    # ...a third is not: as many are idle as wanted.
    assert not await relay_http.preconnect(counting_upstream.url, wanted=2, connect_timeout=5)
    await counting_upstream.wait_for(2)
    assert counting_upstream.requests == 0
    # When two requests go at once, they take those two: no connection is made for them.
    responses = await asyncio.gather(
        *(
            relay_http.send(
                httpx.Request("POST", counting_upstream.url + "/chat/completions", content=b"{}")
            )
            for _ in range(2)
        )
    )
    for response in responses:
        assert response.status_code == 200
        await response.aread()
        await response.aclose()
    assert counting_upstream.requests == 2
    assert counting_upstream.accepted == 2


async def test_connections_opened_at_once_stop_at_the_number_wanted(
    counting_upstream: CountingUpstream,
) -> None:
    opened = await asyncio.gather(
        *(
            relay_http.preconnect(counting_upstream.url, wanted=3, connect_timeout=5)
            for _ in range(5)
        )
    )
    assert sorted(opened) == [False, False, True, True, True]
    await counting_upstream.wait_for(3)
    await asyncio.sleep(0.1)
    assert counting_upstream.accepted == 3


async def test_an_upstream_that_cannot_be_reached_fails_the_connection_opened_ahead(
    counting_upstream: CountingUpstream,
) -> None:
    url = counting_upstream.url
    await counting_upstream.close()  # nothing listens there any more
    with pytest.raises(aiohttp.ClientConnectorError):
        await relay_http.preconnect(url, wanted=1, connect_timeout=5)
    # Nothing is left counted as being opened: a later tab tries again.
    assert not relay_http._opening.get(asyncio.get_running_loop())
