"""Logs: one JSON object per line with ``LOG_FORMAT=json``, carrying the request's id.

The id in a request's lines is the ``x-request-id`` its client got: for ``/v1`` calls
(whole, streamed, refused, failed upstream) and the browser chat's replies, each of
which leaves one line when it settles; and in a real uvicorn worker, whose own lines
come out as JSON too.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from channels.db import database_sync_to_async

from chatapp import logs
from chatapp.models import Message
from keys.models import ApiKey
from tests.chatapp.test_chat_consumer import connect, receive_until, upstream  # noqa: F401
from tests.chatapp.test_settings import load_settings
from tests.chatapp.test_shutdown import server_env
from tests.conftest import make_user
from tests.fake_upstream import Fail, FakeUpstream, Reply
from tests.gateway import Gateway
from tests.live import free_port

ROOT = Path(__file__).resolve().parents[2]
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    """What this process logs from now on, through the JSON formatter, parsed line by line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def request_lines(lines: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in lines
        if line["logger"] == "switchboard.requests" and line.get("request_id") == request_id
    ]


def test_a_line_carries_the_context_of_its_request_and_its_tasks(json_lines: Lines) -> None:
    log = logging.getLogger("tests.logs")

    async def request() -> None:
        logs.begin("req_1")
        logs.bind(key_prefix="sk-abc", user_id=7, model="")
        log.warning("upstream %s failed", "x")

        async def child() -> None:
            log.error("in a task it started")

        await asyncio.create_task(child())

    def run() -> None:
        asyncio.run(request())
        log.warning("no request here")

    # In a context of its own: what earlier tests left in this thread's is not this test's.
    contextvars.Context().run(run)

    first, second, third = [line for line in json_lines() if line["logger"] == "tests.logs"]
    assert TIME.match(first.pop("time"))
    assert first == {
        "level": "WARNING",
        "logger": "tests.logs",
        "message": "upstream x failed",
        "request_id": "req_1",
        "key_prefix": "sk-abc",
        "user_id": 7,
    }
    assert (second["level"], second["request_id"]) == ("ERROR", "req_1")
    assert "request_id" not in third


def test_an_exception_is_in_its_line(json_lines: Lines) -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("tests.logs").exception("it broke")
    [line] = [line for line in json_lines() if line["logger"] == "tests.logs"]
    assert line["message"] == "it broke"
    assert "ZeroDivisionError" in line["exception"]


def test_each_relayed_request_leaves_one_line_with_the_id_its_client_got(
    gateway: Gateway, json_lines: Lines
) -> None:
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    auth = {"authorization": f"Bearer {gateway.key}"}
    url = gateway.base_url + "/chat/completions"
    chat = {"model": "gpt-fake", "messages": [{"role": "user", "content": "Hi"}]}
    gateway.fake.script(
        Reply(text="whole"), Reply(text="streamed"), Fail(500), Fail(500), Fail(500)
    )

    whole = httpx.post(url, headers=auth, json=chat)
    with httpx.stream("POST", url, headers=auth, json=chat | {"stream": True}) as response:
        response.read()
        streamed = response
    refused = httpx.post(url, headers=auth, json={"model": "gpt-fake"})
    failed = httpx.post(url, headers=auth, json=chat)
    assert [r.status_code for r in (whole, streamed, refused, failed)] == [200, 200, 400, 502]

    lines = json_lines()
    expected = {whole: "ok", streamed: "ok", refused: "error", failed: "error"}
    for response, status in expected.items():
        [line] = request_lines(lines, response.headers["x-request-id"])
        assert line["level"] == "INFO"
        assert line["endpoint"] == "chat.completions"
        assert (line["status"], line["http_status"]) == (status, response.status_code)
        assert (line["key_prefix"], line["user_id"]) == (key.prefix, gateway.user.pk)
        assert line["model"] == "gpt-fake"
        assert isinstance(line["latency_ms"], int)
    # The upstream's failures were logged as they happened, with the same request id.
    failures = [
        line
        for line in lines
        if line["logger"] == "chatapp.relay.pipeline"
        and line.get("request_id") == failed.headers["x-request-id"]
    ]
    assert failures
    assert {line["level"] for line in failures} == {"WARNING"}
    assert all(line["model"] == "gpt-fake" for line in failures)


@pytest.mark.django_db(transaction=True)
async def test_a_chat_reply_leaves_one_line_with_the_request_id_it_was_saved_with(
    upstream: FakeUpstream,  # noqa: F811
    json_lines: Lines,
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text="Hello there."))
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Hi"})
    await receive_until(ws, "done")
    reply = await Message.objects.aget(role="assistant")

    [line] = request_lines(json_lines(), reply.request_id)
    assert (line["endpoint"], line["status"], line["model"]) == ("browser", "ok", "chat-model")
    assert line["user_id"] == alice.pk
    web_key = await ApiKey.objects.aget(user=alice, is_web_key=True)
    assert line["key_prefix"] == web_key.prefix
    await ws.disconnect()


def test_a_uvicorn_worker_writes_only_json_lines(gateway: Gateway, tmp_path: Path) -> None:
    env = server_env(drain=5) | {
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "PYTHONWARNINGS": "ignore",
    }
    output = tmp_path / "server.log"
    port = free_port()
    with output.open("wb") as sink:
        # uvicorn's own access log on, as --log-level info leaves it.
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "chatapp.asgi:application"]
            + ["--port", str(port), "--log-level", "info"],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert server.poll() is None, output.read_text()
                assert time.monotonic() < deadline, output.read_text()
                time.sleep(0.2)
        gateway.fake.script(Reply(text="one"), Reply(text="two"))
        auth = {"authorization": f"Bearer {gateway.key}"}
        chat = {"model": "gpt-fake", "messages": [{"role": "user", "content": "Hi"}]}
        whole = httpx.post(base + "/v1/chat/completions", headers=auth, json=chat, timeout=10)
        streamed = httpx.post(
            base + "/v1/chat/completions", headers=auth, json=chat | {"stream": True}, timeout=10
        )
        # refused before the pipeline admits it: only the view knows its id yet
        refused = httpx.post(
            base + "/v1/chat/completions", headers=auth, json={"model": "gpt-fake"}, timeout=10
        )
        assert [r.status_code for r in (whole, streamed, refused)] == [200, 200, 400]
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)

    text = output.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # each one parses
    assert any(line["message"].startswith("Started server process") for line in lines), text
    for response, status in ((whole, "ok"), (streamed, "ok"), (refused, "error")):
        request_id = response.headers["x-request-id"]
        [line] = request_lines(lines, request_id)
        assert (line["status"], line["http_status"]) == (status, response.status_code)
        # uvicorn's own access line for the request carries its id too.
        [access] = [
            line
            for line in lines
            if line["logger"] == "uvicorn.access" and line.get("request_id") == request_id
        ]
        assert access["http_status"] == response.status_code


def test_log_format_refuses_junk_in_one_line(tmp_path: Path) -> None:
    result = load_settings(tmp_path, LOG_FORMAT="xml")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "switchboard: configuration error: LOG_FORMAT='xml' is not supported: "
        "expected one of text, json"
    ]


def test_the_default_format_stays_human_readable() -> None:
    from django.conf import settings

    assert settings.LOG_FORMAT == "text"
    [handler] = [
        handler
        for handler in logging.getLogger().handlers
        if type(handler) is logging.StreamHandler and handler.formatter is not None
    ]
    record = logging.LogRecord("switchboard.requests", logging.INFO, "", 0, "req_1 ok", (), None)
    assert handler.format(record).endswith(" INFO switchboard.requests req_1 ok")
