"""The chat WebSocket: streaming, stop, reconnect replay, ownership, disabled users."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from accounts.models import User
from chatapp.chat import actions
from chatapp.chat import consumers as chat_consumers
from chatapp.chat.consumers import ChatConsumer
from chatapp.models import CatalogModel, Conversation, Message, Provider, Route
from chatapp.relay import routing
from keys import ledger
from keys.models import UsageRecord
from tests.chatapp.test_chat_views import conversation_with_versions
from tests.conftest import make_user
from tests.fake_upstream import DropMidStream, Fail, FakeUpstream, Reply
from tests.live import CountingUpstream

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def upstream(transactional_db: None, settings) -> Iterator[FakeUpstream]:  # type: ignore[no-untyped-def]
    # Titles come from the first words here: a title request would take a scripted reply.
    settings.SWITCHBOARD_CHAT_TITLES = False
    routing.reset()
    fake = FakeUpstream().start()
    provider = Provider.objects.create(
        name="fake", type="openai", base_url=fake.openai_base_url, timeout=5
    )
    model = CatalogModel.objects.create(
        name="chat-model", display_name="Chat Model", supports_vision=True
    )
    Route.objects.create(model=model, provider=provider, upstream_model="up")
    CatalogModel.objects.create(name="text-only", display_name="Text Only")
    Route.objects.create(
        model=CatalogModel.objects.get(name="text-only"), provider=provider, upstream_model="up2"
    )
    yield fake
    fake.stop()


async def connect(user: User) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def receive_until(
    communicator: WebsocketCommunicator, kind: str, wait: float = 10
) -> list[dict[str, Any]]:
    """Every event up to and including the first of ``kind``."""
    events = []
    while True:
        event = await communicator.receive_json_from(timeout=wait)
        events.append(event)
        if event["type"] == kind:
            return events


async def test_tabs_open_and_close_while_the_database_thread_is_busy() -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    # Another request's long trip holds the process's database thread for 3 s (a burst
    # of sends and saves, on SQLite).  Opening and closing a tab touch no database.
    busy = asyncio.ensure_future(database_sync_to_async(time.sleep)(3))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    ws = await connect(alice)
    await ws.disconnect()
    assert time.monotonic() - started < 1.5
    await busy


async def test_a_message_streams_its_reply_and_is_saved(upstream: FakeUpstream) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(
        Reply(text="Hello there, Alice.", input_tokens=9, output_tokens=4, chunk_delay=0.01)
    )
    ws = await connect(alice)
    await ws.send_json_to(
        {
            "action": "send",
            "conversation": None,
            "text": "Hi!",
            "attachments": [],
            "client_id": "c1",
        }
    )
    events = await receive_until(ws, "done")
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["created", "messages"]
    assert events[1]["client_id"] == "c1"
    deltas = [event for event in events if event["type"] == "delta"]
    assert "".join(event["text"] for event in deltas) == "Hello there, Alice."
    assert [event["seq"] for event in deltas] == list(range(1, len(deltas) + 1))
    assert events[-1]["status"] == "complete"
    assert "Hello there, Alice." in events[-1]["html"]

    conversation = await Conversation.objects.aget(owner=alice)
    reply = await Message.objects.aget(conversation=conversation, role="assistant")
    assert (reply.content, reply.status, reply.input_tokens, reply.output_tokens) == (
        "Hello there, Alice.",
        "complete",
        9,
        4,
    )
    # Metered like the API, on the user's web key.
    await asyncio.to_thread(ledger.flush)
    record = await UsageRecord.objects.select_related("key").aget(request_id=reply.request_id)
    assert (record.endpoint, record.dialect, record.key.is_web_key) == ("browser", "browser", True)
    await ws.disconnect()


async def test_the_reply_keeps_generating_after_the_tab_closes_and_a_new_tab_replays_it(
    upstream: FakeUpstream,
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text=" ".join(f"w{i}" for i in range(30)), chunk_delay=0.03))
    first = await connect(alice)
    await first.send_json_to(
        {"action": "send", "conversation": None, "text": "Count", "attachments": []}
    )
    events = await receive_until(first, "delta")
    conversation_id = events[0]["conversation"]
    await first.disconnect()  # the tab closes mid-reply

    await asyncio.sleep(0.2)
    second = await connect(alice)
    await second.send_json_to({"action": "open", "conversation": conversation_id})
    opened = await receive_until(second, "snapshot")
    snapshot = opened[-1]
    assert snapshot["seq"] > 1
    assert snapshot["text"].startswith("w0 w1")
    # Then the live tail: deltas after the snapshot, no gap, no repeat.
    text, seq = snapshot["text"], snapshot["seq"]
    while True:
        event = await second.receive_json_from(timeout=10)
        if event["type"] == "delta" and event["seq"] > seq:
            assert event["seq"] == seq + 1
            seq, text = event["seq"], text + event["text"]
        elif event["type"] == "done":
            break
    assert text == " ".join(f"w{i}" for i in range(30))
    reply = await Message.objects.aget(conversation_id=conversation_id, role="assistant")
    assert reply.content == text
    await second.disconnect()


async def test_stop_keeps_the_partial_reply_and_bills_it(upstream: FakeUpstream) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text=" ".join(["word"] * 200), chunk_delay=0.02))
    ws = await connect(alice)
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "Talk", "attachments": []}
    )
    events = await receive_until(ws, "delta")
    reply_id = events[-1]["message"]
    await ws.send_json_to({"action": "stop", "message": reply_id})
    done = (await receive_until(ws, "done"))[-1]
    assert done["status"] == "stopped"
    reply = await Message.objects.aget(pk=reply_id)
    assert reply.status == "stopped"
    assert 0 < len(reply.content.split()) < 200
    assert reply.output_tokens > 0
    await ws.disconnect()


async def test_regenerate_and_edit_create_sibling_versions(upstream: FakeUpstream) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text="first"), Reply(text="second"), Reply(text="after edit"))
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Q", "attachments": []})
    first = (await receive_until(ws, "done"))[-1]["message"]
    await ws.send_json_to({"action": "regenerate", "message": first})
    second = (await receive_until(ws, "done"))[-1]["message"]
    original = await Message.objects.aget(pk=first)
    regenerated = await Message.objects.aget(pk=second)
    assert regenerated.parent_id == original.parent_id
    assert await database_sync_to_async(lambda: len(regenerated.siblings()))() == 2

    await ws.send_json_to({"action": "edit", "message": original.parent_id, "text": "Q, edited"})
    edited_reply = (await receive_until(ws, "done"))[-1]["message"]
    reply = await Message.objects.select_related("parent").aget(pk=edited_reply)
    assert reply.content == "after edit"
    assert reply.parent.content == "Q, edited"
    assert reply.parent.parent_id is None  # a sibling of the first question
    conversation = await Conversation.objects.aget(owner=alice)
    assert conversation.current_leaf_id == edited_reply
    await ws.disconnect()


async def test_errors_appear_in_the_conversation_and_refusals_lose_nothing(
    upstream: FakeUpstream,
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(*[Fail(500, "provider down")] * 3)
    ws = await connect(alice)
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "Hello?", "attachments": []}
    )
    done = (await receive_until(ws, "done"))[-1]
    assert done["status"] == "failed"
    # The person reads what happened in plain words, never the upstream's own text.
    assert "could not answer just now" in done["html"]
    assert "provider down" not in done["html"]
    # The user's turn was saved; nothing typed is lost.
    assert await Message.objects.filter(role="user", content="Hello?").aexists()
    # A refusal before anything is saved comes back with the client's id.
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "", "attachments": [], "client_id": "c9"}
    )
    error = await ws.receive_json_from(timeout=5)
    assert error == {"type": "error", "error": "Type a message first.", "client_id": "c9"}
    await ws.disconnect()


async def test_bob_cannot_open_or_touch_alices_conversation(upstream: FakeUpstream) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    bob = await database_sync_to_async(make_user)("bob@example.com")
    upstream.script(Reply(text="private"))
    ws = await connect(alice)
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "secret", "attachments": []}
    )
    events = await receive_until(ws, "done")
    conversation_id, reply_id = events[0]["conversation"], events[-1]["message"]
    await ws.disconnect()

    intruder = await connect(bob)
    for action in (
        {"action": "open", "conversation": conversation_id},
        {"action": "send", "conversation": conversation_id, "text": "hi", "attachments": []},
        {"action": "regenerate", "message": reply_id},
        {"action": "stop", "message": reply_id},
        {"action": "edit", "message": reply_id - 1, "text": "x"},
    ):
        await intruder.send_json_to(action)
        answer = await intruder.receive_json_from(timeout=5)
        assert answer["type"] == "error"
        assert answer["error"] in ("No such conversation.", "No such message.")
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2
    await intruder.disconnect()


async def test_a_disabled_user_is_cut_off(upstream: FakeUpstream) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await User.objects.filter(pk=alice.pk).aupdate(is_active=False)
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "still here?", "attachments": []}
    )
    assert (await ws.receive_json_from(timeout=5))["error"] == "Your account is disabled."
    assert (await ws.receive_output(timeout=5))["type"] == "websocket.close"
    assert not await Message.objects.aexists()


async def test_anonymous_sockets_are_refused() -> None:
    from django.contrib.auth.models import AnonymousUser

    communicator = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
    communicator.scope["user"] = AnonymousUser()
    connected, code = await communicator.connect()
    assert not connected
    assert code == 4401


async def test_a_model_without_vision_refuses_images_before_sending(upstream: FakeUpstream) -> None:
    from chatapp.models import Attachment

    alice = await database_sync_to_async(make_user)("alice@example.com")
    image = await Attachment.objects.acreate(
        owner=alice, file="attachments/x.png", media_type="image/png", width=1, height=1, size=1
    )
    ws = await connect(alice)
    await ws.send_json_to(
        {
            "action": "send",
            "conversation": None,
            "text": "look",
            "attachments": [image.pk],
            "model": "text-only",
        }
    )
    error = await ws.receive_json_from(timeout=5)
    assert error["type"] == "error"
    assert error["error"] == (
        "Text Only cannot read images: remove the image or pick a model that can."
    )
    assert upstream.requests == []
    assert not await Message.objects.aexists()
    await ws.disconnect()


async def test_switching_a_conversation_to_a_model_without_vision_refuses_its_image(
    upstream: FakeUpstream,
) -> None:
    from chatapp.models import Attachment

    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text="Hello."))
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Hi", "attachments": []})
    conversation_id = (await receive_until(ws, "done"))[0]["conversation"]
    await receive_until(ws, "title")  # the first exchange titles the conversation
    requests = len(upstream.requests)
    # Given an image attached after alice picked a model that cannot read it,
    image = await Attachment.objects.acreate(
        owner=alice, file="attachments/x.png", media_type="image/png", width=1, height=1, size=1
    )
    await ws.send_json_to(
        {
            "action": "send",
            "conversation": conversation_id,
            "text": "What is in this picture?",
            "attachments": [image.pk],
            "model": "text-only",
            "client_id": "c2",
        }
    )
    # the send is refused, saying why, and nothing is saved or sent upstream.
    assert await ws.receive_json_from(timeout=5) == {
        "type": "error",
        "error": "Text Only cannot read images: remove the image or pick a model that can.",
        "client_id": "c2",
    }
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2
    assert len(upstream.requests) == requests
    await image.arefresh_from_db()
    assert image.message_id is None  # still attached to nothing: the page can send it again
    await ws.disconnect()


async def test_the_settings_of_a_new_conversation_reach_its_first_request(
    upstream: FakeUpstream,
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text="Arr, hello."), Reply(text="Arr, again."))
    ws = await connect(alice)
    # Given a system prompt and a temperature typed in Settings before the first send,
    await ws.send_json_to(
        {
            "action": "send",
            "conversation": None,
            "text": "Hi!",
            "attachments": [],
            "system_prompt": "Talk like a pirate.",
            "temperature": "0.3",
            "client_id": "c1",
        }
    )
    events = await receive_until(ws, "done")
    # the very first request upstream carries them,
    first = upstream.requests[0].json
    assert first["messages"][0]["role"] == "system"
    assert "Talk like a pirate." in json.dumps(first["messages"][0]["content"])
    assert first["temperature"] == 0.3
    # and the conversation keeps them for the next ones.
    conversation = await Conversation.objects.aget(pk=events[0]["conversation"])
    assert (conversation.system_prompt, conversation.temperature) == ("Talk like a pirate.", 0.3)
    await ws.send_json_to(
        {"action": "send", "conversation": conversation.pk, "text": "Again", "attachments": []}
    )
    await receive_until(ws, "done")
    assert upstream.requests[1].json["messages"][0]["role"] == "system"
    await ws.disconnect()


async def test_a_new_conversation_with_junk_settings_is_refused(upstream: FakeUpstream) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    for settings, error in (
        ({"temperature": "hot"}, "The temperature must be a number from 0 to 2."),
        ({"temperature": 7}, "The temperature must be a number from 0 to 2."),
        ({"system_prompt": ["no"]}, "The system prompt must be text."),
    ):
        await ws.send_json_to(
            {"action": "send", "conversation": None, "text": "Hi", "attachments": [], **settings}
        )
        assert (await ws.receive_json_from(timeout=5))["error"] == error
    assert not await Conversation.objects.aexists()
    assert upstream.requests == []
    await ws.disconnect()


async def price_chat_model() -> None:
    from keys.actions import do_set_price

    model = await CatalogModel.objects.aget(name="chat-model")
    await database_sync_to_async(do_set_price)(
        model=model, input_price=Decimal(1000), output_price=Decimal(1000)
    )


async def record_of(message_id: int) -> UsageRecord:
    reply = await Message.objects.aget(pk=message_id)
    await asyncio.to_thread(ledger.flush)
    return await UsageRecord.objects.select_related("key").aget(request_id=reply.request_id)


async def test_a_stopped_reply_is_recorded_as_stopped_and_billed(upstream: FakeUpstream) -> None:
    await price_chat_model()
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text=" ".join(["word"] * 200), chunk_delay=0.02))
    ws = await connect(alice)
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "Talk", "attachments": []}
    )
    reply_id = (await receive_until(ws, "delta"))[-1]["message"]
    await ws.send_json_to({"action": "stop", "message": reply_id})
    assert (await receive_until(ws, "done"))[-1]["status"] == "stopped"
    record = await record_of(reply_id)
    assert record.status == "stopped"
    assert 0 < record.output_tokens < 200
    assert record.cost > 0
    await ws.disconnect()


async def test_a_reply_cut_by_the_upstream_is_an_error_billed_for_what_it_produced(
    upstream: FakeUpstream,
) -> None:
    await price_chat_model()
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(DropMidStream(after_chunks=4, text="Once upon a time there was a keeper."))
    ws = await connect(alice)
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "Story", "attachments": []}
    )
    done = (await receive_until(ws, "done"))[-1]
    assert done["status"] == "failed"
    reply = await Message.objects.aget(pk=done["message"])
    assert reply.content  # what arrived is kept
    record = await record_of(done["message"])
    assert (record.status, record.http_status) == ("error", 502)
    assert record.output_tokens > 0
    assert record.cost > 0
    assert reply.cost == record.cost
    await ws.disconnect()


async def test_a_reply_the_upstream_never_served_costs_nothing(upstream: FakeUpstream) -> None:
    from keys import limiter

    await price_chat_model()
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(*[Fail(500, "provider down")] * 3)
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Hi", "attachments": []})
    done = (await receive_until(ws, "done"))[-1]
    assert done["status"] == "failed"
    reply = await Message.objects.aget(pk=done["message"])
    assert (reply.input_tokens, reply.output_tokens, reply.cost) == (0, 0, Decimal(0))
    record = await record_of(done["message"])
    assert (record.status, record.input_tokens, record.output_tokens) == ("error", 0, 0)
    assert record.cost == Decimal(0)
    key = record.key
    usage = await database_sync_to_async(limiter.usage)(key_id=key.pk, limits=key.limits)
    assert usage["money_budget"]["spent"] == "0"
    await ws.disconnect()


@pytest.fixture
def eager_celery(settings) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Tasks run inline, as in the embedded mode, whatever this run's broker."""
    from chatapp.celery import app as celery_app

    previous = celery_app.conf.task_always_eager
    settings.CELERY_TASK_ALWAYS_EAGER = True
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


async def test_a_new_conversation_is_titled_by_its_model_after_the_first_exchange(
    upstream: FakeUpstream, settings, eager_celery: None
) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_CHAT_TITLES = True
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text="Paris is lovely in spring."), Reply(text='"Paris Trip Planning"'))
    ws = await connect(alice)
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "Plan a trip to Paris", "attachments": []}
    )
    title = (await receive_until(ws, "title"))[-1]
    assert title["title"] == "Paris Trip Planning"
    conversation = await Conversation.objects.aget(owner=alice)
    assert (conversation.title, conversation.title_generated) == ("Paris Trip Planning", True)
    # The title request was metered on the web key too.
    assert "Write a short title" in upstream.requests[-1].json["messages"][0]["content"]
    await ws.disconnect()


def _image(owner: User, color: tuple[int, int, int]) -> Any:
    import io

    from django.core.files.base import ContentFile
    from PIL import Image

    from chatapp.models import Attachment

    data = io.BytesIO()
    Image.new("RGB", (2, 2), color).save(data, "PNG")
    image = Attachment(
        owner=owner, media_type="image/png", width=2, height=2, size=len(data.getvalue())
    )
    image.file.save("photo.png", ContentFile(data.getvalue()), save=True)
    return image


def _images_sent(request: Any) -> list[str]:
    """The data URLs of every image in an upstream chat request, in order."""
    return [
        part["image_url"]["url"]
        for message in request.json["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]


async def test_images_reach_the_upstream_and_the_branch_in_new_and_existing_conversations(
    upstream: FakeUpstream,
) -> None:
    import base64

    alice = await database_sync_to_async(make_user)("alice@example.com")
    red = await database_sync_to_async(_image)(alice, (255, 0, 0))
    blue = await database_sync_to_async(_image)(alice, (0, 0, 255))
    upstream.script(Reply(text="A red square."), Reply(text="A blue one."))
    ws = await connect(alice)
    # A new conversation's first message (its messages are not read back)...
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "What?", "attachments": [red.pk]}
    )
    events = await receive_until(ws, "done")
    conversation_id = events[0]["conversation"]
    assert f"/chat/attachments/{red.pk}/" in events[1]["html"]
    # ...then a second one in it (the conversation's messages are read with theirs).
    await ws.send_json_to(
        {
            "action": "send",
            "conversation": conversation_id,
            "text": "And this?",
            "attachments": [blue.pk],
        }
    )
    events = await receive_until(ws, "done")
    html = next(event["html"] for event in events if event["type"] == "messages")
    assert f"/chat/attachments/{red.pk}/" in html
    assert f"/chat/attachments/{blue.pk}/" in html

    def encoded(image: Any) -> str:
        with image.file.open("rb") as handle:
            return "data:image/png;base64," + base64.b64encode(handle.read()).decode()

    first, second = upstream.requests[:2]
    assert _images_sent(first) == [encoded(red)]
    assert _images_sent(second) == [encoded(red), encoded(blue)]
    await ws.disconnect()


@contextlib.asynccontextmanager
async def _holding(*rows: tuple[str, int]) -> AsyncIterator[None]:
    """A transaction of its own holding these (table, id) rows for the block, as another
    writer would; rolled back at its end."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(**_connection_params()) as holder:
        for table, pk in rows:
            await holder.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", [pk])
        try:
            yield
        finally:
            await holder.rollback()


def _connection_params() -> dict[str, Any]:
    from django.db import connection

    database = connection.settings_dict
    return {
        "host": database["HOST"],
        "port": database["PORT"],
        "user": database["USER"],
        "password": database["PASSWORD"] or None,
        "dbname": database["NAME"],
    }


async def _wait_for_lock_waiters(count: int) -> None:
    """Until ``count`` backends of the test database wait on a row lock."""
    import psycopg

    params = _connection_params()
    async with await psycopg.AsyncConnection.connect(**params, autocommit=True) as watcher:
        for _ in range(100):
            cursor = await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = %s AND wait_event_type = 'Lock'",
                [params["dbname"]],
            )
            row = await cursor.fetchone()
            if row is not None and row[0] >= count:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{count} backend(s) never waited on the lock")


async def test_on_postgresql_a_send_waiting_on_a_lock_holds_up_no_other_chat(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("SQLite takes one writer at a time: its trips share one thread")
    monkeypatch.setattr(actions, "LOCK_WAIT", 60.0)  # here it waits for as long as it takes
    alice = await database_sync_to_async(make_user)("alice@example.com")
    bob = await database_sync_to_async(make_user)("bob@example.com")
    upstream.script(Reply(text="First."), Reply(text="For Bob."), Reply(text="Second."))
    alice_ws = await connect(alice)
    await alice_ws.send_json_to(
        {"action": "send", "conversation": None, "text": "Hi", "attachments": []}
    )
    conversation_id = (await receive_until(alice_ws, "done"))[0]["conversation"]
    await receive_until(alice_ws, "title")  # the first exchange titles the conversation
    # Another transaction holds Alice's conversation row (a send of another tab, a slow
    # writer): her next send waits for it...
    async with _holding(("chatapp_conversation", conversation_id)):
        await alice_ws.send_json_to(
            {"action": "send", "conversation": conversation_id, "text": "More", "attachments": []}
        )
        await _wait_for_lock_waiters(1)
        # ...while Bob, on the same process, starts a conversation and reads its reply.
        bob_ws = await connect(bob)
        await bob_ws.send_json_to(
            {"action": "send", "conversation": None, "text": "Hello", "attachments": []}
        )
        events = await receive_until(bob_ws, "done", wait=5)
        assert events[-1]["status"] == "complete"
        assert await alice_ws.receive_nothing(timeout=0.2)  # still waiting
    events = await receive_until(alice_ws, "done")
    assert [event["status"] for event in events if event["type"] == "done"] == ["complete"]
    await alice_ws.disconnect()
    await bob_ws.disconnect()


async def test_on_postgresql_a_send_to_a_conversation_held_too_long_is_refused_as_busy(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("SQLite has no row locks: a writer waits for the database's own")
    monkeypatch.setattr(actions, "LOCK_WAIT", 0.5)
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text="First."), Reply(text="Second."))
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Hi", "attachments": []})
    conversation_id = (await receive_until(ws, "done"))[0]["conversation"]
    await receive_until(ws, "title")
    # Another writer holds the conversation for longer than a send waits: the send is
    # refused in words, nothing of it saved, and the write thread it took is free again.
    async with _holding(("chatapp_conversation", conversation_id)):
        await ws.send_json_to(
            {"action": "send", "conversation": conversation_id, "text": "More", "client_id": "c2"}
        )
        refused = await ws.receive_json_from(timeout=10)
        assert refused == {
            "type": "error",
            "error": "This conversation is busy: another change to it is still being saved. "
            "Nothing was saved; try again in a moment.",
            "client_id": "c2",
        }
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2
    # Once the other writer is done, the same send goes through.
    await ws.send_json_to(
        {"action": "send", "conversation": conversation_id, "text": "More", "attachments": []}
    )
    events = await receive_until(ws, "done")
    assert events[-1]["status"] == "complete"
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 4
    await ws.disconnect()


@contextlib.contextmanager
def _held_by_another_writer(
    conversation: Conversation, write: Callable[[], Any] | None = None
) -> Iterator[Future[Any]]:
    """Another writer's transaction, on a thread of its own, holding the conversation's row
    for the block after doing ``write`` under the lock (``_holding`` for synchronous tests
    that write through the ORM); the future gives ``write``'s result once it committed."""
    from django.db import connection, transaction

    holding, release = threading.Event(), threading.Event()

    def writer() -> Any:
        try:
            with transaction.atomic():
                Conversation.objects.select_for_update().get(pk=conversation.pk)
                result = write() if write is not None else None
                holding.set()
                release.wait(10)
            return result
        finally:
            connection.close()

    with ThreadPoolExecutor(1) as pool:
        written = pool.submit(writer)
        assert holding.wait(10)
        try:
            yield written
        finally:
            release.set()
            written.result(timeout=10)


def test_on_postgresql_switching_versions_waits_for_a_send_being_saved(alice: User) -> None:
    """The leaf to show is looked for once the conversation is locked, not before."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("on SQLite one writer at a time: the switch cannot overlap a send")
    conversation, first, _second = conversation_with_versions(alice)

    def switch() -> None:
        try:
            actions.do_switch_branch(user_id=alice.pk, message_id=first.pk)
        finally:
            connection.close()

    def follow_up() -> Message:
        return Message.objects.create(
            conversation=conversation, parent=first, role="user", content="And after?"
        )

    # A send appending to the first version (another tab) holds the conversation...
    with ThreadPoolExecutor(1) as pool:
        with _held_by_another_writer(conversation, follow_up) as sending:
            switching = pool.submit(switch)
            asyncio.run(_wait_for_lock_waiters(1))  # ...the switch waits for it...
        switching.result(timeout=10)
    # ...and then shows the first version with the message the send added to it.
    conversation.refresh_from_db()
    assert conversation.current_leaf_id == sending.result().pk


def test_on_postgresql_a_version_switch_held_up_too_long_answers_409(
    alice: User, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("SQLite has no row locks")
    monkeypatch.setattr(actions, "LOCK_WAIT", 0.3)
    conversation, first, _second = conversation_with_versions(alice)
    client.force_login(alice)
    with _held_by_another_writer(conversation):
        response = client.post(f"/chat/messages/{first.pk}/switch/")
    assert response.status_code == 409
    assert response["X-Chat-Refusal"] == "1"  # the page shows these words as they are
    assert response.content.decode().startswith("This conversation is busy")


async def test_two_tabs_sending_one_image_at_once_attach_it_to_one_message(
    upstream: FakeUpstream,
) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("on SQLite one send at a time writes: they cannot interleave")
    alice = await database_sync_to_async(make_user)("alice@example.com")
    image = await database_sync_to_async(_image)(alice, (0, 128, 0))
    upstream.script(Reply(text="A green square."))
    first_tab, second_tab = await connect(alice), await connect(alice)
    # Both tabs send the upload while another writer holds it: both sends have read it
    # as attached to nothing, and both wait to take it.
    async with _holding(("chatapp_attachment", image.pk)):
        for tab in (first_tab, second_tab):
            await tab.send_json_to(
                {"action": "send", "conversation": None, "text": "What?", "attachments": [image.pk]}
            )
        await _wait_for_lock_waiters(2)
    answers = [await tab.receive_json_from(timeout=10) for tab in (first_tab, second_tab)]
    assert sorted(answer["type"] for answer in answers) == ["created", "error"]
    refused = next(answer for answer in answers if answer["type"] == "error")
    assert refused["error"] == "An attached image is missing: upload it again."
    # One conversation, whose message holds the image; nothing of the refused send.
    await image.arefresh_from_db()
    conversation = await Conversation.objects.aget(owner=alice)
    message = await Message.objects.aget(conversation=conversation, role="user")
    assert image.message_id == message.pk
    sent = first_tab if answers[0]["type"] == "created" else second_tab
    assert (await receive_until(sent, "done"))[-1]["status"] == "complete"
    await first_tab.disconnect()
    await second_tab.disconnect()


async def _tab_opens_against(upstream_url: str) -> WebsocketCommunicator:
    """A chat model routed to ``upstream_url`` beside the local default, then alice's tab opened."""

    def catalog() -> User:
        routing.reset()
        # The page's default is the local model: the one a message takes may be the other.
        local = Provider.objects.create(name="here", type="local", model_path="/nowhere.gguf")
        default = CatalogModel.objects.create(
            name="local-model", display_name="Local", is_chat_default=True
        )
        Route.objects.create(model=default, provider=local, upstream_model="local")
        provider = Provider.objects.create(
            name="counted", type="openai", base_url=upstream_url, timeout=5
        )
        model = CatalogModel.objects.create(name="chat-model", display_name="Chat Model")
        Route.objects.create(model=model, provider=provider, upstream_model="up")
        return make_user("alice@example.com")

    alice = await database_sync_to_async(catalog)()
    return await connect(alice)


async def test_a_tab_that_opens_has_its_upstream_connection_opened_before_its_first_message(
    counting_upstream: CountingUpstream,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    settings.SWITCHBOARD_CHAT_PRECONNECT = 1000
    ws = await _tab_opens_against(counting_upstream.url)
    # One connection, made while the tab is open and nothing is sent: its first
    # message skips the handshakes (the pool's reuse: test_relay_http).
    await counting_upstream.wait_for(1)
    assert counting_upstream.requests == 0
    await asyncio.sleep(0.1)
    assert counting_upstream.accepted == 1
    await ws.disconnect()


async def test_no_connection_is_opened_ahead_when_preconnecting_is_off(
    counting_upstream: CountingUpstream,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    settings.SWITCHBOARD_CHAT_PRECONNECT = 0
    ws = await _tab_opens_against(counting_upstream.url)
    await asyncio.sleep(0.3)
    assert counting_upstream.accepted == 0
    await ws.disconnect()


async def test_tabs_that_open_get_connections_up_to_the_number_set(
    counting_upstream: CountingUpstream,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    settings.SWITCHBOARD_CHAT_PRECONNECT = 2
    first = await _tab_opens_against(counting_upstream.url)
    await counting_upstream.wait_for(1)
    alice = await User.objects.aget(email="alice@example.com")
    # Three more tabs: one connection each while fewer than two are idle, then none.
    tabs = [first, *[await connect(alice) for _ in range(3)]]
    await asyncio.wait_for(asyncio.gather(*chat_consumers._preconnecting), 5)
    await counting_upstream.wait_for(2)
    await asyncio.sleep(0.1)
    assert counting_upstream.accepted == 2
    for tab in tabs:
        await tab.disconnect()


async def test_a_tab_opens_and_sends_while_its_upstream_cannot_be_reached(
    caplog: pytest.LogCaptureFixture,
    counting_upstream: CountingUpstream,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    settings.SWITCHBOARD_CHAT_PRECONNECT = 1000
    url = counting_upstream.url
    await counting_upstream.close()  # nothing listens there
    with caplog.at_level("INFO", logger="chatapp.chat.consumers"):
        ws = await _tab_opens_against(url)
        await asyncio.wait_for(asyncio.gather(*chat_consumers._preconnecting), 5)
    assert f"opening a connection to {url} ahead failed" in caplog.text
    # The tab works as ever: its message is saved and its reply fails as it would have.
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "hello", "model": "chat-model"}
    )
    events = await receive_until(ws, "done")
    assert events[-1]["status"] == "failed"
    assert await Message.objects.filter(role="user", content="hello").aexists()
    await ws.disconnect()
