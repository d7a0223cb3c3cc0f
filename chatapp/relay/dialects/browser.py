"""The browser dialect: the chat page's conversations in, WebSocket frames out.

It parses a conversation's branch (message rows and their image files) into a
canonical ``ChatRequest``, and renders the pipeline's items as the JSON frames the
chat page reads (``chatapp.chat.consumers`` documents the protocol).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from chatapp.relay import tokens
from chatapp.relay.canonical import ChatRequest, ImagePart, Part, TextDelta, TextPart
from chatapp.relay.canonical import Message as Turn
from chatapp.relay.upstreams import UpstreamItem

# --- Requests ---


@dataclass
class Prepared:
    conversation_id: int
    user_id: int
    request: ChatRequest
    key_hash: str  # the owner's web key


def _history(message: Any) -> list[Any]:
    """The turns before ``message`` on its branch, oldest first, without failed replies."""
    from chatapp.models import Message, MessageStatus

    by_id = {
        item.pk: item
        for item in Message.objects.filter(conversation_id=message.conversation_id)
        .prefetch_related("attachments")
        .order_by("created_at", "id")
    }
    path: list[Any] = []
    node = by_id.get(message.parent_id) if message.parent_id else None
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id else None
    path.reverse()
    return [
        item
        for item in path
        if not (item.role == "assistant" and item.status == MessageStatus.FAILED)
    ]


def _parts(item: Any) -> list[Part]:
    parts: list[Part] = []
    for attachment in item.attachments.all():
        with attachment.file.open("rb") as handle:
            data = base64.b64encode(handle.read()).decode()
        parts.append(ImagePart(data=data, media_type=attachment.media_type))
    if item.content:
        parts.append(TextPart(item.content))
    return parts


def prepare(message_id: int) -> Prepared:
    """The request for assistant message ``message_id``: its branch's turns before it."""
    from chatapp.models import Message
    from keys.actions import do_get_web_key

    message = Message.objects.select_related("conversation", "conversation__owner").get(
        pk=message_id
    )
    conversation = message.conversation
    turns = [
        Turn("user" if item.role == "user" else "assistant", _parts(item))
        for item in _history(message)
    ]
    request = ChatRequest(
        model=conversation.model,
        messages=[turn for turn in turns if turn.parts],
        system=[TextPart(conversation.system_prompt)] if conversation.system_prompt.strip() else [],
        temperature=conversation.temperature,
        stream=True,
        include_usage=True,
        dialect="browser",
    )
    key = do_get_web_key(user=conversation.owner)
    return Prepared(conversation.pk, conversation.owner_id, request, key.key_hash)


def fit_context(request: ChatRequest, context_window: int, max_output: int) -> int:
    """Leave out the oldest turns until the request fits; the newest turn always stays.

    Returns how many turns were left out.
    """
    left_out = 0
    while (
        len(request.messages) > 1 and tokens.estimate_request(request) + max_output > context_window
    ):
        request.messages.pop(0)
        left_out += 1
        # A conversation sent upstream starts with the user.
        while len(request.messages) > 1 and request.messages[0].role != "user":
            request.messages.pop(0)
            left_out += 1
    return left_out


# --- Frames ---


class ReplyWriter:
    """The frames of one reply: text deltas with sequence numbers, and the text so far."""

    def __init__(self, message_id: int) -> None:
        self.message_id = message_id
        self.seq = 0
        self.text = ""

    def item(self, item: UpstreamItem) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        for event in item.events:
            if not isinstance(event, TextDelta) or event.choice != 0 or not event.text:
                continue
            self.seq += 1
            self.text += event.text
            frames.append(
                {"type": "delta", "message": self.message_id, "seq": self.seq, "text": event.text}
            )
        return frames

    @property
    def snapshot(self) -> tuple[int, str]:
        return self.seq, self.text

    def render_frame(self, html: str) -> dict[str, Any]:
        return {"type": "render", "message": self.message_id, "seq": self.seq, "html": html}


def snapshot_frame(message_id: int, snapshot: tuple[int, str] | None) -> dict[str, Any]:
    seq, text = snapshot if snapshot else (0, "")
    return {"type": "snapshot", "message": message_id, "seq": seq, "text": text}


def left_out_frame(message_id: int, count: int) -> dict[str, Any]:
    return {"type": "left_out", "message": message_id, "count": count}


def done_frame(message_id: int, status: str, html: str) -> dict[str, Any]:
    return {"type": "done", "message": message_id, "status": status, "html": html}


def title_frame(conversation_id: int, title: str) -> dict[str, Any]:
    return {"type": "title", "conversation": conversation_id, "title": title}


def error_frame(error: str, client_id: str = "") -> dict[str, Any]:
    return {"type": "error", "error": error, "client_id": client_id}
