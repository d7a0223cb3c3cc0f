"""Two Daphne processes sharing PostgreSQL and Redis: a reply started on one streams to a tab on the other."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.db import connection

from accounts.models import User
from chatapp.models import CatalogModel, Message, Provider, Route
from tests.conftest import make_user
from tests.fake_upstream import FakeUpstream, Reply
from tests.live import free_port
from tests.services import USING_POSTGRES, USING_REDIS

pytestmark = [
    pytest.mark.skipif(
        not (USING_POSTGRES and USING_REDIS),
        reason="several Daphne processes share state only through PostgreSQL and Redis",
    ),
    pytest.mark.django_db(transaction=True),
]
ROOT = Path(__file__).resolve().parents[2]


def session_cookie(user: User) -> str:
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}"


@pytest.fixture
def daphnes(transactional_db: None) -> Iterator[list[int]]:
    database = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": settings.SECRET_KEY,
        "SWITCHBOARD_ENCRYPTION_KEY": settings.SWITCHBOARD_ENCRYPTION_KEY,
        "SWITCHBOARD_DATA_DIR": str(settings.DATA_DIR),
        "SWITCHBOARD_CHAT_TITLES": "false",
        "LOG_LEVEL": "WARNING",
    }
    ports = [free_port(), free_port()]
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "chatapp.server", "-p", str(port), "chatapp.asgi:application"],
            cwd=ROOT,
            env=env,
        )
        for port in ports
    ]
    try:
        deadline = time.monotonic() + 30
        for port in ports:
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "daphne did not start"
                    time.sleep(0.2)
        yield ports
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(10)


async def until(socket: Any, kind: str) -> list[dict[str, Any]]:
    events = []
    while True:
        event = json.loads(await asyncio.wait_for(socket.recv(), 15))
        events.append(event)
        if event["type"] == kind:
            return events


def test_a_reply_generated_on_one_process_streams_to_a_tab_on_another(daphnes: list[int]) -> None:
    fake = FakeUpstream().start()
    try:
        provider = Provider.objects.create(
            name="fake", type="openai", base_url=fake.openai_base_url, timeout=10
        )
        model = CatalogModel.objects.create(name="chat-model")
        Route.objects.create(model=model, provider=provider, upstream_model="up")
        alice = make_user("alice@example.com")
        cookie = session_cookie(alice)
        text = " ".join(f"w{i}" for i in range(40))
        fake.script(Reply(text=text, chunk_delay=0.03))

        async def scenario() -> str:
            headers = {"Cookie": cookie}
            origin_a, origin_b = (f"http://127.0.0.1:{port}" for port in daphnes)
            async with websockets.connect(
                f"ws://127.0.0.1:{daphnes[0]}/ws/chat/",
                additional_headers=headers,
                origin=origin_a,  # type: ignore[arg-type]
            ) as tab_a:
                await tab_a.send(
                    json.dumps(
                        {"action": "send", "conversation": None, "text": "count", "attachments": []}
                    )
                )
                first = await until(tab_a, "delta")
                conversation = first[0]["conversation"]
            # Tab A is gone; a tab on the other process joins mid-reply.
            async with websockets.connect(
                f"ws://127.0.0.1:{daphnes[1]}/ws/chat/",
                additional_headers=headers,
                origin=origin_b,  # type: ignore[arg-type]
            ) as tab_b:
                await tab_b.send(json.dumps({"action": "open", "conversation": conversation}))
                snapshot = (await until(tab_b, "snapshot"))[-1]
                received, seq = snapshot["text"], snapshot["seq"]
                while True:
                    event = json.loads(await asyncio.wait_for(tab_b.recv(), 15))
                    if event["type"] == "delta" and event["seq"] > seq:
                        assert event["seq"] == seq + 1
                        received, seq = received + event["text"], event["seq"]
                    elif event["type"] == "done":
                        assert event["status"] == "complete"
                        return received

        assert asyncio.run(scenario()) == text
        assert Message.objects.get(role="assistant").content == text
    finally:
        fake.stop()
