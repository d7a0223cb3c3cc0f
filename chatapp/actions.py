"""Workflows on the model catalog: providers, models and the routes between them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from chatapp.models import CatalogModel, Provider, ProviderType, Route
from chatapp.relay import http as relay_http
from chatapp.relay.canonical import ChatRequest, Completion, Message, TextPart
from chatapp.relay.errors import UpstreamError
from chatapp.relay.upstreams import Target
from chatapp.relay.upstreams import anthropic as anthropic_upstream
from chatapp.relay.upstreams import openai as openai_upstream

#: A provider test waits at most this long, whatever the provider's own timeout.
TEST_TIMEOUT = 30.0
TEST_PROMPT = "Say OK"
TEST_MAX_TOKENS = 5


class CatalogError(Exception):
    """A catalog change or check that cannot be carried out; the message says why."""


def _describe(exc: ValidationError) -> str:
    """A ``ValidationError`` as one line that names the offending fields."""
    if not hasattr(exc, "error_dict"):
        return " ".join(exc.messages)
    parts = []
    for field, messages in exc.message_dict.items():
        text = " ".join(messages)
        parts.append(text if field == "__all__" else f"{field}: {text}")
    return "; ".join(parts)


def _full_clean(instance: Provider | CatalogModel | Route) -> None:
    try:
        instance.full_clean()
    except ValidationError as exc:
        raise CatalogError(_describe(exc)) from None


# --- Providers ---


def check_provider(*, name: str) -> Provider:
    """The provider called ``name``."""
    try:
        return Provider.objects.get(name=name)
    except Provider.DoesNotExist:
        raise CatalogError(f"no provider named {name!r}") from None


def do_add_provider(
    *,
    name: str,
    type: str,
    base_url: str,
    api_key: str = "",
    timeout: float = 600.0,
    extra_headers: dict[str, str] | None = None,
    enabled: bool = True,
    model_path: str = "",
) -> Provider:
    if type not in ProviderType.values:
        raise CatalogError(f"type {type!r} is not one of {', '.join(ProviderType.values)}")
    if Provider.objects.filter(name=name).exists():
        raise CatalogError(f"a provider named {name!r} already exists")
    provider = Provider(
        name=name,
        type=type,
        base_url=base_url,
        timeout=timeout,
        extra_headers=extra_headers or {},
        enabled=enabled,
        model_path=model_path,
    )
    provider.api_key = api_key.strip()
    _full_clean(provider)
    try:
        provider.save()
    except IntegrityError:
        # Lost a race with a concurrent add of the same name; the unique column caught it.
        raise CatalogError(f"a provider named {name!r} already exists") from None
    return provider


def do_set_provider_enabled(*, name: str, enabled: bool) -> Provider:
    provider = check_provider(name=name)
    if provider.enabled != enabled:
        provider.enabled = enabled
        # save() rather than a queryset update: the post_save signal refreshes the
        # relay's cached catalog.
        provider.save(update_fields=["enabled", "updated_at"])
    return provider


# --- Models and routes ---


def check_model(*, name: str) -> CatalogModel:
    """The catalog model clients call ``name``."""
    try:
        return CatalogModel.objects.get(name=name)
    except CatalogModel.DoesNotExist:
        raise CatalogError(f"no model named {name!r}") from None


def check_model_names(*, names: Iterable[str]) -> list[str]:
    """``names`` cleaned and de-duplicated; an error naming any that are not in the catalog."""
    wanted = sorted({name.strip() for name in names if name.strip()})
    known = set(CatalogModel.objects.filter(name__in=wanted).values_list("name", flat=True))
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise CatalogError(f"unknown model{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    return wanted


def do_add_model(
    *,
    name: str,
    provider: Provider,
    upstream_model: str,
    display_name: str | None = None,
    description: str | None = None,
    context_window: int | None = None,
    max_output_tokens: int | None = None,
    chat: bool | None = None,
    vision: bool | None = None,
    tools: bool | None = None,
    embeddings: bool | None = None,
    priority: int = 0,
    weight: int = 1,
) -> tuple[CatalogModel, Route, bool]:
    """Route ``name`` to ``provider``/``upstream_model``, creating the model on first use.

    Returns the model, the new route, and whether the model was created.  Fields left
    as ``None`` keep their current (or default) values; given ones update the model.
    """
    upstream_model = upstream_model.strip()
    changes = {
        "display_name": display_name,
        "description": description,
        "context_window": context_window,
        "max_output_tokens": max_output_tokens,
        "supports_chat": chat,
        "supports_vision": vision,
        "supports_tools": tools,
        "supports_embeddings": embeddings,
    }
    # One transaction: a model is never left without the route it was added for.
    try:
        with transaction.atomic():
            model = CatalogModel.objects.filter(name=name).first()
            created = model is None
            if model is None:
                model = CatalogModel(name=name)
            elif Route.objects.filter(
                model=model, provider=provider, upstream_model=upstream_model
            ).exists():
                raise CatalogError(
                    f"model {name!r} already routes to {provider.name}/{upstream_model}"
                )
            for field, value in changes.items():
                if value is not None:
                    setattr(model, field, value)
            _full_clean(model)
            model.save()
            route = Route(
                model=model,
                provider=provider,
                upstream_model=upstream_model,
                priority=priority,
                weight=weight,
            )
            _full_clean(route)
            route.save()
    except IntegrityError:
        # A concurrent add of the same model or route won; the unique constraints caught it.
        raise CatalogError(
            f"model {name!r} or its route to {provider.name}/{upstream_model} was added "
            "at the same time by someone else; try again"
        ) from None
    return model, route, created


def do_set_model_enabled(*, name: str, enabled: bool) -> CatalogModel:
    model = check_model(name=name)
    if model.enabled != enabled:
        model.enabled = enabled
        # save() so the post_save signal refreshes the relay's cached catalog.
        model.save(update_fields=["enabled", "updated_at"])
    return model


# --- Checking a provider end to end ---


async def atest_provider(
    *, provider: Provider, upstream_model: str | None = None
) -> tuple[float, str]:
    """Send a tiny real chat request to ``provider``; returns (latency in seconds, reply text).

    The upstream model is ``upstream_model`` or that of the provider's first enabled
    route.  Any failure raises ``CatalogError`` with the status and the upstream's reason.
    """
    if not upstream_model:
        route = (
            await Route.objects.filter(provider=provider, enabled=True)
            .order_by("priority", "-weight", "id")
            .afirst()
        )
        if route is None:
            raise CatalogError(
                f"provider {provider.name} has no enabled route to take a model from; "
                "name an upstream model to test with"
            )
        upstream_model = route.upstream_model
    timeout = min(provider.timeout, TEST_TIMEOUT)
    target = Target(
        route_id=0,
        provider=provider.name,
        provider_type=provider.type,
        base_url=provider.base_url.rstrip("/"),
        api_key=provider.api_key,
        upstream_model=upstream_model,
        timeout=timeout,
        extra_headers=dict(provider.extra_headers or {}),
        max_output_tokens=TEST_MAX_TOKENS,
    )
    request = ChatRequest(
        model=upstream_model,
        messages=[Message("user", [TextPart(TEST_PROMPT)])],
        max_tokens=TEST_MAX_TOKENS,
    )
    adapter = anthropic_upstream if provider.type == ProviderType.ANTHROPIC else openai_upstream
    call = adapter.build_chat(target, request)
    started = time.perf_counter()
    try:
        response = await relay_http.client().post(
            call.url, headers=call.headers, json=call.body, timeout=timeout
        )
    except httpx.HTTPError as exc:
        if relay_http.is_timeout(exc):
            raise CatalogError(
                f"{provider.name}: no answer from {call.url} within {timeout:g}s"
            ) from None
        raise CatalogError(
            f"{provider.name}: cannot reach {call.url} ({type(exc.__cause__ or exc).__name__}: {exc})"
        ) from None
    latency = time.perf_counter() - started
    if response.status_code >= 400:
        # error_message reads both OpenAI and Anthropic error bodies.
        reason = openai_upstream.error_message(response.text).strip() or response.reason_phrase
        raise CatalogError(
            f"{provider.name} answered {response.status_code} for {upstream_model}: "
            + " ".join(reason.split())
        )
    try:
        body = response.json()
    except ValueError:
        raise CatalogError(
            f"{provider.name} answered {response.status_code} with a body that is not JSON"
        ) from None
    if not isinstance(body, dict):
        raise CatalogError(f"{provider.name} answered with an unexpected body")
    try:
        completion: Completion = adapter.parse_completion(body)
    except UpstreamError as exc:
        raise CatalogError(f"{provider.name}: {exc.message}") from None
    reply = completion.choices[0].text if completion.choices else ""
    return latency, reply


LOCAL_MODEL_NAME = "smollm2-135m"


def do_register_local_model() -> CatalogModel | None:
    """The zero-configuration local model, when the ``local`` extra is installed.

    Idempotent: registers the ``local`` provider and ``smollm2-135m`` (price 0) only
    if no provider named ``local`` exists yet, so an admin who disabled or
    re-pointed it keeps their choice.  Returns the model when it was added now.
    """
    from chatapp.relay.upstreams import local
    from keys.actions import do_set_price

    if not local.available() or local.default_model_path() is None:
        return None
    if Provider.objects.filter(name="local").exists():
        return None
    with transaction.atomic():
        provider = do_add_provider(
            name="local", type=ProviderType.LOCAL, base_url="", timeout=300.0
        )
        model, _route, _created = do_add_model(
            name=LOCAL_MODEL_NAME,
            provider=provider,
            upstream_model="local",
            display_name="SmolLM2 135M (local)",
            description="A small instruction-tuned model running on this machine through llama.cpp: "
            "works offline, answers quickly, knows little.",
            context_window=settings.SWITCHBOARD_LOCAL_CONTEXT,
            max_output_tokens=min(2048, settings.SWITCHBOARD_LOCAL_CONTEXT // 2),
        )
        do_set_price(model=model, input_price=Decimal(0), output_price=Decimal(0))
    return model


# --- The browser chat ---

MAX_MESSAGE_CHARS = 100_000
MAX_ATTACHMENTS = 8


class ChatError(Exception):
    """A chat request refused before anything was saved; the message is for the user."""


def check_active(*, user_id: int) -> bool:
    from accounts.models import User

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
    from chatapp.models import Conversation

    pk = _int(conversation_id, "conversation")
    if not Conversation.objects.filter(pk=pk, owner_id=user_id).exists():
        raise ChatError("No such conversation.")  # also when it is somebody else's
    return pk


def check_message_id(*, user_id: int, message_id: Any) -> int:
    from chatapp.models import Message

    pk = _int(message_id, "message")
    if not Message.objects.filter(pk=pk, conversation__owner_id=user_id).exists():
        raise ChatError("No such message.")
    return pk


def streaming_message_ids(*, conversation_id: int) -> list[int]:
    from chatapp.models import Message, MessageStatus

    return list(
        Message.objects.filter(
            conversation_id=conversation_id, status=MessageStatus.STREAMING
        ).values_list("pk", flat=True)
    )


@dataclass(frozen=True)
class Started:
    conversation_id: int
    reply_id: int
    created: bool
    html: str


def _check_text(text: Any, *, required: bool) -> str:
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ChatError("The message must be text.")
    text = text.strip()
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
    from chatapp.models import Message, MessageStatus
    from chatapp.views import render_branch

    reply = Message.objects.create(
        conversation=conversation,
        parent=parent,
        role="assistant",
        model=conversation.model,
        status=MessageStatus.STREAMING,
    )
    conversation.current_leaf = reply
    conversation.save(update_fields=["current_leaf", "updated_at"])
    return Started(conversation.pk, reply.pk, created, render_branch(conversation))


def _refuse_while_streaming(conversation: Any) -> None:
    from chatapp.models import MessageStatus

    if conversation.messages.filter(status=MessageStatus.STREAMING).exists():
        raise ChatError("A reply is still being written: wait for it or stop it first.")


def do_send_message(
    *, user_id: int, conversation_id: Any, text: Any, attachment_ids: Any, model: Any = None
) -> Started:
    """A user turn at the end of the displayed branch, and its reply (to be generated)."""
    from accounts.models import User
    from chatapp.models import Attachment, Conversation, Message

    user = User.objects.get(pk=user_id)
    if not isinstance(attachment_ids, list) or len(attachment_ids) > MAX_ATTACHMENTS:
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
    from chatapp.models import Attachment, Conversation, Message

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
    from chatapp.models import Conversation, Message

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
    from chatapp.models import Conversation, Message

    pk = check_message_id(user_id=user_id, message_id=message_id)
    message = Message.objects.get(pk=pk)
    conversation = Conversation.objects.get(pk=message.conversation_id)
    conversation.current_leaf = message.latest_leaf()
    conversation.save(update_fields=["current_leaf"])
    return conversation
