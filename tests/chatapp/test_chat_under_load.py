"""What keeps the chat quick when many people press Enter at once (issue 17).

The figures are measured by ``.ci/chat_load.py``; these tests pin the behaviour the
speed rests on, and that nothing the user sees changed for it: pieces of a reply
that arrive together go out as one frame (in order, numbered without gaps, the
snapshot growing with them); a send reads nothing back; a burst loads the catalog
once; a catalog change still reaches the next send.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.client_proto import ResponseHandler
from channels.db import database_sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chatapp import hotstore
from chatapp.chat import actions, events, generation
from chatapp.chat.consumers import _start
from chatapp.models import CatalogModel, Conversation, Message, Route
from chatapp.relay import catalog
from chatapp.relay.canonical import ReasoningDelta, TextDelta
from chatapp.relay.dialects.browser import ReplyWriter
from chatapp.relay.upstreams import UpstreamItem
from keys import ledger
from keys.models import UsageRecord
from tests.chatapp.test_chat_consumer import connect, receive_until, upstream  # noqa: F401
from tests.conftest import make_streaming_conversation, make_user
from tests.fake_upstream import FakeUpstream, Reply

pytestmark = pytest.mark.django_db(transaction=True)


def test_pieces_gathered_between_two_takes_are_one_frame_per_run() -> None:
    writer = ReplyWriter(7)
    writer.item(UpstreamItem("", {}, [ReasoningDelta("Let me "), ReasoningDelta("think.")]))
    writer.item(UpstreamItem("", {}, [TextDelta("Hel"), TextDelta("lo")]))
    writer.item(UpstreamItem("", {}, [TextDelta(", world")]))
    assert writer.take() == [
        {"type": "reasoning", "message": 7, "seq": 1, "text": "Let me think."},
        {"type": "delta", "message": 7, "seq": 2, "text": "Hello, world"},
    ]
    assert writer.take() == []  # nothing new: nothing to publish
    writer.item(UpstreamItem("", {}, [TextDelta("!")]))
    assert writer.take() == [{"type": "delta", "message": 7, "seq": 3, "text": "!"}]
    assert (writer.text, writer.reasoning) == ("Hello, world!", "Let me think.")


async def test_a_fast_reply_arrives_in_fewer_frames_in_order_and_whole(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    words = [f"w{i}" for i in range(60)]
    # A piece every 5 ms: ten of them within one publication interval (50 ms).
    upstream.script(Reply(text=" ".join(words), chunk_delay=0.005))
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Go", "attachments": []})
    frames = [frame for frame in await receive_until(ws, "done") if frame["type"] == "delta"]
    # The 60 pieces went out in a handful of frames, numbered 1, 2, 3... with no gap.
    assert len(frames) < len(words) / 3
    assert [frame["seq"] for frame in frames] == list(range(1, len(frames) + 1))
    assert "".join(frame["text"] for frame in frames) == " ".join(words)
    reply = await Message.objects.aget(role="assistant")
    assert reply.content == " ".join(words)
    await ws.disconnect()


async def test_the_first_piece_goes_out_at_once_and_slow_pieces_one_by_one(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    # Pieces further apart than the publication interval are not held back.
    upstream.script(Reply(text="one two three four", chunk_delay=0.15))
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Go", "attachments": []})
    frames = [frame for frame in await receive_until(ws, "done") if frame["type"] == "delta"]
    assert [frame["text"] for frame in frames] == ["one", " two", " three", " four"]
    await ws.disconnect()


@pytest.mark.parametrize("busy_with", ["replies", "sends"])
async def test_with_many_replies_running_each_goes_out_in_fewer_bigger_frames(
    upstream: FakeUpstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    busy_with: str,
) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    # 40 pieces 25 ms apart: a second of streaming, like the load script's replies.
    upstream.script(Reply(text=words, chunk_delay=0.025), Reply(text=words, chunk_delay=0.025))
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)

    async def deltas() -> list[dict[str, Any]]:
        await ws.send_json_to(
            {"action": "send", "conversation": None, "text": "Go", "attachments": []}
        )
        frames = [frame for frame in await receive_until(ws, "done") if frame["type"] == "delta"]
        assert [frame["seq"] for frame in frames] == list(range(1, len(frames) + 1))
        assert "".join(frame["text"] for frame in frames) == words
        return frames

    alone = await deltas()
    if busy_with == "replies":
        # 200 other replies being written by this process (stand-ins for their tasks).
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(generation, "_tasks", {loop.create_future() for _ in range(200)})
        busy = await deltas()
    else:
        # 200 sends of other people on their way to their replies (a burst's start).
        with contextlib.ExitStack() as stack:
            for _ in range(200):
                stack.enter_context(generation.starting())
            busy = await deltas()
    assert len(alone) >= 10  # every 50 ms
    assert len(busy) <= 8  # every 0.4 s
    await ws.disconnect()


async def test_the_snapshot_grows_by_appending_and_reads_back_whole() -> None:
    await events.publish_frames(
        5,
        5,
        [
            {"type": "reasoning", "seq": 1, "text": "Hmm. "},
            {"type": "delta", "seq": 2, "text": "Hello"},
        ],
    )
    await events.publish_frames(5, 5, [{"type": "delta", "seq": 3, "text": ", world"}])
    assert await events.read_snapshot(5) == (3, "Hello, world", "Hmm. ")
    assert await hotstore.arange(events.snapshot_key(5)) == [
        (1, "reasoning", "Hmm. "),
        (2, "delta", "Hello"),
        (3, "delta", ", world"),
    ]
    await events.drop_snapshot(5)
    assert await events.read_snapshot(5) is None


def test_a_send_to_a_new_conversation_reads_nothing_back(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = make_user("alice@example.com")
    arguments: dict[str, Any] = {
        "user_id": alice.pk,
        "conversation_id": None,
        "text": "Hi",
        "attachment_ids": [],
        "model": "chat-model",
    }
    _start(actions.do_send_message, **arguments)  # the first send makes alice's web key
    asyncio.run(catalog.aget_model("chat-model"))  # the catalog's version, as a server has it
    _start(actions.do_send_message, **arguments)  # the chat models are kept for that version
    with CaptureQueriesContext(connection) as queries:
        result, messages, prepared = _start(actions.do_send_message, **arguments)
    statements = [query["sql"] for query in queries.captured_queries]
    reads = [sql for sql in statements if sql.startswith("SELECT")]
    # One read (the web key with its user); the rest writes the turn and its reply.
    assert len(reads) == 1, reads
    assert "api_key" in reads[0].lower() or "apikey" in reads[0].lower()
    assert len(statements) <= 7, statements
    assert [message.role for message in messages] == ["user", "assistant"]
    assert prepared is not None
    assert prepared.principal.user_id == alice.pk
    assert [turn.role for turn in prepared.request.messages] == ["user"]

    # With the key's principal from the hot store (a sender this worker has seen), the
    # send reads nothing at all: it only writes the turn and its reply.
    with CaptureQueriesContext(connection) as queries:
        _start(actions.do_send_message, principal=prepared.principal, **arguments)
    statements = [query["sql"] for query in queries.captured_queries]
    assert not [sql for sql in statements if sql.startswith("SELECT")], statements
    assert len(statements) <= 6, statements


def test_conversations_written_together_are_the_rows_the_orm_writes(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = make_user("alice@example.com")
    sends = [
        {"text": f"Question {index}", "system_prompt": f"Prompt {index}", "temperature": index / 10}
        for index in range(3)
    ]

    def by_the_orm(text: str, system_prompt: str, temperature: float) -> int:
        """The rows of a new conversation as Django's ``create`` and ``save`` write them."""
        conversation, _reply = make_streaming_conversation(
            alice, text, system_prompt=system_prompt, temperature=temperature
        )
        return conversation.pk

    expected = [by_the_orm(**send) for send in sends]
    before = timezone.now()
    together = actions.do_start_conversations(
        starts=[
            actions.check_new_conversation(user_id=alice.pk, model="chat-model", **send)
            for send in sends
        ]
    )
    ids = {"id", "created_at", "updated_at", "current_leaf_id", "conversation_id", "parent_id"}

    def written(conversation_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        row = Conversation.objects.filter(pk=conversation_id).values().get()
        messages = list(
            Message.objects.filter(conversation=conversation_id).order_by("pk").values()
        )
        # Its leaf is its reply, the reply's parent its turn; changed after both were made.
        (turn, reply) = messages
        assert (row["current_leaf_id"], reply["parent_id"]) == (reply["id"], turn["id"])
        assert row["updated_at"] >= reply["created_at"] >= turn["created_at"] >= row["created_at"]
        return (
            {name: value for name, value in row.items() if name not in ids},
            [{name: value for name, value in item.items() if name not in ids} for item in messages],
        )

    for send, reference, started in zip(sends, expected, together, strict=True):
        assert written(started.conversation.pk) == written(reference)
        # The objects given back are the rows written, each send's own.
        stored = Conversation.objects.get(pk=started.conversation.pk)
        assert stored.created_at >= before
        assert (stored.created_at, stored.updated_at, stored.current_leaf_id) == (
            started.conversation.created_at,
            started.conversation.updated_at,
            started.reply_id,
        )
        turn, reply = started.messages or []
        assert (turn.content, turn.pk, reply.pk) == (
            send["text"],
            Message.objects.get(conversation=stored, role="user").pk,
            stored.current_leaf_id,
        )


def test_rows_with_fields_the_lean_insert_does_not_know_are_left_to_bulk_create(
    db: None,
) -> None:
    from chatapp.models import Provider

    # A JSON field (the extra headers): written as Django writes it, ids given back.
    providers = [
        Provider(name=f"p{index}", type="openai", extra_headers={"X-Index": str(index)})
        for index in range(2)
    ]
    actions._insert_rows(Provider, providers)
    assert [
        (provider.name, provider.extra_headers)
        for provider in Provider.objects.filter(
            pk__in=[provider.pk for provider in providers]
        ).order_by("name")
    ] == [("p0", {"X-Index": "0"}), ("p1", {"X-Index": "1"})]


async def test_a_sender_disabled_after_a_first_message_is_cut_off_at_the_next(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Hi", "attachments": []})
    assert (await receive_until(ws, "done"))[-1]["status"] == "complete"
    # An admin disables her (a save, as the console does): her key's cached principal goes.
    alice.is_active = False
    await alice.asave()
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": "Again", "attachments": []}
    )
    frame = await ws.receive_json_from(timeout=5)
    while frame["type"] == "title":
        frame = await ws.receive_json_from(timeout=5)
    assert frame == {"type": "error", "error": "Your account is disabled.", "client_id": ""}
    assert (await ws.receive_output(timeout=5))["type"] == "websocket.close"
    assert await Message.objects.filter(role="user").acount() == 1


def test_a_burst_of_requests_loads_a_stale_catalog_once(
    db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = []
    real_load = catalog._load

    def counted() -> Any:
        loads.append(1)
        return real_load()

    monkeypatch.setattr(catalog, "_load", counted)

    async def burst() -> list[Any]:
        await hotstore.aset(catalog.VERSION_KEY, "a new version")
        return await asyncio.gather(*(catalog.aget_model("none") for _ in range(50)))

    assert asyncio.run(burst()) == [None] * 50
    assert len(loads) == 1


async def _chatting(
    upstream: FakeUpstream,  # noqa: F811
) -> tuple[Any, dict[str, Any], int]:
    """Alice's tab after two replies in one conversation: its socket, a send, the conversation.

    (Her first send makes her web key, which starts a new version of the shared keys.)
    """
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    send: dict[str, Any] = {"action": "send", "conversation": None, "text": "Hi", "attachments": []}
    await ws.send_json_to(send)
    events = await receive_until(ws, "done")
    assert events[-1]["status"] == "complete"
    conversation = next(event for event in events if event["type"] == "created")["conversation"]
    await ws.send_json_to({**send, "conversation": conversation})
    assert (await receive_until(ws, "done"))[-1]["status"] == "complete"
    assert len(upstream.requests) == 2
    return ws, send, conversation


async def test_a_send_reads_the_catalogs_version_at_most_twice_on_its_way_to_the_upstream(
    upstream: FakeUpstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under a burst each read is a turn of the event loop (with Redis, a round trip)
    # before the upstream is asked.  The send's check, its reply and the reply's
    # admission each read it, before.
    ws, send, _conversation = await _chatting(upstream)
    reads: list[str] = []
    real_aget = hotstore.aget

    async def counted(key: str) -> Any:
        if key == catalog.VERSION_KEY:
            reads.append(key)
        return await real_aget(key)

    monkeypatch.setattr(hotstore, "aget", counted)
    await ws.send_json_to(send)
    assert (await receive_until(ws, "done"))[-1]["status"] == "complete"
    # Once for a reply started while its send is written (SQLite: ``Early``); a reply
    # started after the write reads it anew, once for itself and its admission.
    assert len(reads) == (2 if connection.vendor == "postgresql" else 1)
    assert len(upstream.requests) == 3
    await ws.disconnect()


async def test_a_model_disabled_while_a_send_is_written_is_refused_by_its_reply(
    upstream: FakeUpstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The send to an existing conversation is checked against the catalog it read; its
    # reply starts after the write, which may have waited its turn for seconds: it
    # reads the catalog again, and an admin's change meanwhile holds for it.
    ws, send, conversation = await _chatting(upstream)
    real_send = actions.do_send_message

    def disabled_meanwhile(**arguments: Any) -> Any:
        started = real_send(**arguments)  # checked and written...
        model = CatalogModel.objects.get(name="chat-model")
        model.enabled = False
        model.save()  # ...then disabled, as the console does: the catalog's version changes
        return started

    monkeypatch.setattr(actions, "do_send_message", disabled_meanwhile)
    await ws.send_json_to({**send, "conversation": conversation, "text": "Again"})
    events = await receive_until(ws, "done")
    assert events[-1]["status"] == "failed"
    assert "chat-model" in events[-1]["html"]
    assert len(upstream.requests) == 2
    await ws.disconnect()


async def test_a_model_disabled_in_the_catalog_is_refused_on_the_next_send(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await ws.send_json_to(
        {
            "action": "send",
            "conversation": None,
            "text": "Hi",
            "attachments": [],
            "model": "text-only",
        }
    )
    assert (await receive_until(ws, "done"))[-1]["status"] == "complete"
    # An admin disables the model (a save, as the console and the admin do)...
    model = await CatalogModel.objects.aget(name="text-only")
    model.enabled = False
    await model.asave()
    # ...and the next send naming it is refused before anything is saved.
    await ws.send_json_to(
        {
            "action": "send",
            "conversation": None,
            "text": "Again",
            "attachments": [],
            "model": "text-only",
            "client_id": "c9",
        }
    )
    frame = await ws.receive_json_from(timeout=5)
    while frame["type"] == "title":
        frame = await ws.receive_json_from(timeout=5)
    assert frame["type"] == "error"
    assert "Text Only" in frame["error"] or "text-only" in frame["error"]
    assert await Route.objects.filter(model__name="text-only").aexists()
    await ws.disconnect()


async def test_a_snapshot_left_by_an_earlier_version_still_reads_back() -> None:
    # Written by a process of the version before the appended snapshots (a rolling upgrade).
    await hotstore.aset("stream:6", (4, "Half a", "Thinking"), 60)
    assert await events.read_snapshot(6) == (4, "Half a", "Thinking")
    await hotstore.aset("stream:8", (2, "Two pieces"), 60)
    assert await events.read_snapshot(8) == (2, "Two pieces", "")


async def test_opening_the_chat_learns_the_users_web_key_for_the_first_message(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    from keys.actions import do_get_web_key
    from keys.auth import aweb_principal

    alice = await database_sync_to_async(make_user)("alice@example.com")
    key = await database_sync_to_async(do_get_web_key)(user=alice)  # the chat page made it
    ws = await connect(alice)
    for _ in range(50):
        principal = await aweb_principal(alice.pk)
        if principal is not None and principal.key_id == key.pk:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the socket's opening did not learn alice's web key")
    await ws.disconnect()


async def test_a_stop_is_seen_by_the_next_publication_of_the_reply(
    upstream: FakeUpstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reply's own timed look at the stop flag is out of the picture: the
    # publications, which read the flag with each append to the snapshot, see it.
    monkeypatch.setattr(generation, "STOP_CHECK_EVERY", 3600.0)
    upstream.script(Reply(text=" ".join(["word"] * 300), chunk_delay=0.01))
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice)
    await ws.send_json_to({"action": "send", "conversation": None, "text": "Go", "attachments": []})
    reply_id = (await receive_until(ws, "delta"))[-1]["message"]
    await ws.send_json_to({"action": "stop", "message": reply_id})
    after = await receive_until(ws, "done")
    assert after[-1]["status"] == "stopped"
    # Within a few frames of the stop (the stop's own trip to the database comes
    # first; frames go out meanwhile), not the three seconds of the whole reply.
    assert len([frame for frame in after if frame["type"] == "delta"]) <= 10
    reply = await Message.objects.aget(pk=reply_id)
    assert reply.status == "stopped"
    assert 0 < len(reply.content.split()) < 100
    await ws.disconnect()


async def test_sends_that_start_conversations_together_are_written_together(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    from chatapp.chat import consumers

    alice = await database_sync_to_async(make_user)("alice@example.com")
    # Ten tabs (people, in the load script) send at once: eight good messages, one for
    # a model she may not use and one with no words.
    tabs = [await connect(alice) for _ in range(10)]
    texts = [f"Question number {index}" for index in range(8)]
    # Given the database thread busy when they arrive (a burst's first send)...
    busy = asyncio.ensure_future(database_sync_to_async(time.sleep)(0.5))
    await asyncio.sleep(0.1)
    trips = consumers._start_conversation.trips
    for tab, text in zip(tabs, texts, strict=False):
        await tab.send_json_to(
            {
                "action": "send",
                "conversation": None,
                "text": text,
                "attachments": [],
                "client_id": text,
            }
        )
    await tabs[8].send_json_to(
        {"action": "send", "conversation": None, "text": "Hi", "attachments": [], "model": "nope"}
    )
    await tabs[9].send_json_to(
        {"action": "send", "conversation": None, "text": " ", "attachments": []}
    )
    await busy
    # ...they were written together, in one trip (or two, had one begun meanwhile).
    for tab, text in zip(tabs, texts, strict=False):
        events = await receive_until(tab, "done")
        messages = next(event for event in events if event["type"] == "messages")
        assert messages["client_id"] == text
        assert text in messages["html"]
        assert events[-1]["status"] == "complete"
    assert consumers._start_conversation.trips - trips <= 2
    # The refused ones each got their own error; nothing of theirs was saved.
    refused = [await tabs[index].receive_json_from(timeout=5) for index in (8, 9)]
    assert [frame["type"] for frame in refused] == ["error", "error"]
    assert "nope" in refused[0]["error"]
    assert refused[1]["error"] == "Type a message first."
    # Every conversation has its own turn, its reply after it, and the reply as its leaf.
    conversations = [
        conversation
        async for conversation in Conversation.objects.filter(owner=alice).select_related(
            "current_leaf__parent"
        )
    ]
    assert sorted(conversation.current_leaf.parent.content for conversation in conversations) == (
        sorted(texts)
    )
    for conversation in conversations:
        reply = conversation.current_leaf
        assert (reply.role, reply.status, reply.conversation_id) == (
            "assistant",
            "complete",
            conversation.pk,
        )
        assert reply.parent.conversation_id == conversation.pk
    for tab in tabs:
        await tab.disconnect()


def test_when_writing_sends_together_fails_each_is_written_on_its_own(
    upstream: FakeUpstream,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    from chatapp.chat.consumers import _start_conversations
    from keys.actions import do_get_web_key
    from keys.auth import principal_of

    alice = make_user("alice@example.com")
    bob = make_user("bob@example.com")
    principals = {user.pk: principal_of(do_get_web_key(user=user)) for user in (alice, bob)}
    sends = [
        {"user_id": user.pk, "text": f"From {user.email}", "model": "chat-model",
         "principal": principals[user.pk]}
        for user in (alice, bob, alice)
    ]  # fmt: skip
    # Bob is deleted after his send was checked (his key's principal still cached):
    # his conversation cannot be written, and with it fails the transaction of all three.
    bob.delete()
    outcomes = _start_conversations(sends)
    assert isinstance(outcomes[1], Exception)
    for outcome in (outcomes[0], outcomes[2]):
        assert not isinstance(outcome, Exception)
        result, messages, prepared = outcome
        assert [message.content for message in messages] == ["From alice@example.com", ""]
        assert prepared is not None
    assert Conversation.objects.filter(owner=alice).count() == 2
    assert Message.objects.count() == 4
    assert "writing 3 new conversations together failed" in caplog.text
    # Alone, his send fails once: it is not written again.
    caplog.clear()
    (outcome,) = _start_conversations([sends[1]])
    assert isinstance(outcome, Exception)
    assert "together failed" not in caplog.text


async def test_a_send_right_after_the_last_trip_ended_gets_a_trip_of_its_own() -> None:
    gathering = generation.Gathering(lambda arguments: [argument * 2 for argument in arguments])
    assert await gathering(1) == 2
    # This caller resumes before the finished trip's task is done with, and asks again
    # at once: it must not wait for a trip that nobody will make.
    async with asyncio.timeout(5):
        assert await gathering(2) == 4
    # A call that raises fails alone; the others of its trip are answered.
    failing = generation.Gathering(
        lambda arguments: [ValueError(a) if a < 0 else a for a in arguments]
    )
    results = await asyncio.gather(failing(1), failing(-1), failing(3), return_exceptions=True)
    assert results[0] == 1
    assert isinstance(results[1], ValueError)
    assert results[2] == 3


async def calls_during_a_trip(
    write: Callable[[list[int]], list[int]], *, rounds: int | None
) -> tuple[generation.Gathering, list[Any]]:
    """Calls 0 to 6 of ``write`` gathered two at a time, one trip at a time: 1 to 6 are
    made while call 0's trip writes.  The gathering, and each call's result or exception."""
    writing, written = threading.Event(), threading.Event()

    def held(arguments: list[int]) -> list[int]:
        if arguments == [0]:
            writing.set()
            written.wait(5)
        return write(arguments)

    gathering = generation.Gathering(held, most=2, parallel=1, rounds=rounds)
    calls = [asyncio.ensure_future(gathering(0))]
    assert await asyncio.to_thread(writing.wait, 5)  # its trip is writing
    calls += [asyncio.ensure_future(gathering(number)) for number in range(1, 7)]
    await asyncio.sleep(0.1)
    written.set()
    async with asyncio.timeout(5):
        return gathering, await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.parametrize("rounds", [1, 8, None])
async def test_calls_that_come_during_a_trip_go_on_it_where_trips_run_side_by_side(
    rounds: int | None,
) -> None:
    # A trip that may go on (by default: on PostgreSQL, where a reply starts once its
    # send is written) carries the calls that came while it wrote, batch after batch;
    # otherwise each batch waits for a trip of its own, begun turns of the loop later.
    gathering, outcomes = await calls_during_a_trip(
        lambda arguments: [argument * 2 for argument in arguments], rounds=rounds
    )
    assert outcomes == [0, 2, 4, 6, 8, 10, 12]
    assert gathering.trips == 4  # [0], then [1, 2], [3, 4] and [5, 6]
    goes_on = rounds == 8 or (rounds is None and connection.vendor == "postgresql")
    assert gathering.hops == (1 if goes_on else 4)


async def test_a_batch_that_fails_in_a_middle_round_fails_alone_and_the_trip_goes_on() -> None:
    # A trip that goes on batch after batch (PostgreSQL's): the batch whose write
    # raises fails its own calls only; those before it keep their answers, and those
    # after it are still written by the same trip.
    def doubled(arguments: list[int]) -> list[int]:
        if 3 in arguments:
            raise ValueError("the database refused this batch")
        return [argument * 2 for argument in arguments]

    gathering, outcomes = await calls_during_a_trip(doubled, rounds=8)
    assert outcomes[:3] == [0, 2, 4]  # [0], then [1, 2]
    assert [str(outcome) for outcome in outcomes[3:5]] == ["the database refused this batch"] * 2
    assert all(isinstance(outcome, ValueError) for outcome in outcomes[3:5])  # [3, 4]
    assert outcomes[5:] == [10, 12]  # [5, 6]: the same trip went on
    assert (gathering.trips, gathering.hops) == (4, 1)
    # Nothing is left counted as under way: the next call gets its trip.
    async with asyncio.timeout(5):
        assert await gathering(7) == 14


async def test_a_trips_calls_are_answered_from_its_thread_in_one_turn_of_the_loop() -> None:
    # Under a burst every turn of the event loop is long: the callers resume one turn
    # after their trip is written, not after the trip's own task has come round too.
    turns = 0
    seen_in_trip: list[int] = []

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    def write(arguments: list[int]) -> list[int]:
        time.sleep(0.05)  # the ticker turns meanwhile
        seen_in_trip.append(turns)
        return arguments

    gathering = generation.Gathering(write)
    ticking = asyncio.ensure_future(ticker())
    try:
        await asyncio.sleep(0)
        assert await gathering(1) == 1
        resumed = turns
    finally:
        ticking.cancel()
    assert resumed - seen_in_trip[0] <= 2, (resumed, seen_in_trip)


async def test_a_trip_that_cannot_begin_fails_its_calls_and_the_next_one_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gathering = generation.Gathering(lambda arguments: [argument * 2 for argument in arguments])

    def no_thread(function: Any) -> Any:
        async def refuse(*args: Any) -> None:
            raise RuntimeError("no database thread")

        return refuse

    monkeypatch.setattr(generation, "trip", no_thread)
    with pytest.raises(RuntimeError, match="no database thread"):
        await gathering(1)
    monkeypatch.undo()
    # Nothing is left counted as under way: the next call gets its trip.
    async with asyncio.timeout(5):
        assert await gathering(2) == 4


@contextlib.asynccontextmanager
async def writes_held(seconds: float) -> AsyncIterator[asyncio.Future[None]]:
    """The chat's writes held off for ``seconds``, as a burst's queue holds them (SQLite:
    every trip waits for the process's one database thread, which a long trip holds)."""
    held = asyncio.ensure_future(database_sync_to_async(time.sleep)(seconds))
    await asyncio.sleep(0.05)
    yield held
    await held


def refuse_conversations(refused: bool = True) -> None:
    """SQLite refuses every new conversation (a failure after the send's checks)."""
    with connection.cursor() as cursor:
        if refused:
            cursor.execute(
                f"CREATE TRIGGER refuse_for_test BEFORE INSERT ON {Conversation._meta.db_table} "
                "BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
            )
        else:
            cursor.execute("DROP TRIGGER refuse_for_test")


def skip_on_postgresql() -> None:
    if connection.vendor == "postgresql":
        pytest.skip("on PostgreSQL the writes run side by side: a reply starts once written")


async def connected_and_known(user: Any) -> Any:
    """A tab of ``user`` once the worker knows her web key and the chat's models.

    (The chat page's first load makes her key; a socket opening loads both.)
    """
    from keys.actions import do_get_web_key
    from keys.auth import aweb_principal

    await database_sync_to_async(do_get_web_key)(user=user)
    ws = await connect(user)

    async def known() -> bool:
        in_memory = actions.catalog_in_memory(await catalog.aversion())
        return in_memory is not None and await aweb_principal(user.pk) is not None

    async with asyncio.timeout(5):
        while not await known():  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.01)
    return ws


async def test_a_new_conversations_upstream_is_asked_while_its_send_waits_to_be_written(
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    skip_on_postgresql()
    upstream.script(Reply(text="The first words arrive at once"))
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connected_and_known(alice)
    async with writes_held(1.5) as held:
        await ws.send_json_to(
            {
                "action": "send",
                "conversation": None,
                "text": "Go",
                "attachments": [],
                "system_prompt": "Be brief.",
                "temperature": 0.5,
            }
        )
        # The upstream is asked while the send waits for its write...
        async with asyncio.timeout(1):
            while not upstream.requests:  # noqa: ASYNC110 - another thread's list
                await asyncio.sleep(0.01)
        assert not held.done()
        # ...and the tab hears nothing of the reply before its send is written.
        assert await ws.receive_nothing(timeout=0.2)
    events = await receive_until(ws, "done")
    assert [event["type"] for event in events[:2]] == ["created", "messages"]
    deltas = [event for event in events if event["type"] == "delta"]
    assert [event["seq"] for event in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(event["text"] for event in deltas) == "The first words arrive at once"
    assert events[-1]["status"] == "complete"
    reply = await Message.objects.select_related("conversation").aget(pk=events[-1]["message"])
    assert reply.content == "The first words arrive at once"
    assert reply.conversation_id == events[0]["conversation"]
    assert reply.request_id
    # The request is the one the written conversation makes: its settings and its turn.
    (early,) = (request.json for request in upstream.requests)
    assert early["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Go"},
    ]
    assert early["temperature"] == 0.5
    await ws.disconnect()


async def test_what_the_upstream_sends_while_the_send_is_written_is_read_in_one_go(
    upstream: FakeUpstream,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under a burst every early reply's upstream goes on streaming while its send
    # waits its turn to be written; reading each piece as it came took the event
    # loop from the writes and from the other replies' first words.
    skip_on_postgresql()
    words = [f"w{i}" for i in range(24)]
    upstream.script(Reply(text=" ".join(words), chunk_delay=0.02))  # all within the hold
    reads = 0
    received = ResponseHandler.data_received

    def counted(self: ResponseHandler, data: bytes) -> None:
        nonlocal reads
        reads += bool(data)  # (aiohttp calls it with b"" to resume its parser)
        received(self, data)

    monkeypatch.setattr(ResponseHandler, "data_received", counted)
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connected_and_known(alice)
    async with writes_held(1.0):
        await ws.send_json_to(
            {"action": "send", "conversation": None, "text": "Go", "attachments": []}
        )
    events = await receive_until(ws, "done")
    # The opening reads until the first words; the rest, sent meanwhile, comes in a
    # read or two once the send is written (read as it came: one per piece).
    assert reads <= 6
    deltas = [event for event in events if event["type"] == "delta"]
    assert [event["seq"] for event in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(event["text"] for event in deltas) == " ".join(words)
    assert events[-1]["status"] == "complete"
    reply = await Message.objects.aget(pk=events[-1]["message"])
    assert reply.content == " ".join(words)
    await ws.disconnect()


async def test_a_send_the_database_refuses_gets_no_reply_and_its_upstream_call_is_recorded(
    upstream: FakeUpstream,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    skip_on_postgresql()
    upstream.script(Reply(text="Nobody reads this", chunk_delay=0.05))
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connected_and_known(alice)
    await database_sync_to_async(refuse_conversations)()
    try:
        # Held first: its upstream is asked before the database says no.
        async with writes_held(0.5):
            await ws.send_json_to(
                {
                    "action": "send",
                    "conversation": None,
                    "text": "Go",
                    "attachments": [],
                    "client_id": "tab-1",
                }
            )
            async with asyncio.timeout(1):
                while not upstream.requests:  # noqa: ASYNC110 - another thread's list
                    await asyncio.sleep(0.01)
        error = await ws.receive_json_from(timeout=5)
    finally:
        await database_sync_to_async(refuse_conversations)(refused=False)
    assert error == {
        "type": "error",
        "error": "The server could not carry out this action; nothing was saved.",
        "client_id": "tab-1",
    }
    assert await ws.receive_nothing(timeout=0.3)  # no reply frames: there is no reply
    assert await Conversation.objects.acount() == 0
    async with asyncio.timeout(5):  # its reply's task is gone, not waiting for ever
        while generation._tasks:  # noqa: ASYNC110 - a set of tasks, not an event
            await asyncio.sleep(0.01)
    # The upstream's work is in the ledger, as cut by the gateway.
    await asyncio.to_thread(ledger.flush)
    records = [record async for record in UsageRecord.objects.order_by("created_at")]
    assert [(record.status, record.model, record.user_id) for record in records] == [
        ("interrupted", "chat-model", alice.pk)
    ]
    await ws.disconnect()
