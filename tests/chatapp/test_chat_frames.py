"""Malformed WebSocket frames: each gets an error frame, the socket stays open, nothing is saved."""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.db import database_sync_to_async

from chatapp.models import Conversation, Message
from tests.chatapp.test_chat_consumer import connect, receive_until, upstream  # noqa: F401
from tests.conftest import make_user
from tests.fake_upstream import FakeUpstream, Reply

pytestmark = pytest.mark.django_db(transaction=True)

MALFORMED: list[tuple[str, Any]] = [
    ("not json", "{broken"),
    ("deeply nested", "[" * 100_000 + "]" * 100_000),
    ("a huge integer", '{"action": "open", "conversation": ' + "9" * 5000 + "}"),
    ("a list", json.dumps([1, 2, 3])),
    ("a number", "42"),
    ("an unknown action", json.dumps({"action": "explode"})),
    ("an action that is a list", json.dumps({"action": ["send"]})),
    ("a conversation id that is an object", json.dumps({"action": "open", "conversation": {}})),
    ("a negative conversation id", json.dumps({"action": "open", "conversation": -1})),
    ("a float message id", json.dumps({"action": "stop", "message": 1.5})),
    ("text that is an object", json.dumps({"action": "send", "conversation": None, "text": {}})),
    (
        "attachments that are an object",
        json.dumps({"action": "send", "conversation": None, "text": "x", "attachments": {}}),
    ),
    (
        "attachments that are strings",
        json.dumps({"action": "send", "conversation": None, "text": "", "attachments": ["a"]}),
    ),
    (
        "a model that is a list",
        json.dumps({"action": "send", "conversation": None, "text": "x", "model": ["m"]}),
    ),
    (
        "a client id that is an object",
        json.dumps({"action": "stop", "message": "x", "client_id": {"a": 1}}),
    ),
    (
        "text with a lone surrogate",
        '{"action": "send", "conversation": null, "text": "hi \\ud800 there"}',
    ),
    ("text with a NUL", '{"action": "send", "conversation": null, "text": "hi \\u0000"}'),
    ("an edit of a message id string", json.dumps({"action": "edit", "message": "12a"})),
    ("a regenerate of nothing", json.dumps({"action": "regenerate"})),
]


@pytest.mark.parametrize(("what", "frame"), MALFORMED, ids=[what for what, _ in MALFORMED])
async def test_a_malformed_frame_gets_an_error_frame_and_the_socket_stays_open(
    upstream: FakeUpstream,  # noqa: F811
    what: str,
    frame: str,
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)

    await ws.send_to(text_data=frame)
    answer = await ws.receive_json_from(timeout=10)
    assert answer["type"] == "error", answer
    assert answer["error"]
    # A precise message, not the catch-all's.
    assert "could not carry out" not in answer["error"], f"{what}: {answer['error']}"
    assert not await Message.objects.aexists()
    assert not await Conversation.objects.aexists()

    # The socket still works.
    upstream.script(Reply(text="Fine."))
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Hello"})
    events = await receive_until(ws, "done")
    assert events[-1]["status"] == "complete"
    await ws.disconnect()


async def test_a_binary_frame_gets_an_error_frame(upstream: FakeUpstream) -> None:  # noqa: F811
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await ws.send_to(bytes_data=b"\x00\x01")
    answer = await ws.receive_json_from(timeout=10)
    assert answer["type"] == "error"
    await ws.disconnect()
