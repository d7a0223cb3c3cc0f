"""The browser chat shows a model's reasoning folded above its answer."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone, translation

from chatapp import hotstore
from chatapp.chat.events import alive_key, snapshot_key
from chatapp.chat.fragments import render_message
from chatapp.models import Conversation, Message
from tests.chatapp.test_chat_consumer import connect, receive_until, upstream  # noqa: F401
from tests.conftest import make_streaming_conversation, make_user
from tests.fake_upstream import FakeUpstream, Reply

pytestmark = pytest.mark.django_db(transaction=True)

THINKING = "The user greets me. <script>alert(1)</script> I should greet back."


async def test_reasoning_streams_before_the_answer_and_is_kept_with_the_reply(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text="Hello, Alice.", reasoning=THINKING, chunk_delay=0.01))
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Hi!"})
    events = await receive_until(ws, "done")

    # The reasoning comes as its own frames, first, in one sequence with the answer's.
    pieces = [event for event in events if event["type"] in ("reasoning", "delta")]
    assert [event["seq"] for event in pieces] == list(range(1, len(pieces) + 1))
    kinds = [event["type"] for event in pieces]
    assert kinds == sorted(kinds, key=lambda kind: kind != "reasoning")
    assert "".join(e["text"] for e in pieces if e["type"] == "reasoning") == THINKING
    assert "".join(e["text"] for e in pieces if e["type"] == "delta") == "Hello, Alice."

    # Saved with the reply, and shown folded (closed) above it, escaped.
    reply = await Message.objects.aget(role="assistant")
    assert (reply.content, reply.reasoning) == ("Hello, Alice.", THINKING)
    html = events[-1]["html"]
    assert '<details class="reasoning"><summary>Reasoning</summary>' in html
    assert html.index("reasoning-body") < html.index('class="body markdown"')
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    await ws.disconnect()


async def test_a_reply_without_reasoning_has_no_fold(upstream: FakeUpstream) -> None:  # noqa: F811
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text="Plain."))
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Hi!"})
    events = await receive_until(ws, "done")
    assert "reasoning" not in events[-1]["html"]
    assert not [event for event in events if event["type"] == "reasoning"]
    await ws.disconnect()


async def test_a_tab_that_joins_mid_reply_gets_the_reasoning_so_far(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    thinking = " ".join(f"t{i}" for i in range(40))
    upstream.script(Reply(text="Done.", reasoning=thinking, chunk_delay=0.03))
    first = await connect(alice)
    await first.send_json_to({"action": "send", "conversation": None, "text": "Think"})
    events = await receive_until(first, "reasoning")
    conversation_id = events[0]["conversation"]
    await first.disconnect()

    await asyncio.sleep(0.2)
    second = await connect(alice)
    await second.send_json_to({"action": "open", "conversation": conversation_id})
    snapshot = (await receive_until(second, "snapshot"))[-1]
    assert snapshot["reasoning"].startswith("t0 t1")
    assert snapshot["text"] == ""
    reasoning, seq = snapshot["reasoning"], snapshot["seq"]
    while True:
        event = await second.receive_json_from(timeout=10)
        if event["type"] == "reasoning" and event["seq"] > seq:
            assert event["seq"] == seq + 1
            seq, reasoning = event["seq"], reasoning + event["text"]
        elif event["type"] == "done":
            break
    assert reasoning == thinking
    await second.disconnect()


def _orphan(user_email: str) -> int:
    _conversation, reply = make_streaming_conversation(make_user(user_email))
    # Started a minute ago: its writer's heartbeat, had there been one, would be over.
    Message.objects.filter(pk=reply.pk).update(created_at=timezone.now() - timedelta(minutes=1))
    return reply.pk


async def test_an_interrupted_reply_keeps_its_reasoning(upstream: FakeUpstream) -> None:  # noqa: F811
    reply_id = await database_sync_to_async(_orphan)("alice@example.com")
    await hotstore.aappend(
        snapshot_key(reply_id),
        [
            (1, "reasoning", "Thinking "),
            (2, "reasoning", "so far"),
            (3, "delta", "Ha"),
            (4, "delta", "lf"),
        ],
        60,
    )
    await hotstore.aset(alive_key(reply_id), None, 1)
    alice = await database_sync_to_async(
        lambda: Message.objects.get(pk=reply_id).conversation.owner
    )()
    ws = await connect(alice)
    conversation_id = await Message.objects.values_list("conversation_id", flat=True).aget(
        pk=reply_id
    )
    await ws.send_json_to({"action": "open", "conversation": conversation_id})
    events = await receive_until(ws, "done")
    assert events[-1]["status"] == "interrupted"
    reply = await Message.objects.aget(pk=reply_id)
    assert (reply.content, reply.reasoning) == ("Half", "Thinking so far")
    assert "Thinking so far" in events[-1]["html"]
    await ws.disconnect()


def test_the_fold_is_labelled_in_chinese() -> None:
    alice = make_user("alice@example.com")
    conversation = Conversation.objects.create(owner=alice, model="chat-model")
    reply = Message.objects.create(
        conversation=conversation, role="assistant", content="好。", reasoning="想一想。"
    )
    with translation.override("zh-hans"):
        html = render_message(reply)
    assert "<summary>思考过程</summary>" in html
