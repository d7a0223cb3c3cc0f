"""Workflows of the browser chat: send, edit, regenerate, switch versions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from django.db import OperationalError, connection, models, transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from accounts.models import User
from chatapp.chat.fragments import with_attachments
from chatapp.models import (
    Attachment,
    CatalogModel,
    Conversation,
    Message,
    MessageStatus,
    ProviderType,
)
from chatapp.relay import catalog
from keys.auth import Principal, principal_of

MAX_MESSAGE_CHARS = 100_000
MAX_ATTACHMENTS = 8
# Seconds an action waits for a conversation (or an upload) another writer holds, on
# PostgreSQL: normally milliseconds (another tab's send).  Longer, the action is
# refused as busy rather than holding one of the few threads every chat of the
# process writes through (``generation.TRIP_THREADS``).
LOCK_WAIT = 5.0


class ChatError(Exception):
    """A chat request refused before anything was saved; the message is for the user."""


class AccountDisabled(ChatError):
    """The user has been disabled: told so, and the socket is closed."""


class ConversationBusy(ChatError):
    """Another writer held the conversation longer than ``LOCK_WAIT``: nothing was saved."""


@contextlib.contextmanager
def _writing(*, waits: bool = True) -> Iterator[None]:
    """One action's writes, all or nothing, waiting at most ``LOCK_WAIT`` for a lock.

    ``waits``: whether it may wait on a row another writer holds (a new conversation
    without images locks nothing: it skips the statement that bounds the wait).
    """
    try:
        with transaction.atomic():
            if waits and connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    # Local: for this transaction only (the connection goes back to a pool).
                    cursor.execute(
                        "SELECT set_config('lock_timeout', %s, true)",
                        [f"{round(LOCK_WAIT * 1000)}ms"],
                    )
            yield
    except OperationalError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == "55P03":  # lock_not_available
            raise ConversationBusy(
                _(
                    "This conversation is busy: another change to it is still being saved. "
                    "Nothing was saved; try again in a moment."
                )
            ) from exc
        raise


def check_active(*, user_id: int) -> bool:

    return User.objects.filter(pk=user_id, is_active=True).exists()


def chat_models(*, user: Any) -> list[CatalogModel]:
    """The chat models the user's web key may use, for the model picker."""
    from keys.actions import do_get_web_key

    return _allowed(do_get_web_key(user=user).allowed_models)


def _allowed(
    allowed_models: Any, version: str | None = None, catalog: ChatCatalog | None = None
) -> list[CatalogModel]:
    models, _local = catalog or _chat_catalog(version)
    allowed = set(allowed_models or ())
    return [model for model in models if not allowed or model.name in allowed]


# The enabled chat models with a route, and which of them have a local route, as of
# a catalog version (chatapp.relay.catalog): read on every page load and send, they
# are read from the database only when the catalog changed.
_chat_cache: tuple[str, list[CatalogModel], frozenset[int]] | None = None
ChatCatalog = tuple[list[CatalogModel], frozenset[int]]


def _chat_catalog(version: str | None = None) -> tuple[list[CatalogModel], frozenset[int]]:
    """``version``: the catalog's version just read by an async caller (no second read)."""
    global _chat_cache
    if version is None:
        version = catalog.version()  # read before the rows: a change meanwhile bumps it again
    cached = _chat_cache
    if cached is not None and version is not None and cached[0] == version:
        return cached[1], cached[2]
    models = list(
        CatalogModel.objects.filter(enabled=True, supports_chat=True, routes__enabled=True)
        .distinct()
        .order_by("name")
    )
    local = frozenset(
        CatalogModel.objects.filter(
            pk__in=[model.pk for model in models],
            routes__enabled=True,
            routes__provider__type=ProviderType.LOCAL,
        ).values_list("pk", flat=True)
    )
    if version is not None:
        _chat_cache = (version, models, local)
    return models, local


def load_chat_catalog(version: str | None = None) -> None:
    """Cache the chat's catalog at ``version`` (else the current one) unless it is."""
    _chat_catalog(version)


def catalog_in_memory(version: str | None) -> ChatCatalog | None:
    """The chat's catalog at ``version`` if it is cached, else None (reads nothing).

    For ``check_new_conversation`` on the event loop: given it (and the sender's key),
    the check reads nothing, even should a database thread cache a newer version meanwhile.
    """
    cached = _chat_cache
    if cached is None or version is None or cached[0] != version:
        return None
    return cached[1], cached[2]


def _chat_access(
    user_id: int,
    known: Principal | None = None,
    version: str | None = None,
    catalog: ChatCatalog | None = None,
) -> tuple[list[CatalogModel], Principal, str]:
    """The chat models the user's web key may use, that key as the relay sees it, and
    its hash when it was read here.

    ``known``: the key's principal from the hot store (``keys.auth.aweb_principal``),
    kept coherent with the key and its owner like every principal: nothing is read
    then.  Otherwise one query reads the key with its owner (and makes the key on the
    owner's first message).  Raises AccountDisabled for a disabled owner.
    """
    from keys.actions import do_get_web_key
    from keys.models import ApiKey

    if known is not None:
        if known.state == "owner_disabled":
            raise AccountDisabled(_("Your account is disabled."))
        return _allowed(known.allowed_models, version, catalog), known, ""
    key = (
        ApiKey.objects.select_related("user")
        .filter(user_id=user_id, is_web_key=True, user__is_active=True)
        .first()
    )
    if key is None:
        user = User.objects.filter(pk=user_id, is_active=True).first()
        if user is None:
            raise AccountDisabled(_("Your account is disabled."))
        key = do_get_web_key(user=user)
        key.user = user
    return _allowed(key.allowed_models, version, catalog), principal_of(key), key.key_hash


def default_chat_model(
    models: list[CatalogModel], version: str | None = None, catalog: ChatCatalog | None = None
) -> CatalogModel | None:
    """A new chat's model among ``models``: the admin's pick, else the local model, else the first."""
    chosen = next((model for model in models if model.is_chat_default), None)
    if chosen is None:
        _models, local = catalog or _chat_catalog(version)
        chosen = next((model for model in models if model.pk in local), None)
    return chosen or (models[0] if models else None)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ChatError(
            _("No such conversation.") if what == "conversation" else _("No such message.")
        )
    return int(value)


def check_conversation_id(*, user_id: int, conversation_id: Any) -> int:

    pk = _int(conversation_id, "conversation")
    if not Conversation.objects.filter(pk=pk, owner_id=user_id).exists():
        raise ChatError(_("No such conversation."))  # also when it is somebody else's
    return pk


def check_message_id(*, user_id: int, message_id: Any) -> int:

    pk = _int(message_id, "message")
    if not Message.objects.filter(pk=pk, conversation__owner_id=user_id).exists():
        raise ChatError(_("No such message."))
    return pk


def streaming_messages(*, conversation_id: int) -> list[tuple[int, Any]]:
    """(id, created_at) of the conversation's replies still marked streaming."""
    return list(
        Message.objects.filter(
            conversation_id=conversation_id, status=MessageStatus.STREAMING
        ).values_list("pk", "created_at")
    )


@dataclass(frozen=True)
class Started:
    """A reply to generate; its branch is rendered after the transaction commits."""

    @property
    def conversation_id(self) -> int:
        return self.conversation.pk

    @property
    def reply_id(self) -> int:
        return self.reply.pk

    conversation: Conversation
    reply: Message
    created: bool
    # The owner's web key, which the reply is metered on, as read by the action: the
    # reply needs no trip to the database (queued behind every other) to find it.
    principal: Principal
    # Every message of the conversation with its attachments, when the action knows
    # them all (a new conversation): the branch and the request need no read.
    messages: list[Message] | None = None
    web_key_hash: str = ""  # when the action read the key (to be remembered)


def _check_text(text: Any, *, required: bool) -> str:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ChatError(_("The message must be text."))
    text = text.strip()
    if "\x00" in text:
        raise ChatError(
            _("The message contains a NUL character (\\u0000), which cannot be stored.")
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ChatError(
            _(
                "The message contains a lone UTF-16 surrogate (half of an emoji?), which cannot be stored."
            )
        ) from None
    if len(text) > MAX_MESSAGE_CHARS:
        raise ChatError(
            _("The message is %(size)s characters long; the limit is %(limit)s.")
            % {"size": f"{len(text):,}", "limit": f"{MAX_MESSAGE_CHARS:,}"}
        )
    if required and not text:
        raise ChatError(_("Type a message first."))
    return text


def _check_settings(system_prompt: Any, temperature: Any) -> tuple[str, float | None]:
    """A new conversation's settings, as typed in the page's Settings before the first send."""
    if system_prompt is None:
        system_prompt = ""
    if not isinstance(system_prompt, str):
        raise ChatError(_("The system prompt must be text."))
    if "\x00" in system_prompt:
        raise ChatError(
            _("The system prompt contains a NUL character (\\u0000), which cannot be stored.")
        )
    if len(system_prompt) > MAX_MESSAGE_CHARS:
        raise ChatError(
            _("The system prompt is %(size)s characters long; the limit is %(limit)s.")
            % {"size": f"{len(system_prompt):,}", "limit": f"{MAX_MESSAGE_CHARS:,}"}
        )
    if temperature in (None, ""):
        return system_prompt.strip(), None
    try:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float | str):
            raise ValueError
        value = float(temperature)
    except ValueError:
        raise ChatError(_("The temperature must be a number from 0 to 2.")) from None
    if not 0 <= value <= 2:  # also refuses NaN
        raise ChatError(_("The temperature must be a number from 0 to 2."))
    return system_prompt.strip(), value


def _check_model(*, models: list[CatalogModel], name: str, images: bool) -> CatalogModel:
    model = next((model for model in models if model.name == name), None)
    if model is None:
        raise ChatError(
            _("The model “%(model)s” is not available to you: pick another model.")
            % {"model": name}
        )
    if images and not model.supports_vision:
        raise ChatError(
            _("%(model)s cannot read images: remove the image or pick a model that can.")
            % {"model": model.label}
        )
    return model


def _start_reply(
    conversation: Any, parent: Any, created: bool, principal: Principal, web_key_hash: str
) -> Started:
    reply = Message.objects.create(
        conversation=conversation,
        parent=parent,
        role="assistant",
        model=conversation.model,
        status=MessageStatus.STREAMING,
    )
    conversation.current_leaf = reply
    conversation.save(update_fields=["current_leaf", "updated_at"])
    # No heartbeat yet: the task that writes the reply beats from its first step, and
    # until a heartbeat's lifetime has passed a reply without one is not taken for one
    # whose process died (generation.recover).
    return Started(conversation, reply, created, principal, web_key_hash=web_key_hash)


def _refuse_while_streaming(conversation: Any) -> None:
    if conversation.messages.filter(status=MessageStatus.STREAMING).exists():
        raise ChatError(_("A reply is still being written: wait for it or stop it first."))


def do_send_message(
    *,
    user_id: int,
    conversation_id: Any,
    text: Any,
    attachment_ids: Any,
    model: Any = None,
    system_prompt: Any = None,
    temperature: Any = None,
    principal: Principal | None = None,
    catalog_version: str | None = None,
) -> Started:
    """A user turn at the end of the displayed branch, and its reply (to be generated).

    A new conversation takes its ``system_prompt`` and ``temperature`` from the send
    itself: its first reply is generated before the page could save any setting.
    ``principal``: the sender's web key as the hot store has it, if known;
    ``catalog_version``: the catalog's version, if just read.
    """
    if starts_conversation(conversation_id, attachment_ids):
        start = check_new_conversation(
            user_id=user_id,
            text=text,
            model=model,
            system_prompt=system_prompt,
            temperature=temperature,
            principal=principal,
            catalog_version=catalog_version,
        )
        return do_start_conversations(starts=[start])[0]
    models, principal, web_key_hash = _chat_access(user_id, principal, catalog_version)

    if model is not None and not isinstance(model, str):
        raise ChatError(_("The model must be given by its name."))
    if not isinstance(attachment_ids, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in attachment_ids
    ):
        raise ChatError(_("Attachments must be a list of uploaded image ids."))
    if len(attachment_ids) > MAX_ATTACHMENTS:
        raise ChatError(_("At most %(count)d images per message.") % {"count": MAX_ATTACHMENTS})
    text = _check_text(text, required=not attachment_ids)
    # Lock the conversation row: two tabs sending at once must not both append to
    # the same leaf.
    created = conversation_id in (None, "")
    with _writing(waits=not created or bool(attachment_ids)):
        if created:
            conversation = _new_conversation(
                user_id, models, model, system_prompt, temperature, catalog_version
            )
        else:
            pk = check_conversation_id(user_id=user_id, conversation_id=conversation_id)
            conversation = Conversation.objects.select_for_update().get(pk=pk)
            _refuse_while_streaming(conversation)
            if isinstance(model, str) and model:
                conversation.model = model
        attachments = (
            list(
                Attachment.objects.filter(
                    pk__in=[a for a in attachment_ids if isinstance(a, int)],
                    owner_id=user_id,
                    message=None,
                )
            )
            if attachment_ids
            else []
        )
        if len(attachments) != len(attachment_ids):
            raise ChatError(_("An attached image is missing: upload it again."))
        _check_model(models=models, name=conversation.model, images=bool(attachments))
        # An existing conversation: only what a send changes (a rename or a settings save
        # in another tab keeps its words).
        conversation.save(update_fields=None if created else ["model", "updated_at"])
        message = Message.objects.create(
            conversation=conversation, parent=conversation.current_leaf, role="user", content=text
        )
        if attachments:
            # Only images no other send took meanwhile (two tabs sending one upload).
            bound = Attachment.objects.filter(
                pk__in=[a.pk for a in attachments], message=None
            ).update(message=message)
            if bound != len(attachments):
                raise ChatError(_("An attached image is missing: upload it again."))
            for attachment in attachments:
                attachment.message = message
        started = _start_reply(conversation, message, created, principal, web_key_hash)
    if created:
        reply = started.reply
        started = replace(
            started,
            messages=[with_attachments(message, attachments), with_attachments(reply, [])],
        )
    return started


def starts_conversation(conversation_id: Any, attachment_ids: Any) -> bool:
    """Whether a send starts a conversation without images (``do_start_conversations``)."""
    return conversation_id in (None, "") and attachment_ids == []


@dataclass(frozen=True)
class NewConversation:
    """A send that starts a conversation, checked; written by ``do_start_conversations``."""

    conversation: Conversation  # not saved yet
    text: str
    principal: Principal
    web_key_hash: str = ""


def check_new_conversation(
    *,
    user_id: int,
    text: Any,
    model: Any = None,
    system_prompt: Any = None,
    temperature: Any = None,
    principal: Principal | None = None,
    catalog_version: str | None = None,
    catalog: ChatCatalog | None = None,
) -> NewConversation:
    """A send that starts a conversation (without images), checked as ``do_send_message`` does.

    Reads nothing when the sender's key is known (``principal``) and the catalog is
    cached at ``catalog_version`` or given (``catalog_in_memory``).
    """
    models, principal, web_key_hash = _chat_access(user_id, principal, catalog_version, catalog)
    if model is not None and not isinstance(model, str):
        raise ChatError(_("The model must be given by its name."))
    text = _check_text(text, required=True)
    conversation = _new_conversation(
        user_id, models, model, system_prompt, temperature, catalog_version, catalog
    )
    _check_model(models=models, name=conversation.model, images=False)
    return NewConversation(conversation, text, principal, web_key_hash)


def _new_conversation(
    user_id: int,
    models: list[CatalogModel],
    model: str | None,
    system_prompt: Any,
    temperature: Any,
    catalog_version: str | None,
    catalog: ChatCatalog | None = None,
) -> Conversation:
    """A new conversation (not saved) with the send's model, else the default, and settings."""
    if isinstance(model, str) and model:
        name = model
    else:
        default = default_chat_model(models, catalog_version, catalog)
        name = default.name if default else ""
    if not name:
        raise ChatError(_("No model is available to you yet: ask an administrator to add one."))
    prompt, checked_temperature = _check_settings(system_prompt, temperature)
    return Conversation(
        owner_id=user_id, model=name, system_prompt=prompt, temperature=checked_temperature
    )


def do_start_conversations(*, starts: list[NewConversation]) -> list[Started]:
    """Write checked new conversations, each with its first turn and its reply (to be generated).

    All in one transaction and, however many, in three inserts and one update: under a
    burst of people starting chats at once (a class, a demo) the sends that queued
    meanwhile are written together (``generation.Gathering``), where each on its own
    took five statements, each a hand-over of the interpreter between the database
    thread and the event loop.  A new conversation locks no row
    another writer holds: nothing here waits.
    """
    if not starts:
        return []
    with _writing(waits=False):
        conversations = [start.conversation for start in starts]
        _insert_rows(Conversation, conversations)
        turns = [
            Message(conversation=conversation, parent=None, role="user", content=start.text)
            for conversation, start in zip(conversations, starts, strict=True)
        ]
        _insert_rows(Message, turns)
        replies = [
            Message(
                conversation=conversation,
                parent=turn,
                role="assistant",
                model=conversation.model,
                status=MessageStatus.STREAMING,
            )
            for conversation, turn in zip(conversations, turns, strict=True)
        ]
        _insert_rows(Message, replies)
        # One statement for all: each new conversation's leaf is its reply.
        meta = Conversation._meta
        quote = connection.ops.quote_name
        columns = {field.name: quote(str(field.column)) for field in meta.concrete_fields}
        pk, leaf, updated = columns["id"], columns["current_leaf"], columns["updated_at"]
        now = timezone.now()
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {quote(meta.db_table)} SET {leaf} = CASE {pk}"
                + " WHEN %s THEN %s" * len(conversations)
                + f" END, {updated} = %s WHERE {pk} IN ({', '.join(['%s'] * len(conversations))})",
                [
                    *(
                        value
                        for conversation, reply in zip(conversations, replies, strict=True)
                        for value in (conversation.pk, reply.pk)
                    ),
                    meta.get_field("updated_at").get_db_prep_save(now, connection),
                    *(conversation.pk for conversation in conversations),
                ],
            )
        for conversation, reply in zip(conversations, replies, strict=True):
            conversation.current_leaf = reply
            conversation.updated_at = now
    # No heartbeat yet: see _start_reply.
    return [
        Started(
            conversation,
            reply,
            True,
            start.principal,
            messages=[with_attachments(turn, []), with_attachments(reply, [])],
            web_key_hash=start.web_key_hash,
        )
        for start, conversation, turn, reply in zip(
            starts, conversations, turns, replies, strict=True
        )
    ]


# Fields whose value of this type the database takes as it is (Django's own preparation
# for it returns it unchanged).
_AS_IS: dict[type[models.Field[Any, Any]], type] = {
    models.CharField: str,
    models.TextField: str,
    models.IntegerField: int,
    models.PositiveIntegerField: int,
    models.BooleanField: bool,
    models.FloatField: float,
    models.ForeignKey: int,
}
# The fields ``_insert_rows`` writes itself: those above, and two its field prepares.
_INSERTED = {*_AS_IS, models.DateTimeField, models.DecimalField}


def _insert_rows(model: type[models.Model], rows: Sequence[models.Model]) -> None:
    """Insert ``rows`` (new instances of ``model``) in one statement; each gets its id.

    What ``bulk_create`` writes, for a burst's trips (``do_start_conversations``): it
    put each value of each row through its field's preparation, most of which return
    it unchanged, and built the statement anew; for 16 new conversations with their
    two messages each, 4.8 ms of CPU on the database thread (the database's own part
    0.3 ms), the event loop's time under a burst.  Here a value the database takes as
    it is (``_AS_IS``) goes as it is; any other (a date, a decimal) is prepared by its
    field, as Django does, once per value.  The dates of ``auto_now`` and
    ``auto_now_add`` fields are one moment for every row, set on each.  A model with
    any other kind of field (or a database default) is left to ``bulk_create``.
    """
    if not rows:
        return
    db = transaction.get_connection()
    meta = model._meta
    fields = [field for field in meta.concrete_fields if not field.primary_key]
    if any(type(field) not in _INSERTED or field.has_db_default() for field in fields):
        model._default_manager.bulk_create(rows)
        return
    now = timezone.now()
    stamped = [
        field.attname
        for field in fields
        if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False)
    ]
    prepared: dict[tuple[models.Field[Any, Any], Any], Any] = {}
    params: list[Any] = []
    for row in rows:
        for attname in stamped:
            setattr(row, attname, now)
        for field in fields:
            value = getattr(row, field.attname)
            if value is not None and _AS_IS.get(type(field)) is not type(value):
                key = (field, value)
                if key not in prepared:
                    prepared[key] = field.get_db_prep_save(value, db)
                value = prepared[key]
            params.append(value)
    quote = db.ops.quote_name
    placeholders = "(" + ", ".join(["%s"] * len(fields)) + ")"
    with db.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(meta.db_table)}"
            f" ({', '.join(quote(field.column) for field in fields)})"
            f" VALUES {', '.join([placeholders] * len(rows))}"
            f" RETURNING {quote(meta.pk.column)}",
            params,
        )
        ids = [row_id for (row_id,) in cursor.fetchall()]
    for row, row_id in zip(rows, ids, strict=True):
        row.pk = row_id
        row._state.adding = False
        row._state.db = db.alias


def do_edit_message(
    *,
    user_id: int,
    message_id: Any,
    text: Any,
    principal: Principal | None = None,
    catalog_version: str | None = None,
) -> Started:
    """A new version of a user turn (a sibling branch), and its reply."""

    models, principal, web_key_hash = _chat_access(user_id, principal, catalog_version)
    pk = check_message_id(user_id=user_id, message_id=message_id)
    with _writing():
        original = Message.objects.select_related("conversation").get(pk=pk)
        if original.role != "user":
            raise ChatError(_("Only your own messages can be edited."))
        conversation = Conversation.objects.select_for_update().get(pk=original.conversation_id)
        _refuse_while_streaming(conversation)
        images = list(original.attachments.all())
        text = _check_text(text, required=not images)
        _check_model(models=models, name=conversation.model, images=bool(images))
        message = Message.objects.create(
            conversation=conversation, parent=original.parent, role="user", content=text
        )
        for image in images:  # the new version keeps the images; the files are shared
            Attachment.objects.create(
                owner=image.owner, message=message, file=image.file.name, media_type=image.media_type,
                width=image.width, height=image.height, size=image.size, original_name=image.original_name,
            )  # fmt: skip
        return _start_reply(conversation, message, False, principal, web_key_hash)


def do_regenerate(
    *,
    user_id: int,
    message_id: Any,
    principal: Principal | None = None,
    catalog_version: str | None = None,
) -> Started:
    """Another version of a reply (a sibling branch)."""

    models, principal, web_key_hash = _chat_access(user_id, principal, catalog_version)
    pk = check_message_id(user_id=user_id, message_id=message_id)
    with _writing():
        original = Message.objects.get(pk=pk)
        if original.role != "assistant":
            raise ChatError(_("Only replies can be regenerated."))
        conversation = Conversation.objects.select_for_update().get(pk=original.conversation_id)
        _refuse_while_streaming(conversation)
        _check_model(models=models, name=conversation.model, images=False)
        return _start_reply(conversation, original.parent, False, principal, web_key_hash)


def do_switch_branch(*, user_id: int, message_id: Any) -> Any:
    """Show ``message``'s version, with that version's own continuation."""

    pk = check_message_id(user_id=user_id, message_id=message_id)
    with _writing():
        message = Message.objects.get(pk=pk)
        # Locked before the leaf is looked for: a send appending to this version
        # meanwhile would otherwise be hidden by the leaf it read before the send.
        conversation = Conversation.objects.select_for_update().get(pk=message.conversation_id)
        conversation.current_leaf = message.latest_leaf()
        conversation.save(update_fields=["current_leaf"])
    return conversation


def do_mark_interrupted(*, message_id: int, text: str, reasoning: str = "") -> Message | None:
    """Save a reply that no live process is writing as interrupted, with the text (and
    reasoning) it had.

    Only a reply still marked streaming changes (a writer that finished meanwhile
    wins); returns the message when it changed.
    """
    changed = Message.objects.filter(pk=message_id, status=MessageStatus.STREAMING).update(
        status=MessageStatus.INTERRUPTED, content=text, reasoning=reasoning
    )
    if not changed:
        return None
    message = Message.objects.get(pk=message_id)
    Conversation.objects.filter(pk=message.conversation_id).update(updated_at=timezone.now())
    return message


def conversation_of_message(*, message_id: int) -> int:
    return int(Message.objects.values_list("conversation_id", flat=True).get(pk=message_id))
