"""Celery tasks of the chat (eager in the embedded mode)."""

from __future__ import annotations

import asyncio
import logging

from celery import shared_task
from channels.db import database_sync_to_async
from django.conf import settings

logger = logging.getLogger(__name__)

TITLE_PROMPT = (
    "Write a short title (at most six words) for a conversation that starts like this. "
    "Answer with the title only, no quotes.\n\nUser: {user}\n\nAssistant: {assistant}"
)


def fallback_title(text: str) -> str:
    words = " ".join(text.split())
    return words if len(words) <= 60 else words[:57].rstrip() + "…"


def clean_title(text: str) -> str:
    line = next((line for line in text.strip().splitlines() if line.strip()), "")
    line = line.strip().strip("\"'“”«»#*").removeprefix("Title:").strip()
    return fallback_title(line)


# The name it had before the chat moved to chatapp.chat: tasks already queued still run.
@shared_task(name="chatapp.tasks.generate_title", ignore_result=True)
def generate_title(conversation_id: int) -> None:
    """Title a conversation after its first exchange, with its own model; idempotent."""
    asyncio.run(agenerate_title(conversation_id))


async def agenerate_title(conversation_id: int, *, own_loop: bool = True) -> None:
    """``own_loop``: run by ``asyncio.run`` (a Celery task), whose loop's clients are
    closed at the end; False on the server's own loop, whose clients stay open."""
    from chatapp import hotstore
    from chatapp.chat.events import publish
    from chatapp.models import Conversation, Message
    from chatapp.relay import http as relay_http
    from chatapp.relay import pipeline
    from chatapp.relay.canonical import ChatRequest, TextPart
    from chatapp.relay.canonical import Message as Turn
    from chatapp.relay.dialects import browser
    from chatapp.relay.errors import RelayError
    from keys.actions import do_get_web_key
    from keys.auth import aprincipal, check_principal
    from keys.exceptions import KeyRefused

    def load() -> tuple[Conversation, list[Message], str] | None:
        conversation = (
            Conversation.objects.select_related("owner").filter(pk=conversation_id).first()
        )
        if conversation is None or conversation.title or conversation.title_generated:
            return None
        messages = list(conversation.messages.order_by("created_at")[:2])
        return conversation, messages, do_get_web_key(user=conversation.owner).key_hash

    loaded = await database_sync_to_async(load)()
    if loaded is None:
        return
    conversation, messages, key_hash = loaded
    first_user = next((m.content for m in messages if m.role == "user"), "")
    first_reply = next((m.content for m in messages if m.role == "assistant"), "")
    title = fallback_title(first_user) or "Conversation"
    try:
        principal = await aprincipal(key_hash) if settings.SWITCHBOARD_CHAT_TITLES else None
        if principal is not None:
            prompt = TITLE_PROMPT.format(user=first_user[:2000], assistant=first_reply[:1000])
            try:
                call = pipeline.Call(
                    principal=check_principal(principal),
                    endpoint="title",
                    dialect="browser",
                    model=conversation.model,
                    user_id=conversation.owner_id,
                    request=ChatRequest(
                        model=conversation.model,
                        messages=[Turn("user", [TextPart(prompt)])],
                        max_tokens=24,
                        temperature=0.2,
                        dialect="browser",
                    ),
                )
                reply = await pipeline.complete(call)
                choices = reply.completion.choices
                generated = clean_title(choices[0].text if choices else "")
                if generated:
                    title = generated
            except (RelayError, KeyRefused) as exc:
                logger.info(
                    "title for conversation %s falls back to the first message: %s",
                    conversation_id,
                    exc,
                )
    finally:
        if own_loop:
            await relay_http.aclose()

    def save() -> bool:
        # Only if nobody named it meanwhile.
        return bool(
            Conversation.objects.filter(pk=conversation_id, title="").update(
                title=title, title_generated=True
            )
        )

    # From a Celery worker the title reaches open tabs through the (Redis) channel
    # layer; run inline (embedded mode) the chat's generation tells the tabs itself.
    if await database_sync_to_async(save)() and not settings.CELERY_TASK_ALWAYS_EAGER:
        await publish(conversation_id, browser.title_frame(conversation_id, title))
    if own_loop:
        await hotstore.aclose()
