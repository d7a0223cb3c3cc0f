"""The channel layers: what a publication to a conversation's group does.

The embedded mode's in-memory layer, and with Redis the hot store's shared pipeline
the chat's publications go through (``chatapp.hotstore._Pipeline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from channels.layers import get_channel_layer

from chatapp import hotstore
from chatapp.chat import events
from chatapp.layers import InMemoryChannelLayer
from tests.services import USING_REDIS

redis_only = pytest.mark.skipif(not USING_REDIS, reason="TEST_REDIS_URL not set: embedded run")


async def test_a_group_message_reaches_every_member_in_order_at_once() -> None:
    layer = InMemoryChannelLayer()
    first, second, outsider = [await layer.new_channel() for _ in range(3)]
    for channel in (first, second):
        await layer.group_add("conversation.7", channel)
    for seq in (1, 2, 3):
        await layer.group_send("conversation.7", {"type": "chat.event", "seq": seq})
    # Queued when group_send returns: no task left to run first.
    assert all(layer.channels[channel].qsize() == 3 for channel in (first, second))
    for channel in (first, second):
        assert [(await layer.receive(channel))["seq"] for _ in range(3)] == [1, 2, 3]
    assert outsider not in layer.channels


async def test_a_member_whose_queue_is_full_misses_the_message_the_others_get_it() -> None:
    layer = InMemoryChannelLayer(capacity=1)
    slow, quick = await layer.new_channel(), await layer.new_channel()
    for channel in (slow, quick):
        await layer.group_add("conversation.7", channel)
    await layer.group_send("conversation.7", {"type": "chat.event", "seq": 1})
    await layer.receive(quick)
    await layer.group_send("conversation.7", {"type": "chat.event", "seq": 2})
    assert (await layer.receive(slow))["seq"] == 1
    assert (await layer.receive(quick))["seq"] == 2
    assert slow not in layer.channels  # nothing more for it: seq 2 was missed


async def test_a_publication_starts_no_task_and_copies_nothing() -> None:
    """What keeps a reply's frame cheap: Channels' own layer starts a task per member
    and deep-copies the message for each."""
    import asyncio

    layer = InMemoryChannelLayer()
    first, second = await layer.new_channel(), await layer.new_channel()
    for channel in (first, second):
        await layer.group_add("conversation.7", channel)
    loop = asyncio.get_running_loop()
    started = []
    default = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro, **kwargs):  # type: ignore[no-untyped-def]
        started.append(coro)
        if default is not None:
            return default(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        frame = {"type": "chat.event", "payload": {"type": "delta", "text": "Hi"}}
        await layer.group_send("conversation.7", frame)
    finally:
        loop.set_task_factory(default)
    assert started == []
    assert await layer.receive(first) is frame
    assert await layer.receive(second) is frame


@redis_only
async def test_with_redis_many_replies_publish_together_in_order_and_whole() -> None:
    layer = get_channel_layer()
    tabs = [await layer.new_channel() for _ in range(2)]
    for tab in tabs:
        await layer.group_add(events.group_name(9), tab)
    shared = hotstore.pipeline()
    before = shared.round_trips

    async def reply(message_id: int) -> None:
        for seq in range(1, 6):
            frame = {"type": "delta", "message": message_id, "seq": seq, "text": f"{seq} "}
            assert await events.publish_frames(9, message_id, [frame]) is False

    # 40 replies of one conversation, five publications each, all at once.
    await asyncio.gather(*(reply(message_id) for message_id in range(100, 140)))
    # One round trip per publication would be 200; all the replies share each one.
    assert shared.round_trips - before <= 20
    for tab in tabs:
        received: dict[int, list[int]] = {}
        for _ in range(200):
            frame = (await asyncio.wait_for(layer.receive(tab), 5))["payload"]
            received.setdefault(frame["message"], []).append(frame["seq"])
        assert received == {message_id: [1, 2, 3, 4, 5] for message_id in range(100, 140)}
    # Each reply's snapshot holds what it published, appended before it went out.
    assert await events.read_snapshot(123) == (5, "1 2 3 4 5 ", "")


@redis_only
async def test_with_redis_a_stop_asked_is_read_by_the_next_publication() -> None:
    await hotstore.aset(events.stop_key(77), True, 60)
    frame = {"type": "delta", "message": 77, "seq": 1, "text": "Hi"}
    assert await events.publish_frames(9, 77, [frame]) is True
    assert await events.publish_frames(9, 78, [frame | {"message": 78}]) is False


@redis_only
async def test_with_redis_a_command_that_fails_fails_its_caller_alone() -> None:
    # A string where the snapshot's list should be: Redis refuses the append
    # (WRONGTYPE).  Sent in the same round trip, the other reply's append goes through.
    await hotstore.aset(events.snapshot_key(50), "not a list", 60)
    frame = {"type": "delta", "message": 50, "seq": 1, "text": "Hi"}
    failed, done = await asyncio.gather(
        events.publish_frames(9, 50, [frame]),
        events.publish_frames(9, 51, [frame | {"message": 51}]),
        return_exceptions=True,
    )
    assert "WRONGTYPE" in str(failed)
    assert done is False
    assert await events.read_snapshot(51) == (1, "Hi", "")


@redis_only
async def test_with_redis_groups_joined_at_once_are_subscribed_together() -> None:
    from chatapp.layers import _subscribers

    def commands() -> int:  # (of every layer of this process: earlier tests' too)
        return sum(subscriber.commands for subscriber in _subscribers.values())

    layer = get_channel_layer()
    tabs = [await layer.new_channel() for _ in range(100)]
    before = commands()
    # A burst of new conversations: every tab joins its own group at the same time.
    await asyncio.gather(
        *(layer.group_add(events.group_name(1000 + n), tab) for n, tab in enumerate(tabs))
    )
    # Not one SUBSCRIBE per group, each waiting for the one before.
    assert 1 <= commands() - before <= 5
    for n in range(len(tabs)):
        await events.publish(1000 + n, {"type": "delta", "message": n, "seq": 1, "text": "x"})
    for n, tab in enumerate(tabs):
        assert (await asyncio.wait_for(layer.receive(tab), 5))["payload"]["message"] == n


@redis_only
async def test_with_redis_reads_and_writes_of_many_tasks_share_round_trips() -> None:
    shared = hotstore.pipeline()
    await asyncio.gather(*(hotstore.aset(f"probe:{n}", n, 60) for n in range(200)))
    before = shared.round_trips
    values = await asyncio.gather(*(hotstore.aget(f"probe:{n}") for n in range(200)))
    assert values == list(range(200))
    assert 1 <= shared.round_trips - before <= 3  # (one each: 200)
    await hotstore.adelete(*(f"probe:{n}" for n in range(200)))
    assert await hotstore.aget("probe:7") is None


@redis_only
async def test_with_redis_a_tab_of_the_publishing_loop_gets_each_frame_at_once_and_once() -> None:
    layer = get_channel_layer()
    tab = await layer.new_channel()
    await layer.group_add(events.group_name(31), tab)
    queue = layer._get_layer().channels[tab]
    frames = [{"type": "delta", "message": 310, "seq": seq, "text": f"{seq} "} for seq in (1, 2)]
    publishing = asyncio.ensure_future(events.publish_frames(31, 310, frames))
    await asyncio.sleep(0)  # the publication starts, and waits for its round trip to Redis
    # Handed over already, before that round trip has ended.
    assert not publishing.done()
    assert queue.qsize() == 2
    assert await publishing is False
    await events.publish(31, {"type": "title", "conversation": 31, "title": "Hi"})
    # Redis sends the loop its copies back: they are dropped, not delivered twice.
    await asyncio.sleep(0.3)
    received = [(await layer.receive(tab))["payload"] for _ in range(queue.qsize())]
    assert [frame.get("seq", frame["type"]) for frame in received] == [1, 2, "title"]
    assert not layer._get_layer().echoes  # every copy came back and was dropped
    # The snapshot still holds what was published, for a tab that opens later.
    assert await events.read_snapshot(310) == (2, "1 2 ", "")


@redis_only
async def test_with_redis_a_tab_on_another_event_loop_gets_each_frame_once() -> None:
    layer = get_channel_layer()
    other_loop_joined = asyncio.Event()
    main_loop = asyncio.get_running_loop()
    published = threading.Event()

    def other_tab() -> list[dict[str, object]]:
        # Another event loop (another process's, as far as Redis is concerned): its own
        # layer, subscribed through Redis.
        async def run() -> list[dict[str, object]]:
            tab = await layer.new_channel()
            await layer.group_add(events.group_name(32), tab)
            main_loop.call_soon_threadsafe(other_loop_joined.set)
            await asyncio.to_thread(published.wait, 10)
            received = [(await asyncio.wait_for(layer.receive(tab), 5))["payload"]]
            with contextlib.suppress(TimeoutError):
                received.append((await asyncio.wait_for(layer.receive(tab), 0.5))["payload"])
            await layer.group_discard(events.group_name(32), tab)
            return received

        return asyncio.run(run())

    receiving = asyncio.ensure_future(asyncio.to_thread(other_tab))
    await asyncio.wait_for(other_loop_joined.wait(), 10)
    local = await layer.new_channel()
    await layer.group_add(events.group_name(32), local)
    frame = {"type": "delta", "message": 320, "seq": 1, "text": "Hi"}
    assert await events.publish_frames(32, 320, [frame]) is False
    published.set()
    assert await receiving == [frame]  # once, whole
    assert (await layer.receive(local))["payload"] == frame
