"""Workflows of the browser chat: send, edit, regenerate, switch versions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from accounts.models import User
from chatapp import hotstore
from chatapp.chat.events import HEARTBEAT_TTL, alive_key
from chatapp.models import Attachment, CatalogModel, Conversation, Message, MessageStatus

MAX_MESSAGE_CHARS = 100_000
MAX_ATTACHMENTS = 8


class ChatError(Exception):
    """A chat request refused before anything was saved; the message is for the user."""


def check_active(*, user_id: int) -> bool:

    return User.objects.filter(pk=user_id, is_active=True).exists()


def chat_models(*, user: Any) -> list[CatalogModel]:
    """The chat models the user's web key may use, for the model picker."""
    from keys.actions import do_get_web_key

    allowed = do_get_web_key(user=user).allowed_models or []
    models = CatalogModel.objects.filter(
        enabled=True, supports_chat=True, routes__enabled=True
    ).distinct()
    if allowed:
        models = models.filter(name__in=allowed)
    return list(models.order_by("name"))


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ChatError(f"No such {what}.")
    return int(value)


def check_conversation_id(*, user_id: int, conversation_id: Any) -> int:

    pk = _int(conversation_id, "conversation")
    if not Conversation.objects.filter(pk=pk, owner_id=user_id).exists():
        raise ChatError("No such conversation.")  # also when it is somebody else's
    return pk


def check_message_id(*, user_id: int, message_id: Any) -> int:

    pk = _int(message_id, "message")
    if not Message.objects.filter(pk=pk, conversation__owner_id=user_id).exists():
        raise ChatError("No such message.")
    return pk


def streaming_message_ids(*, conversation_id: int) -> list[int]:

    return list(
        Message.objects.filter(
            conversation_id=conversation_id, status=MessageStatus.STREAMING
        ).values_list("pk", flat=True)
    )


@dataclass(frozen=True)
class Started:
    """A reply to generate; its branch is rendered after the transaction commits."""

    conversation_id: int
    reply_id: int
    created: bool


def _check_text(text: Any, *, required: bool) -> str:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ChatError("The message must be text.")
    text = text.strip()
    if "\x00" in text:
        raise ChatError("The message contains a NUL character (\\u0000), which cannot be stored.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatError(
            "The message contains a lone UTF-16 surrogate (half of an emoji?), which cannot be stored."
        ) from None
    if len(text) > MAX_MESSAGE_CHARS:
        raise ChatError(
            f"The message is {len(text):,} characters long; the limit is {MAX_MESSAGE_CHARS:,}."
        )
    if required and not text:
        raise ChatError("Type a message first.")
    return text


def _check_model(*, user: Any, name: str, images: bool) -> CatalogModel:
    model = next((model for model in chat_models(user=user) if model.name == name), None)
    if model is None:
        raise ChatError(f"The model '{name}' is not available to you.")
    if images and not model.supports_vision:
        raise ChatError(
            f"{model.label} does not accept images: remove them or choose a model that does."
        )
    return model


def _start_reply(conversation: Any, parent: Any, created: bool) -> Started:
    reply = Message.objects.create(
        conversation=conversation,
        parent=parent,
        role="assistant",
        model=conversation.model,
        status=MessageStatus.STREAMING,
    )
    conversation.current_leaf = reply
    conversation.save(update_fields=["current_leaf", "updated_at"])
    # Alive from the start: the task that writes it beats from its first step, and a
    # reply with no heartbeat would be taken for one whose process died.
    hotstore.set(alive_key(reply.pk), True, HEARTBEAT_TTL)
    return Started(conversation.pk, reply.pk, created)


def _refuse_while_streaming(conversation: Any) -> None:

    if conversation.messages.filter(status=MessageStatus.STREAMING).exists():
        raise ChatError("A reply is still being written: wait for it or stop it first.")


def do_send_message(
    *, user_id: int, conversation_id: Any, text: Any, attachment_ids: Any, model: Any = None
) -> Started:
    """A user turn at the end of the displayed branch, and its reply (to be generated)."""

    user = User.objects.get(pk=user_id)
    if model is not None and not isinstance(model, str):
        raise ChatError("The model must be given by its name.")
    if not isinstance(attachment_ids, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in attachment_ids
    ):
        raise ChatError("Attachments must be a list of uploaded image ids.")
    if len(attachment_ids) > MAX_ATTACHMENTS:
        raise ChatError(f"At most {MAX_ATTACHMENTS} images per message.")
    text = _check_text(text, required=not attachment_ids)
    # Lock the conversation row: two tabs sending at once must not both append to
    # the same leaf.
    with transaction.atomic():
        created = conversation_id in (None, "")
        if created:
            choices = chat_models(user=user)
            name = (
                model if isinstance(model, str) and model else (choices[0].name if choices else "")
            )
            if not name:
                raise ChatError(
                    "No model is available to you yet: ask an administrator to add one."
                )
            conversation = Conversation(owner=user, model=name)
        else:
            pk = check_conversation_id(user_id=user_id, conversation_id=conversation_id)
            conversation = Conversation.objects.select_for_update().get(pk=pk)
            _refuse_while_streaming(conversation)
            if isinstance(model, str) and model:
                conversation.model = model
        attachments = list(
            Attachment.objects.filter(
                pk__in=[a for a in attachment_ids if isinstance(a, int)], owner=user, message=None
            )
        )
        if len(attachments) != len(attachment_ids):
            raise ChatError("An attached image is missing: upload it again.")
        _check_model(user=user, name=conversation.model, images=bool(attachments))
        conversation.save()
        message = Message.objects.create(
            conversation=conversation, parent=conversation.current_leaf, role="user", content=text
        )
        Attachment.objects.filter(pk__in=[a.pk for a in attachments]).update(message=message)
        return _start_reply(conversation, message, created)


def do_edit_message(*, user_id: int, message_id: Any, text: Any) -> Started:
    """A new version of a user turn (a sibling branch), and its reply."""

    pk = check_message_id(user_id=user_id, message_id=message_id)
    with transaction.atomic():
        original = Message.objects.select_related("conversation").get(pk=pk)
        if original.role != "user":
            raise ChatError("Only your own messages can be edited.")
        conversation = Conversation.objects.select_for_update().get(pk=original.conversation_id)
        _refuse_while_streaming(conversation)
        images = list(original.attachments.all())
        text = _check_text(text, required=not images)
        _check_model(user=conversation.owner, name=conversation.model, images=bool(images))
        message = Message.objects.create(
            conversation=conversation, parent=original.parent, role="user", content=text
        )
        for image in images:  # the new version keeps the images; the files are shared
            Attachment.objects.create(
                owner=image.owner, message=message, file=image.file.name, media_type=image.media_type,
                width=image.width, height=image.height, size=image.size, original_name=image.original_name,
            )  # fmt: skip
        return _start_reply(conversation, message, False)


def do_regenerate(*, user_id: int, message_id: Any) -> Started:
    """Another version of a reply (a sibling branch)."""

    pk = check_message_id(user_id=user_id, message_id=message_id)
    with transaction.atomic():
        original = Message.objects.get(pk=pk)
        if original.role != "assistant":
            raise ChatError("Only replies can be regenerated.")
        conversation = Conversation.objects.select_for_update().get(pk=original.conversation_id)
        _refuse_while_streaming(conversation)
        _check_model(user=conversation.owner, name=conversation.model, images=False)
        return _start_reply(conversation, original.parent, False)


def do_switch_branch(*, user_id: int, message_id: Any) -> Any:
    """Show ``message``'s version, with that version's own continuation."""

    pk = check_message_id(user_id=user_id, message_id=message_id)
    message = Message.objects.get(pk=pk)
    conversation = Conversation.objects.get(pk=message.conversation_id)
    conversation.current_leaf = message.latest_leaf()
    conversation.save(update_fields=["current_leaf"])
    return conversation


def do_mark_interrupted(*, message_id: int, text: str) -> Message | None:
    """Save a reply that no live process is writing as interrupted, with the text it had.

    Only a reply still marked streaming changes (a writer that finished meanwhile
    wins); returns the message when it changed.
    """
    changed = Message.objects.filter(pk=message_id, status=MessageStatus.STREAMING).update(
        status=MessageStatus.INTERRUPTED, content=text
    )
    if not changed:
        return None
    message = Message.objects.get(pk=message_id)
    Conversation.objects.filter(pk=message.conversation_id).update(updated_at=timezone.now())
    return message


def conversation_of_message(*, message_id: int) -> int:
    return int(Message.objects.values_list("conversation_id", flat=True).get(pk=message_id))
