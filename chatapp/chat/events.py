"""What the chat publishes and keeps in the hot store while a reply is written.

- the conversation's channel-layer group: every open tab of it, on any Daphne
  process with the Redis layer, hears the reply's frames;
- ``reply:<message id>``: the frames published so far, as a list of
  ``(seq, type, text)`` pieces appended as they go out, so a tab that
  (re)connects catches up before the live tail;
- ``stop:<message id>``: a stop asked for from any process;
- ``alive:<message id>``: the heartbeat of the process writing the reply.  A reply
  marked streaming, older than a heartbeat's lifetime and with no heartbeat, has no
  live writer (its process died) and is saved as interrupted the next time anyone
  opens, sends to or stops that conversation (``chatapp.chat.generation.recover``).
"""

from __future__ import annotations

from typing import Any

from channels.layers import get_channel_layer

from chatapp import hotstore
from chatapp.layers import RedisPubSubChannelLayer

SNAPSHOT_TTL = 3600
HEARTBEAT_EVERY = 2.0  # seconds between heartbeats of a reply being written
HEARTBEAT_TTL = 10  # seconds a heartbeat lasts: five missed beats mean the writer is gone


def group_name(conversation_id: int) -> str:
    return f"conversation.{conversation_id}"


def snapshot_key(message_id: int) -> str:
    # "reply:", not the "stream:" of the text-so-far strings of earlier versions: a
    # list and a string cannot share a Redis key while both versions run.
    return f"reply:{message_id}"


async def publish_frames(
    conversation_id: int, message_id: int, frames: list[dict[str, Any]]
) -> bool:
    """Add a reply's frames to its snapshot, then publish them to its conversation.

    In that order: a tab that subscribes, then reads the snapshot, misses none (it
    drops the frames its snapshot already covers).  Returns whether a stop was asked
    for the reply: read in passing, so every publication also looks at the stop flag.
    With Redis all of it is one round trip, shared with the process's other replies
    (``hotstore._Pipeline``).
    """
    pieces = [(frame["seq"], frame["type"], frame["text"]) for frame in frames]
    layer = get_channel_layer()
    if not isinstance(layer, RedisPubSubChannelLayer):
        stop = await hotstore.aappend(
            snapshot_key(message_id), pieces, SNAPSHOT_TTL, read=stop_key(message_id)
        )
        for frame in frames:
            await publish(conversation_id, frame)
        return bool(stop)
    group = group_name(conversation_id)
    return bool(
        await hotstore.aappend(
            snapshot_key(message_id),
            pieces,
            SNAPSHOT_TTL,
            read=stop_key(message_id),
            publish=[layer.publication(group, _event(frame)) for frame in frames],
        )
    )


async def read_snapshot(message_id: int) -> tuple[int, str, str] | None:
    """The reply so far as (last seq, text, reasoning), or None when nothing was kept."""
    pieces = await hotstore.arange(snapshot_key(message_id))
    if not pieces:
        # A reply written by a process of an earlier version (a rolling upgrade, or
        # one that died during it) kept its text so far as one value under "stream:".
        legacy = await hotstore.aget(f"stream:{message_id}")
        if legacy:
            seq, so_far, thought = (*legacy, "")[:3]
            return int(seq), str(so_far), str(thought)
        return None
    text: list[str] = []
    reasoning: list[str] = []
    for _seq, kind, piece in pieces:
        (reasoning if kind == "reasoning" else text).append(piece)
    return pieces[-1][0], "".join(text), "".join(reasoning)


async def drop_snapshot(message_id: int) -> None:
    await hotstore.adelete(snapshot_key(message_id))


def stop_key(message_id: int) -> str:
    return f"stop:{message_id}"


def alive_key(message_id: int) -> str:
    return f"alive:{message_id}"


def _event(payload: dict[str, Any]) -> dict[str, Any]:
    return {"type": "chat.event", "payload": payload}


async def publish(conversation_id: int, payload: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(group_name(conversation_id), _event(payload))
