"""The embedded mode's channel layer: what a publication to a conversation's group does."""

from __future__ import annotations

from chatapp.layers import InMemoryChannelLayer


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
