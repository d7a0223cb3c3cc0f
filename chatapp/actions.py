"""Workflows on the model catalog: providers, models and the routes between them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from chatapp.models import CatalogModel, Provider, ProviderType, Route
from chatapp.relay import pipeline
from chatapp.relay.canonical import ChatRequest, Message, TextPart
from chatapp.relay.errors import RelayError, UpstreamError
from chatapp.relay.upstreams import Target

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
    target = Target(
        route_id=0,
        provider=provider.name,
        provider_type=provider.type,
        base_url=provider.base_url.rstrip("/"),
        api_key=provider.api_key,
        upstream_model=upstream_model,
        timeout=min(provider.timeout, TEST_TIMEOUT),
        extra_headers=dict(provider.extra_headers or {}),
        max_output_tokens=TEST_MAX_TOKENS,
        model_path=provider.model_path,
    )
    call = pipeline.Call(
        principal=None,
        endpoint="provider_test",
        dialect="openai",
        model=upstream_model,
        request=ChatRequest(
            model=upstream_model,
            messages=[Message("user", [TextPart(TEST_PROMPT)])],
            max_tokens=TEST_MAX_TOKENS,
        ),
    )
    started = time.perf_counter()
    try:
        reply = await pipeline.complete(call, targets=[target], max_attempts=1)
    except RelayError as exc:
        # The upstream's own words (status, reason, address) rather than the client's summary.
        cause = exc.__cause__
        raise CatalogError(
            cause.message if isinstance(cause, UpstreamError) else exc.message
        ) from None
    latency = time.perf_counter() - started
    choices = reply.completion.choices
    return latency, choices[0].text if choices else ""


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
