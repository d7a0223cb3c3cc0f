"""What the chat publishes and keeps in the hot store while a reply is written.

- the conversation's channel-layer group: every open tab of it, on any Daphne
  process with the Redis layer, hears the reply's frames;
- ``stream:<message id>``: the text so far (with its sequence number), so a tab
  that (re)connects catches up before the live tail;
- ``stop:<message id>``: a stop asked for from any process;
- ``alive:<message id>``: the heartbeat of the process writing the reply.  A reply
  marked streaming with no heartbeat has no live writer (its process died) and is
  saved as interrupted the next time anyone opens, sends to or stops that
  conversation (``chatapp.chat.actions.do_recover_interrupted``).
"""

from __future__ import annotations

from typing import Any

from channels.layers import get_channel_layer

SNAPSHOT_TTL = 3600
HEARTBEAT_EVERY = 2.0  # seconds between heartbeats of a reply being written
HEARTBEAT_TTL = 10  # seconds a heartbeat lasts: five missed beats mean the writer is gone


def group_name(conversation_id: int) -> str:
    return f"conversation.{conversation_id}"


def snapshot_key(message_id: int) -> str:
    return f"stream:{message_id}"


def stop_key(message_id: int) -> str:
    return f"stop:{message_id}"


def alive_key(message_id: int) -> str:
    return f"alive:{message_id}"


async def publish(conversation_id: int, payload: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(
            group_name(conversation_id), {"type": "chat.event", "payload": payload}
        )
