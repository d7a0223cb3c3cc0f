"""The channel layers: the embedded mode's, and Redis's with publications pipelined.

The embedded mode's (``InMemoryChannelLayer``):

Channels' ``InMemoryChannelLayer`` walks every channel's queue and every group's
members on each ``send``, ``receive`` and ``group_send`` to drop expired entries.
With a few hundred chat sockets open and a reply's frames published many times a
second, that walk was the worker's single largest cost (``.ci/chat_load.py
--profile``).  Here it runs at most once a second: a message expires at most a
second after its ``expiry`` (60 s by default), a group membership a second after
``group_expiry`` (a day).

``group_send`` puts the message on each member's queue at once, and neither it nor
``receive`` makes a queue they then throw away (Channels' ``setdefault``).  Channels' own
starts a task per member and waits for them all, and deep-copies the message for
each: per frame of a reply, two turns of the event loop and a copy, under a burst
of replies a twentieth of the worker's time.  The message itself is queued, not a
copy: what is published (the chat's frames) is never changed after.

With Redis (``RedisPubSubChannelLayer``): Channels' pub/sub layer sends each
``group_send`` as its own ``PUBLISH`` under a lock of the process, one round trip at
a time.  Ours sends it through the hot store's shared pipeline
(``chatapp.hotstore._Pipeline``) on the same Redis: what every task of the process
publishes meanwhile goes out together.  Its ``group_add`` takes that lock too, once
per group: under a burst of new conversations the subscriptions went one per turn of
the event loop, and each sender's first frame waited for its own.  Ours subscribes
to every group asked for meanwhile in one ``SUBSCRIBE`` (``_Subscriber``).  A
publication is also handed at once to the group's members on the publishing event loop
(a reply's frames to the tab that sent the message, normally): they do not wait for
Redis's round trip, a turn of the event loop or more under a burst, and the copy Redis
sends back to that loop is dropped (``_receive``).  What is published stays as
Channels' layer writes it: a process of the previous version reads it during a rolling
upgrade.  Receiving and the rest are Channels'.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
import weakref
from typing import Any

from channels.layers import InMemoryChannelLayer as BaseInMemoryChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer as BaseRedisPubSubChannelLayer

from chatapp import hotstore

CLEAN_EVERY = 1.0  # seconds between walks over every channel and group


class InMemoryChannelLayer(BaseInMemoryChannelLayer):
    _cleaned_at = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._cleaned_at < CLEAN_EVERY:
            return
        self._cleaned_at = now
        super()._clean_expired()

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "Message is not a dict"
        self.require_valid_group_name(group)
        self._clean_expired()
        expires = time.time() + self.expiry
        for channel in list(self.groups.get(group, ())):
            queue = self._queue(channel)
            # As Channels does: a member whose queue is full misses the message.
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait((expires, message))

    async def receive(self, channel: str) -> dict[str, Any]:
        """Channels' own, without a new queue made (and dropped) on every call."""
        self.require_valid_channel_name(channel)
        self._clean_expired()
        queue = self._queue(channel)
        try:
            _, message = await queue.get()
        finally:
            if queue.empty():
                self.channels.pop(channel, None)
        return message

    def _queue(self, channel: str) -> asyncio.Queue[Any]:
        """The channel's queue, made when it has none (``setdefault`` would make one each time)."""
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        return queue


class RedisPubSubChannelLayer(BaseRedisPubSubChannelLayer):
    """Channels' Redis pub/sub layer, its publications sent through the shared pipeline.

    It must use the Redis of ``REDIS_URL`` (the hot store's), as the settings do.
    """

    def group_channel(self, group: str) -> str:
        """The Redis channel the group's members are subscribed to (Channels' naming)."""
        return self._get_layer()._get_group_channel_name(group)

    def _get_layer(self) -> Any:
        """Channels' layer of this event loop, its subscriptions' copies of its own dropped."""
        layer = super()._get_layer()
        if getattr(layer, "echoes", None) is None:
            layer.echoes = collections.Counter()
            for shard in layer._shards:
                shard._receive_message = functools.partial(_receive, shard, layer.echoes)
        return layer

    def publication(self, group: str, message: dict[str, Any]) -> tuple[str, bytes]:
        """``group_send``'s ``PUBLISH``, as ``(channel, message)``, for a caller's pipeline.

        The group's members on this event loop get the message now: the ``PUBLISH``
        is for the others (other processes, other loops), and this loop drops its copy.
        """
        layer = self._get_layer()
        channel = layer._get_group_channel_name(group)
        data = self.serialize(message)
        if layer.groups.get(channel):
            # Handed over by Channels' own receiving, as the copy from Redis would be.
            shard = layer._get_shard(channel)
            type(shard)._receive_message(shard, {"channel": channel, "data": data})
            # Its copy from Redis is dropped (the very same bytes; an equal message from
            # elsewhere, were one published meanwhile, would be a duplicate anyway).
            echoes = layer.echoes
            echoes[channel, data] += 1
            if len(echoes) > ECHOES_KEPT:  # copies that never came (not yet subscribed)
                del echoes[next(iter(echoes))]
        return channel, data

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await hotstore.apublish(*self.publication(group, message))

    async def group_add(self, group: str, channel: str) -> None:
        """Channels' own, with the subscription sent together with the others meanwhile."""
        layer = self._get_layer()
        if channel not in layer.channels:
            raise RuntimeError("You can only call group_add() on channels that exist in-process.")
        group_channel = layer._get_group_channel_name(group)
        layer.groups.setdefault(group_channel, set()).add(channel)
        shard = layer._get_shard(group_channel)
        if group_channel not in shard._subscribed_to:
            subscriber = _subscribers.get(shard)
            if subscriber is None:
                subscriber = _subscribers[shard] = _Subscriber(shard)
            await subscriber.subscribe(group_channel)


# Publications per event loop whose copy from Redis is awaited at most: one made before
# the loop's subscription to its group reached Redis gets none.
ECHOES_KEPT = 4096


def _receive(shard: Any, echoes: collections.Counter[Any], message: dict[str, Any] | None) -> None:
    """Channels' ``_receive_message``, without the loop's own publications (its members have them)."""
    if message is not None and echoes:
        name = message.get("channel")
        key = (name.decode() if isinstance(name, bytes) else name, message.get("data"))
        count = echoes.get(key)
        if count:
            if count == 1:
                del echoes[key]
            else:
                echoes[key] = count - 1
            return
    type(shard)._receive_message(shard, message)


class _Subscriber:
    """The subscriptions asked of one Redis connection meanwhile, sent as one command.

    The shard's own lock (channels_redis's) still orders them with its subscribes and
    unsubscribes.  Like Channels', a subscription is made when its command is sent:
    a ``PUBLISH`` Redis receives after it reaches this process.
    """

    def __init__(self, shard: Any) -> None:
        self.shard = shard
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.sending = False
        self.task: asyncio.Task[None] | None = None  # (held: the loop keeps only a weak one)
        self.commands = 0

    async def subscribe(self, name: str) -> None:
        future = self.waiting.get(name)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self.waiting[name] = loop.create_future()
            # Read here if no waiter is left to (a cancelled one).
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
            if not self.sending:
                self.sending = True
                self.task = loop.create_task(self._send())
        await asyncio.shield(future)

    async def _send(self) -> None:
        shard = self.shard
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, {}
                try:
                    async with shard._lock:
                        shard._ensure_redis()
                        shard._ensure_receiver()
                        names = [name for name in batch if name not in shard._subscribed_to]
                        if names:
                            self.commands += 1
                            await shard._pubsub.subscribe(*names)
                            shard._subscribed_to.update(names)
                except Exception as exc:
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for future in batch.values():
                        if not future.done():
                            future.set_result(None)
        finally:
            self.sending = False


_subscribers: weakref.WeakKeyDictionary[Any, _Subscriber] = weakref.WeakKeyDictionary()
