"""Workflows on the model catalog: providers, models and the routes between them.

Every ``do_*`` that changes the catalog writes its audit event (``accounts.audit``)
in the same transaction as the change, so the console, the Django admin and the
management commands are all recorded, and a change never lands without its event.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from accounts import audit
from chatapp.models import CatalogModel, Provider, ProviderType, Route
from chatapp.relay import pipeline
from chatapp.relay.canonical import ChatRequest, Message, TextPart
from chatapp.relay.errors import RelayError, UpstreamError
from chatapp.relay.upstreams import Target

#: What the audit log records of each kind of row.  ``api_key`` is the provider's
#: credential (decrypted by the property): ``audit.SECRET_FIELDS`` masks it.
PROVIDER_FIELDS = (
    "name",
    "type",
    "base_url",
    "model_path",
    "timeout",
    "extra_headers",
    "enabled",
    "api_key",
)
MODEL_FIELDS = (
    "name",
    "display_name",
    "description",
    "context_window",
    "max_output_tokens",
    "supports_chat",
    "supports_vision",
    "supports_tools",
    "supports_embeddings",
    "param_rules",
    "fold_system",
    "enabled",
)
ROUTE_FIELDS = ("model", "provider", "upstream_model", "priority", "weight", "enabled")
#: What ``do_update_*`` may change.
PROVIDER_EDITABLE = frozenset(
    {"name", "type", "base_url", "model_path", "timeout", "extra_headers"}
)
MODEL_EDITABLE = frozenset(MODEL_FIELDS) - {"name", "enabled"}
ROUTE_EDITABLE = frozenset({"provider", "upstream_model", "priority", "weight", "enabled"})

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
        # One transaction: the provider and its audit event land together or not at all.
        with transaction.atomic():
            provider.save()
            audit.record(
                "create",
                provider,
                changes=audit.diff({}, audit.snapshot(provider, PROVIDER_FIELDS)),
            )
    except IntegrityError:
        # Lost a race with a concurrent add of the same name; the unique column caught it.
        raise CatalogError(f"a provider named {name!r} already exists") from None
    return provider


def do_update_provider(
    *, provider: Provider, changes: dict[str, Any], api_key: str | None = None
) -> Provider:
    """Change ``provider``'s fields in ``changes``; a non-blank ``api_key`` replaces the credential.

    A blank or ``None`` ``api_key`` keeps the stored one.  Nothing is saved unless
    every field is valid.  Returns the saved provider.
    """
    unknown = set(changes) - PROVIDER_EDITABLE
    if unknown:
        raise CatalogError(f"cannot change {', '.join(sorted(unknown))} of a provider")
    new_key = (api_key or "").strip()
    try:
        with transaction.atomic():
            # Lock the row so two concurrent edits cannot interleave their before/after.
            locked = Provider.objects.select_for_update().get(pk=provider.pk)
            before = audit.snapshot(locked, PROVIDER_FIELDS)
            for field, value in changes.items():
                setattr(locked, field, value)
            if new_key:
                locked.api_key = new_key
            _full_clean(locked)
            after = audit.snapshot(locked, PROVIDER_FIELDS)
            changed = audit.diff(before, after)
            if new_key:
                # Both sides are masked, so diff() cannot see a replaced credential.
                changed["api_key"] = [before["api_key"], audit.SECRET_SHOWN]
            if changed:
                locked.save()
                audit.record("update", locked, changes=changed)
    except IntegrityError:
        raise CatalogError(f"a provider named {changes.get('name')!r} already exists") from None
    return locked


def do_set_provider_enabled(*, name: str, enabled: bool) -> Provider:
    provider = check_provider(name=name)
    if provider.enabled != enabled:
        with transaction.atomic():
            before = audit.snapshot(provider, ["enabled"])
            provider.enabled = enabled
            # save() rather than a queryset update: the post_save signal refreshes the
            # relay's cached catalog.
            provider.save(update_fields=["enabled", "updated_at"])
            audit.record(
                "enable" if enabled else "disable",
                provider,
                changes=audit.diff(before, audit.snapshot(provider, ["enabled"])),
            )
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
            before = {} if created else audit.snapshot(model, MODEL_FIELDS)
            for field, value in changes.items():
                if value is not None:
                    setattr(model, field, value)
            _full_clean(model)
            model.save()
            model_changes = audit.diff(before, audit.snapshot(model, MODEL_FIELDS))
            if model_changes:
                audit.record("create" if created else "update", model, changes=model_changes)
            route = Route(
                model=model,
                provider=provider,
                upstream_model=upstream_model,
                priority=priority,
                weight=weight,
            )
            _full_clean(route)
            route.save()
            audit.record(
                "create", route, changes=audit.diff({}, audit.snapshot(route, ROUTE_FIELDS))
            )
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
        with transaction.atomic():
            before = audit.snapshot(model, ["enabled"])
            model.enabled = enabled
            # save() so the post_save signal refreshes the relay's cached catalog.
            model.save(update_fields=["enabled", "updated_at"])
            audit.record(
                "enable" if enabled else "disable",
                model,
                changes=audit.diff(before, audit.snapshot(model, ["enabled"])),
            )
    return model


def do_update_model(*, model: CatalogModel, changes: dict[str, Any]) -> CatalogModel:
    """Change the model's description and capabilities in ``changes`` (all valid, or none)."""
    unknown = set(changes) - MODEL_EDITABLE
    if unknown:
        raise CatalogError(f"cannot change {', '.join(sorted(unknown))} of a model")
    with transaction.atomic():
        # Locked so concurrent edits record true before/after pairs.
        locked = CatalogModel.objects.select_for_update().get(pk=model.pk)
        before = audit.snapshot(locked, MODEL_FIELDS)
        for field, value in changes.items():
            setattr(locked, field, value)
        _full_clean(locked)
        changed = audit.diff(before, audit.snapshot(locked, MODEL_FIELDS))
        if changed:
            locked.save()
            audit.record("update", locked, changes=changed)
    return locked


def do_update_route(*, route: Route, changes: dict[str, Any]) -> Route:
    """Change a route's provider, upstream model, priority, weight or enabled flag."""
    unknown = set(changes) - ROUTE_EDITABLE
    if unknown:
        raise CatalogError(f"cannot change {', '.join(sorted(unknown))} of a route")
    try:
        with transaction.atomic():
            locked = (
                Route.objects.select_for_update()
                .select_related("model", "provider")
                .get(pk=route.pk)
            )
            before = audit.snapshot(locked, ROUTE_FIELDS)
            for field, value in changes.items():
                setattr(locked, field, value)
            if isinstance(locked.upstream_model, str):
                locked.upstream_model = locked.upstream_model.strip()
            _full_clean(locked)
            changed = audit.diff(before, audit.snapshot(locked, ROUTE_FIELDS))
            if changed:
                # save() so the post_save signal refreshes the relay's cached catalog.
                locked.save()
                audit.record("update", locked, changes=changed)
    except IntegrityError:
        raise CatalogError(
            f"model {route.model.name!r} already routes to that provider and upstream model"
        ) from None
    return locked


# --- Importing a provider's models ---


def _target(provider: Provider, upstream_model: str, *, timeout: float) -> Target:
    """A pinned target on ``provider`` (no route: tests and model lists)."""
    return Target(
        route_id=0,
        provider=provider.name,
        provider_type=provider.type,
        base_url=provider.base_url.rstrip("/"),
        api_key=provider.api_key,
        upstream_model=upstream_model,
        timeout=min(provider.timeout, timeout),
        extra_headers=dict(provider.extra_headers or {}),
        max_output_tokens=TEST_MAX_TOKENS,
        model_path=provider.model_path,
    )


async def alist_models(*, provider: Provider) -> list[str]:
    """The upstream model ids ``provider`` offers, read from its own list (``/v1/models``)."""
    from chatapp.relay import upstreams

    target = _target(provider, "", timeout=TEST_TIMEOUT)
    try:
        return await upstreams.get(provider.type).list_models(target)
    except UpstreamError as exc:
        raise CatalogError(exc.message) from None
    except LookupError as exc:
        raise CatalogError(str(exc)) from None


def check_importable(*, provider: Provider, upstream_models: Iterable[str]) -> list[str]:
    """Those of ``upstream_models`` not yet in the catalog, in their order.

    In the catalog: a model of that public name, or a route of this provider to that
    upstream model.
    """
    wanted = list(dict.fromkeys(name.strip() for name in upstream_models if name.strip()))
    taken = set(CatalogModel.objects.filter(name__in=wanted).values_list("name", flat=True))
    taken |= set(
        Route.objects.filter(provider=provider, upstream_model__in=wanted).values_list(
            "upstream_model", flat=True
        )
    )
    return [name for name in wanted if name not in taken]


def do_import_models(*, provider: Provider, upstream_models: Iterable[str]) -> list[CatalogModel]:
    """Add each upstream model as a catalog model of the same name routed to ``provider``.

    All or nothing: one that cannot be added (a bad name, one added meanwhile) adds none.
    """
    names = list(dict.fromkeys(name.strip() for name in upstream_models if name.strip()))
    if not names:
        raise CatalogError("choose at least one model to import")
    added = []
    with transaction.atomic():
        for name in names:
            model, _route, _created = do_add_model(
                name=name,
                provider=provider,
                upstream_model=name,
                embeddings=True if "embed" in name.lower() else None,
                chat=False if "embed" in name.lower() else None,
            )
            added.append(model)
    return added


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
    target = _target(provider, upstream_model, timeout=TEST_TIMEOUT)
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
