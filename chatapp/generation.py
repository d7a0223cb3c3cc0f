"""Browser-chat replies: generated on the server, detached from any socket.

A reply is an asyncio task in the process that received the message.  It runs
the same pipeline as the HTTP API (the ``browser`` dialect: the user's web key
is admitted, routed, metered and settled like any API key) and publishes what it
produces to the conversation's channel-layer group, so every open tab — on any
Daphne process, with the Redis layer — sees it.  Closing the tab does not stop
it; the reply is saved when it ends.

Each delta carries a sequence number, and the text so far is kept in the hot
store (``stream:<message id>``): a client that (re)connects subscribes first,
then reads that snapshot and ignores deltas it already has.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chatapp import hotstore
from chatapp.models import Conversation, Message, MessageStatus
from chatapp.relay import pipeline, tokens
from chatapp.relay.canonical import (
    ChatRequest,
    ImagePart,
    Part,
    TextDelta,
    TextPart,
)
from chatapp.relay.canonical import (
    Message as CanonicalMessage,
)
from chatapp.relay.errors import RelayError, UpstreamError
from chatapp.rendering import render_markdown
from keys.actions import do_get_web_key
from keys.auth import aprincipal, check_principal

logger = logging.getLogger(__name__)

RENDER_EVERY = 0.75  # seconds between server-rendered markdown swaps while streaming
STOP_CHECK_EVERY = 0.25  # seconds between looks at the shared stop flag
SNAPSHOT_TTL = 3600

_tasks: set[asyncio.Task[Any]] = set()


def group_name(conversation_id: int) -> str:
    return f"conversation.{conversation_id}"


def snapshot_key(message_id: int) -> str:
    return f"stream:{message_id}"


def stop_key(message_id: int) -> str:
    return f"stop:{message_id}"


async def publish(conversation_id: int, payload: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(
            group_name(conversation_id), {"type": "chat.event", "payload": payload}
        )


def start(message_id: int) -> asyncio.Task[None]:
    """Generate the reply for assistant message ``message_id`` in the background."""
    task = asyncio.get_running_loop().create_task(run(message_id))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


async def request_stop(message_id: int) -> None:
    # A flag in the hot store reaches the task whichever process runs it.
    await hotstore.aset(stop_key(message_id), True, 600)


async def wait_all() -> None:
    """Wait for the replies being generated in this process (tests, shutdown)."""
    if _tasks:
        await asyncio.wait(list(_tasks))


@dataclass
class Prepared:
    conversation: Conversation
    message: Message
    request: ChatRequest
    key_hash: str  # the owner's web key


def _history(conversation: Conversation, message: Message) -> list[Message]:
    """The turns before ``message`` on its branch, oldest first, without failed replies."""
    by_id = {item.pk: item for item in conversation.messages.prefetch_related("attachments")}
    path: list[Message] = []
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


def _parts(item: Message) -> list[Part]:
    parts: list[Part] = []
    for attachment in item.attachments.all():
        with attachment.file.open("rb") as handle:
            data = base64.b64encode(handle.read()).decode()
        parts.append(ImagePart(data=data, media_type=attachment.media_type))
    if item.content:
        parts.append(TextPart(item.content))
    return parts


def _prepare(message_id: int) -> Prepared:
    message = Message.objects.select_related("conversation", "conversation__owner").get(
        pk=message_id
    )
    conversation = message.conversation
    history = _history(conversation, message)
    turns = [
        CanonicalMessage("user" if item.role == "user" else "assistant", _parts(item))
        for item in history
    ]
    turns = [turn for turn in turns if turn.parts]
    request = ChatRequest(
        model=conversation.model,
        messages=turns,
        system=[TextPart(conversation.system_prompt)] if conversation.system_prompt.strip() else [],
        temperature=conversation.temperature,
        stream=True,
        include_usage=True,
        dialect="browser",
    )
    key = do_get_web_key(user=conversation.owner)
    return Prepared(conversation, message, request, key.key_hash)


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


def _save(message_id: int, fields: dict[str, Any]) -> Message:
    Message.objects.filter(pk=message_id).update(**fields)
    message = Message.objects.select_related("conversation").get(pk=message_id)
    Conversation.objects.filter(pk=message.conversation_id).update(updated_at=timezone.now())
    return message


def _needs_title(conversation_id: int) -> bool:
    conversation = Conversation.objects.get(pk=conversation_id)
    return not conversation.title_generated and not conversation.title


async def run(message_id: int) -> None:
    status: str = MessageStatus.FAILED
    error, text = "", ""
    call: pipeline.Call | None = None
    conversation_id = 0
    upstream: pipeline.UpstreamStream | None = None
    left_out = 0
    started = time.perf_counter()
    try:
        prepared = await database_sync_to_async(_prepare)(message_id)
        conversation_id = prepared.conversation.pk
        principal = await aprincipal(prepared.key_hash)
        if principal is None:
            raise RelayError(403, "Your chat key could not be found.")
        principal = check_principal(principal)
        request = prepared.request
        call = pipeline.Call(
            principal=principal,
            endpoint="browser",
            dialect="browser",
            model=request.model,
            stream=True,
            user_id=prepared.conversation.owner_id,
        )
        call.request = request
        from chatapp.relay import catalog

        model = await catalog.aget_model(request.model)
        if model is not None:
            left_out = fit_context(request, model.context_window, model.max_output_tokens)
            if left_out:
                await publish(
                    conversation_id, {"type": "left_out", "message": message_id, "count": left_out}
                )
        model = await pipeline.admit(call, request=request)
        upstream = await pipeline.open_chat(call, model, request)
        status, text = await _relay(call, upstream, message_id, conversation_id)
    except RelayError as exc:
        error = exc.message
        if call is not None:
            call.fail(exc)
    except UpstreamError as exc:
        error = f"The model's provider failed mid-reply: {exc.message}"
        if call is not None:
            call.fail(RelayError(502, error, type="upstream_error"))
    except asyncio.CancelledError:
        status = MessageStatus.STOPPED
        raise
    except Exception as exc:
        logger.exception("reply %s failed", message_id)
        error = f"Internal error while generating the reply ({type(exc).__name__})."
    finally:
        if upstream is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(upstream.aclose())
        await asyncio.shield(
            _finish(message_id, conversation_id, call, status, error, text, left_out, started)
        )


async def _relay(
    call: pipeline.Call, upstream: pipeline.UpstreamStream, message_id: int, conversation_id: int
) -> tuple[str, str]:
    seq, text = 0, ""
    last_render = time.monotonic()
    last_stop_check = 0.0
    opening = len(upstream.opening)
    async for item in upstream:
        if opening:
            opening -= 1
        else:
            call.observe(item.events)
        for event in item.events:
            if not isinstance(event, TextDelta) or event.choice != 0 or not event.text:
                continue
            seq += 1
            text += event.text
            await hotstore.aset(snapshot_key(message_id), (seq, text), SNAPSHOT_TTL)
            await publish(
                conversation_id,
                {"type": "delta", "message": message_id, "seq": seq, "text": event.text},
            )
        now = time.monotonic()
        if now - last_render >= RENDER_EVERY and text:
            last_render = now
            await publish(
                conversation_id,
                {
                    "type": "render",
                    "message": message_id,
                    "seq": seq,
                    "html": render_markdown(text),
                },
            )
        if now - last_stop_check >= STOP_CHECK_EVERY:
            last_stop_check = now
            if await hotstore.aget(stop_key(message_id)):
                call.status = "ok"
                return MessageStatus.STOPPED, text
    call.status = "ok"
    return MessageStatus.COMPLETE, text


async def _finish(
    message_id: int,
    conversation_id: int,
    call: pipeline.Call | None,
    status: str,
    error: str,
    text: str,
    left_out: int,
    started: float,
) -> None:
    """Settle (billing what was produced), save the reply, tell every tab."""
    if call is not None:
        if status == MessageStatus.STOPPED:
            call.status = "ok"
        call.settle()
    usage = call.final_usage if call is not None else None
    fields: dict[str, Any] = {
        "content": text,
        "status": status,
        "error": error,
        "left_out": left_out,
        "latency_ms": int((time.perf_counter() - started) * 1000),
        "input_tokens": usage.input_tokens if usage else 0,
        "output_tokens": usage.output_tokens if usage else 0,
        "cost": call.cost if call is not None else 0,
        "request_id": call.request_id if call is not None else "",
    }
    try:
        message = await database_sync_to_async(_save)(message_id, fields)
    except Exception:
        logger.exception("saving reply %s failed", message_id)
        return
    await hotstore.aset(snapshot_key(message_id), None, 1)
    from chatapp.views import render_message

    html = await database_sync_to_async(render_message)(message)
    await publish(
        message.conversation_id,
        {"type": "done", "message": message_id, "status": status, "html": html},
    )
    if status in (MessageStatus.COMPLETE, MessageStatus.STOPPED) and await database_sync_to_async(
        _needs_title
    )(message.conversation_id):
        # Not on the shared sync thread: in the embedded mode the task runs inline.
        await sync_to_async(_queue_title, thread_sensitive=False)(message.conversation_id)
        if settings.CELERY_TASK_ALWAYS_EAGER:
            # Run inline, the task could not reach this loop's channel layer: tell the tabs here.
            title = (
                await Conversation.objects.filter(pk=message.conversation_id)
                .values_list("title", flat=True)
                .afirst()
            )
            if title:
                await publish(
                    message.conversation_id,
                    {"type": "title", "conversation": message.conversation_id, "title": title},
                )


def _queue_title(conversation_id: int) -> None:
    from chatapp.tasks import generate_title

    transaction.on_commit(lambda: generate_title.delay(conversation_id))
