"""Replies whose writer is gone: a process that died, a server shutting down.

A reply marked streaming with no live writer must not lock its conversation: it is
saved as interrupted, with what was produced, the next time anyone opens, sends to
or stops that conversation; a shutdown saves and settles running replies itself.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import User
from chatapp import hotstore
from chatapp.chat import generation
from chatapp.chat.events import alive_key, snapshot_key
from chatapp.chat.fragments import render_branch
from chatapp.models import Conversation, Message
from keys import ledger
from keys.models import UsageRecord
from tests.chatapp.test_chat_consumer import connect, receive_until, upstream  # noqa: F401
from tests.conftest import make_streaming_conversation, make_user
from tests.fake_upstream import FakeUpstream, Reply

pytestmark = pytest.mark.django_db(transaction=True)


def _orphan(user: User, text_so_far: str) -> tuple[int, int]:
    """A conversation whose last reply was being written by a process that died."""
    conversation, reply = make_streaming_conversation(user)
    # Started a minute ago: its writer's heartbeat, had there been one, would be over.
    Message.objects.filter(pk=reply.pk).update(created_at=timezone.now() - timedelta(minutes=1))
    return conversation.pk, reply.pk


async def test_a_reply_whose_writer_died_is_saved_as_interrupted_on_open(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    conversation_id, reply_id = await database_sync_to_async(_orphan)(alice, "")
    # Given the dead process left its text so far, and no heartbeat...
    await hotstore.aappend(
        snapshot_key(reply_id), [(2, "delta", "Half "), (3, "delta", "a rep")], 60
    )
    await hotstore.aset(alive_key(reply_id), None, 1)
    ws = await connect(alice)

    # ...opening the conversation saves the reply as interrupted, with that text.
    await ws.send_json_to({"action": "open", "conversation": conversation_id})
    events = await receive_until(ws, "done")
    assert events[-1]["status"] == "interrupted"
    assert "Half a rep" in events[-1]["html"]
    reply = await Message.objects.aget(pk=reply_id)
    assert (reply.status, reply.content) == ("interrupted", "Half a rep")

    # And the conversation takes new messages again.
    upstream.script(Reply(text="Back again."))
    await ws.send_json_to(
        {"action": "send", "conversation": conversation_id, "text": "Still there?"}
    )
    events = await receive_until(ws, "done")
    assert events[-1]["status"] == "complete"
    await ws.disconnect()


async def test_sending_to_a_conversation_with_a_dead_reply_works_at_once(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    conversation_id, reply_id = await database_sync_to_async(_orphan)(alice, "")
    upstream.script(Reply(text="Fresh answer."))
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": conversation_id, "text": "Again"})
    events = await receive_until(ws, "done")
    assert not [event for event in events if event["type"] == "error"], events
    assert events[-1]["status"] == "complete"
    assert (await Message.objects.aget(pk=reply_id)).status == "interrupted"
    await ws.disconnect()


async def test_a_live_reply_is_not_taken_for_a_dead_one(upstream: FakeUpstream) -> None:  # noqa: F811
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text=" ".join(f"w{i}" for i in range(40)), chunk_delay=0.03))
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Count"})
    events = await receive_until(ws, "delta")
    conversation_id = events[0]["conversation"]

    other_tab = await connect(alice)
    await other_tab.send_json_to({"action": "open", "conversation": conversation_id})
    await receive_until(other_tab, "snapshot")
    done = await receive_until(ws, "done")
    assert done[-1]["status"] == "complete"
    await ws.disconnect()
    await other_tab.disconnect()


async def test_a_reply_waiting_long_for_its_first_words_is_not_taken_for_dead(
    upstream: FakeUpstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Here a heartbeat lasts a second and beats every 0.3 s; the upstream (a reasoning
    # model, a busy local model) says nothing for 2.5 s.
    monkeypatch.setattr(generation, "HEARTBEAT_TTL", 1)
    monkeypatch.setattr(generation, "HEARTBEAT_EVERY", 0.3)
    monkeypatch.setattr(generation, "WATCH_EVERY", 0.1)
    upstream.script(Reply(text="Worth the wait.", delay=2.5))
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Think hard"})
    conversation_id = (await receive_until(ws, "messages"))[0]["conversation"]
    await asyncio.sleep(1.8)  # past a heartbeat's lifetime, before any word
    # Another tab opens the conversation: the reply is still being written.
    other_tab = await connect(alice)
    await other_tab.send_json_to({"action": "open", "conversation": conversation_id})
    assert (await other_tab.receive_json_from(timeout=5))["type"] == "opened"
    assert (await other_tab.receive_json_from(timeout=5))["type"] == "snapshot"
    done = await receive_until(other_tab, "done")
    assert done[-1]["status"] == "complete"
    assert "".join(event.get("text", "") for event in done if event["type"] == "delta") == (
        "Worth the wait."
    )
    assert (await receive_until(ws, "done"))[-1]["status"] == "complete"
    reply = await Message.objects.aget(role="assistant")
    assert (reply.status, reply.content) == ("complete", "Worth the wait.")
    await ws.disconnect()
    await other_tab.disconnect()


async def test_a_stop_before_the_first_words_stops_the_reply(
    upstream: FakeUpstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(generation, "WATCH_EVERY", 0.1)
    # The upstream keeps silent for four seconds (a model thinking, a busy local model).
    upstream.script(Reply(text="Too late.", delay=4))
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Think hard"})
    await receive_until(ws, "messages")
    reply = await Message.objects.aget(role="assistant")
    await asyncio.sleep(0.3)  # the upstream has the request
    await ws.send_json_to({"action": "stop", "message": reply.pk})
    done = await receive_until(ws, "done", wait=3)  # before the upstream says anything
    assert done[-1]["status"] == "stopped"
    await reply.arefresh_from_db()
    assert (reply.status, reply.content) == ("stopped", "")
    await asyncio.to_thread(ledger.flush)
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert record.status == "stopped"
    await ws.disconnect()


async def test_a_shutdown_saves_running_replies_and_bills_what_they_produced(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    # Long enough (7.5 s) that it cannot end on its own before the shutdown, even on a
    # loaded machine where the first delta reaches the test late.
    upstream.script(Reply(text=" ".join(f"w{i}" for i in range(150)), chunk_delay=0.05))
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Count"})
    await receive_until(ws, "delta")
    await asyncio.sleep(0.2)

    # When the server is told to stop (what SIGTERM runs)...
    await generation.shutdown()

    # ...the reply is saved as interrupted with its text, and metered once.
    done = await receive_until(ws, "done")
    assert done[-1]["status"] == "interrupted"
    reply = await Message.objects.aget(role="assistant")
    assert reply.status == "interrupted"
    assert reply.content.startswith("w0 w1")
    await asyncio.to_thread(ledger.flush)
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert record.status == "interrupted"
    assert record.output_tokens > 0
    await ws.disconnect()


def _long_conversation(user: User, turns: int) -> Conversation:
    conversation = Conversation.objects.create(owner=user, model="chat-model")
    parent = None
    for number in range(turns):
        role = "user" if number % 2 == 0 else "assistant"
        parent = Message.objects.create(
            conversation=conversation, parent=parent, role=role, content=f"**turn** {number}"
        )
        if role == "assistant" and number % 4 == 1:
            # A second version of some replies: siblings to count.
            Message.objects.create(
                conversation=conversation,
                parent=parent.parent,
                role="assistant",
                content="another version",
            )
    conversation.current_leaf = parent
    conversation.save()
    return conversation


def _queries_to_render(conversation: Conversation) -> tuple[int, str]:
    with CaptureQueriesContext(connection) as queries:
        html = render_branch(Conversation.objects.get(pk=conversation.pk))
    return len(queries), html


@pytest.mark.parametrize("turns", [4, 40])
def test_a_branch_renders_in_a_fixed_number_of_queries(alice: Any, turns: int) -> None:
    count, html = _queries_to_render(_long_conversation(alice, turns))
    assert count <= 3, f"{count} queries for {turns} messages"
    assert html.count('class="msg ') == turns
    assert "1/2" in html or turns < 2


async def test_a_reply_that_has_not_beaten_yet_is_not_taken_for_dead(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    conversation_id, reply_id = await database_sync_to_async(_orphan)(alice, "")
    # A reply whose task has not started yet: just created, no heartbeat so far.
    await Message.objects.filter(pk=reply_id).aupdate(created_at=timezone.now())
    await hotstore.aset(alive_key(reply_id), None, 1)
    ws = await connect(alice)
    await ws.send_json_to({"action": "open", "conversation": conversation_id})
    assert (await ws.receive_json_from(timeout=5))["type"] == "opened"
    assert (await ws.receive_json_from(timeout=5))["type"] == "snapshot"  # still being written
    assert (await Message.objects.aget(pk=reply_id)).status == "streaming"
    await ws.disconnect()
