"""HTML fragments of the chat page, rendered on the server.

A branch renders in a fixed number of queries whatever its length: every message
of the conversation and their attachments are fetched in two, siblings (the
versions of a turn) are found in memory.  Nothing here is called inside a
transaction: rendering markdown under a row lock (the database-wide write lock on
SQLite) would hold every other writer up.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.conf import settings
from django.template.loader import render_to_string

from chatapp.chat.rendering import render_markdown
from chatapp.models import ATTACHED, Conversation, Message
from chatapp.relay.dialects.browser import failure_text


def _item(message: Message, siblings: list[Message]) -> dict[str, Any]:
    index = next((number for number, sibling in enumerate(siblings) if sibling.pk == message.pk), 0)
    return {
        "message": message,
        "html": render_markdown(message.content) if message.role == "assistant" else "",
        "reasoning_html": render_markdown(message.reasoning),
        "error": failure_text(message.error) if message.status == "failed" else "",
        "attachments": message.attached(),
        "version": index + 1,
        "versions": len(siblings),
        "previous_version": siblings[index - 1].pk if index > 0 else None,
        "next_version": siblings[index + 1].pk if index + 1 < len(siblings) else None,
        "show_cost": settings.SWITCHBOARD_SHOW_COST,
        "currency": settings.SWITCHBOARD_CURRENCY,
    }


def with_attachments(message: Message, attachments: list[Any]) -> Message:
    """``message`` with its attachments known (``Message.attached``), as a read leaves it.

    For messages just written: their branch renders without reading them back.
    """
    setattr(message, ATTACHED, list(attachments))
    return message


def branch_items(
    conversation: Conversation, messages: list[Message] | None = None
) -> list[dict[str, Any]]:
    """The displayed branch, oldest first, with each message's versions.

    ``messages``: its ``messages_with_attachments()``, when the caller has them already.
    """
    if conversation.current_leaf_id is None:
        return []
    if messages is None:
        messages = conversation.messages_with_attachments()
    versions: dict[tuple[int | None, str], list[Message]] = defaultdict(list)
    for message in messages:
        versions[(message.parent_id, message.role)].append(message)
    return [
        _item(message, versions[(message.parent_id, message.role)])
        for message in conversation.branch(messages)
    ]


def render_branch(conversation: Conversation, messages: list[Message] | None = None) -> str:
    return render_to_string(
        "chatapp/chat.html#messages",
        {"items": branch_items(conversation, messages), "conversation": conversation},
    )


def render_message(message: Message, siblings: list[Message] | None = None) -> str:
    """One message as it stands (a reply that just ended).

    ``siblings``: its versions (itself included), oldest first, when the caller knows them.
    """
    if siblings is None:
        siblings = list(
            Message.objects.filter(
                conversation_id=message.conversation_id,
                parent_id=message.parent_id,
                role=message.role,
            ).order_by("created_at", "id")
        )
    return render_to_string("chatapp/chat.html#message-item", {"item": _item(message, siblings)})
