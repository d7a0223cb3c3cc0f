"""Graceful shutdown: SIGTERM drains a worker, then ends what is left as interrupted.

A real server process (uvicorn, and Daphne) relays 20 slow streams from the fake
upstream when it gets SIGTERM.  With time enough to drain, every client gets its
whole reply; with a short drain, every stream ends with an in-stream error event and
is recorded as interrupted, billed for what was produced.  Either way no client
hangs or sees a torn stream, every request has exactly one usage record, and the
process exits with status 0.  Chat replies drain the same way (in process).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection

from chatapp import shutdown
from chatapp.models import CatalogModel, Message, Provider
from keys import ledger
from keys.actions import do_set_price
from keys.models import UsageRecord
from tests.chatapp.test_chat_consumer import connect, receive_until, upstream  # noqa: F401
from tests.chatapp.test_settings import load_settings
from tests.conftest import make_user
from tests.fake_upstream import FakeUpstream, Reply
from tests.gateway import Gateway
from tests.live import free_port, start_uvicorn
from tests.sse import parse_sse

ROOT = Path(__file__).resolve().parents[2]
STREAMS = 20
WORDS = [f"w{number}" for number in range(200)]


def server_env(drain: int) -> dict[str, str]:
    """A server process on this test's database, data directory (secrets) and Redis."""
    database = connection.settings_dict
    if database["ENGINE"] == "django.db.backends.sqlite3":
        url = f"sqlite:///{database['NAME']}"
    else:
        url = urlsplit(os.environ["DATABASE_URL"])._replace(path=f"/{database['NAME']}").geturl()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "SWITCHBOARD_DATA_DIR": str(settings.DATA_DIR),
        "SWITCHBOARD_DRAIN_SECONDS": str(drain),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("REDIS_URL", None)
    if settings.REDIS_URL:
        env["REDIS_URL"] = settings.REDIS_URL
    return env


def start_daphne(port: int, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """A Daphne process of the whole app on ``port``, once it answers ``/healthz``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "chatapp.server", "-p", str(port), "chatapp.asgi:application"],
        cwd=cwd,
        env=env,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError("the Daphne process did not start") from None
            time.sleep(0.2)


Starter = Callable[[int, dict[str, str], Path], "subprocess.Popen[bytes]"]


@pytest.fixture(params=["uvicorn", "daphne"])
def start_server(request: pytest.FixtureRequest) -> Starter:
    return start_uvicorn if request.param == "uvicorn" else start_daphne


def stream_body(number: int) -> dict[str, Any]:
    return {
        "model": "gpt-fake",
        "messages": [{"role": "user", "content": f"count, please ({number})"}],
        "stream": True,
    }


async def stream_through_sigterm(
    url: str, key: str, server: subprocess.Popen[bytes]
) -> tuple[list[tuple[str, int, bytes]], bool]:
    """Open the streams; once each has its first bytes, SIGTERM the server; read them out.

    Returns (request id, status, body) per stream, and whether a new connection was
    refused while they drained.
    """
    started = 0
    all_started = asyncio.Event()

    async def one(client: httpx.AsyncClient, number: int) -> tuple[str, int, bytes]:
        nonlocal started
        async with client.stream(
            "POST",
            url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json=stream_body(number),
        ) as response:
            chunks: list[bytes] = []
            # A torn stream raises here (httpx.RemoteProtocolError), a hang times out.
            async for chunk in response.aiter_bytes():
                if not chunks:
                    started += 1
                    if started == STREAMS:
                        all_started.set()
                chunks.append(chunk)
            return response.headers["x-request-id"], response.status_code, b"".join(chunks)

    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        streams = [asyncio.create_task(one(client, number)) for number in range(STREAMS)]
        await asyncio.wait_for(all_started.wait(), 30)
        server.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        try:
            async with httpx.AsyncClient(timeout=5) as late:
                await late.get(url + "/healthz")
            refused = False
        except httpx.ConnectError:
            refused = True
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
    return results, refused


def run(
    gateway: Gateway, start_server: Starter, *, drain: int, reply: Reply
) -> tuple[list[tuple[str, int, bytes]], bool, int, float]:
    # Output tokens are priced, so "billed" shows as a cost.
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal(0),
        output_price=Decimal(1000),
    )
    Provider.objects.filter(pk=gateway.openai_provider.pk).update(timeout=30)
    gateway.fake.script(*[reply] * STREAMS)
    port = free_port()
    server = start_server(port, server_env(drain), ROOT)
    try:
        results, refused = asyncio.run(
            stream_through_sigterm(f"http://127.0.0.1:{port}", gateway.key, server)
        )
        signalled = time.monotonic()
        status = server.wait(30)
        return results, refused, status, time.monotonic() - signalled
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def records_of(results: list[tuple[str, int, bytes]]) -> list[UsageRecord]:
    ids = [request_id for request_id, _status, _body in results]
    records = list(UsageRecord.objects.filter(request_id__in=ids))
    assert sorted(record.request_id for record in records) == sorted(ids)  # one each
    return records


def test_streams_that_end_within_the_drain_time_all_end_whole(
    gateway: Gateway, start_server: Starter
) -> None:
    # Given 20 streams of about 2 s in flight, and 20 s to drain...
    reply = Reply(text=" ".join(WORDS[:40]), chunk_delay=0.05)
    results, refused, status, _took = run(gateway, start_server, drain=20, reply=reply)

    # ...the server stopped accepting at once, every client got its whole reply,
    assert refused
    for _request_id, code, body in results:
        assert code == 200
        events = parse_sse(body)
        assert events[-1][1] == "[DONE]", body[-300:]
        text = "".join(
            data["choices"][0]["delta"].get("content") or ""
            for _name, data in events
            if isinstance(data, dict) and data.get("choices")
        )
        assert text == reply.text
    # each has one record of a complete request, and the process exited cleanly.
    assert {record.status for record in records_of(results)} == {"ok"}
    assert status == 0


def test_streams_still_running_at_the_drain_deadline_end_cleanly_and_are_billed(
    gateway: Gateway, start_server: Starter
) -> None:
    # Given 20 streams of about 10 s in flight, and 1 s to drain...
    reply = Reply(text=" ".join(WORDS), chunk_delay=0.05)
    results, refused, status, took = run(gateway, start_server, drain=1, reply=reply)

    # ...every stream ended with the in-stream error event (no [DONE], no torn body),
    assert refused
    for _request_id, code, body in results:
        assert code == 200
        events = parse_sse(body, strict=True)
        assert events[-1][1]["error"]["code"] == "server_shutting_down", body[-300:]
        assert "[DONE]" not in [data for _name, data in events]
        assert any(isinstance(data, dict) and data.get("choices") for _name, data in events)
    # each is recorded once as interrupted, billed for what it produced,
    records = records_of(results)
    assert {record.status for record in records} == {"interrupted"}
    assert all(record.output_tokens > 0 and record.cost > 0 for record in records)
    assert all(record.output_tokens < len(WORDS) for record in records)
    # and the worker exited cleanly well before the replies would have ended.
    assert status == 0
    assert took < 8


def test_a_whole_reply_still_awaited_at_the_deadline_gets_a_503_and_is_recorded(
    gateway: Gateway, start_server: Starter
) -> None:
    # Given a non-streamed request whose upstream answers in 10 s, and 1 s to drain...
    Provider.objects.filter(pk=gateway.openai_provider.pk).update(timeout=30)
    gateway.fake.script(Reply(text="late", delay=10))
    port = free_port()
    server = start_server(port, server_env(1), ROOT)
    try:

        async def ask() -> httpx.Response:
            async with httpx.AsyncClient(timeout=30) as client:
                asking = asyncio.create_task(
                    client.post(
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        headers={"authorization": f"Bearer {gateway.key}"},
                        json=stream_body(0) | {"stream": False},
                    )
                )
                await asyncio.sleep(1)  # the request waits for the upstream
                server.send_signal(signal.SIGTERM)
                return await asking

        response = asyncio.run(ask())
        status = server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)

    # ...the client gets the dialect's 503, with the request id of its usage record.
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "server_shutting_down"
    record = UsageRecord.objects.get(request_id=response.headers["x-request-id"])
    assert record.status == "interrupted"
    assert status == 0


@pytest.fixture
def drain_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh drain state, one that leaves this test process's SIGTERM handler alone."""
    state = shutdown._Drain()
    state.installed = True
    monkeypatch.setattr(shutdown, "_state", state)


async def start_reply() -> tuple[Any, int]:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Count"})
    await receive_until(ws, "delta")
    reply = await Message.objects.aget(role="assistant")
    return ws, reply.pk


@pytest.mark.django_db(transaction=True)
async def test_a_shutdown_lets_a_chat_reply_finish_within_the_drain_time(
    upstream: FakeUpstream,  # noqa: F811
    drain_state: None,
    settings: Any,
) -> None:
    settings.SWITCHBOARD_DRAIN_SECONDS = 20
    upstream.script(Reply(text=" ".join(WORDS[:30]), chunk_delay=0.02))
    ws, reply_id = await start_reply()

    # When the process is told to stop (what SIGTERM starts) while the reply streams...
    await shutdown.drain()

    # ...the reply was not cut: it ended whole, and was metered once.
    reply = await Message.objects.aget(pk=reply_id)
    assert (reply.status, reply.content) == ("complete", " ".join(WORDS[:30]))
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert record.status == "ok"
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_chat_reply_still_running_at_the_deadline_is_saved_as_interrupted(
    upstream: FakeUpstream,  # noqa: F811
    drain_state: None,
    settings: Any,
) -> None:
    settings.SWITCHBOARD_DRAIN_SECONDS = 1
    upstream.script(Reply(text=" ".join(WORDS), chunk_delay=0.05))
    ws, reply_id = await start_reply()
    started = time.monotonic()

    await shutdown.drain()

    # The reply got the drain time, then was saved as interrupted with its text, and billed.
    assert 0.9 < time.monotonic() - started < 8
    reply = await Message.objects.aget(pk=reply_id)
    assert reply.status == "interrupted"
    assert reply.content.startswith("w0 w1")
    await asyncio.to_thread(ledger.flush)
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert record.status == "interrupted"
    assert record.output_tokens > 0
    await ws.disconnect()


def test_the_drain_time_must_be_a_whole_number_of_seconds(tmp_path: Path) -> None:
    result = load_settings(tmp_path, SWITCHBOARD_DRAIN_SECONDS="soon")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "switchboard: configuration error: SWITCHBOARD_DRAIN_SECONDS='soon' is not an integer"
    ]
