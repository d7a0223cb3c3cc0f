"""The relay's shared HTTP client: closed with its event loop, never left for the collector."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from chatapp.relay import http as relay_http
from tests.fake_upstream import FakeUpstream

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


@pytest.mark.parametrize("runner", SCRIPTS)
def test_a_process_that_used_the_client_exits_without_unclosed_session_errors(
    fake_upstream: FakeUpstream, runner: str
) -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatapp.settings"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPTS[runner], fake_upstream.openai_base_url + "/models"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
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
