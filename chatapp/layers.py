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
publishes meanwhile goes out together.  Receiving, groups and channels are Channels'.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
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

    def publication(self, group: str, message: dict[str, Any]) -> tuple[str, bytes]:
        """``group_send``'s ``PUBLISH``, as ``(channel, message)``, for a caller's pipeline."""
        return self.group_channel(group), self.serialize(message)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        await hotstore.apublish(*self.publication(group, message))
