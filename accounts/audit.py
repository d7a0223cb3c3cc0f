"""The audit log: who changed what, from where, before → after.

Actions that change what admins manage (users, keys, limits, providers, models,
routes, prices) call ``record`` once their change is saved.  Who is acting comes
from the context, not from arguments threaded through every action:

- a console view runs inside ``acting_for(request)`` (``accounts.roles.console_page``);
- a Django admin request likewise (``AuditMiddleware``);
- anything else — a management command, a shell — is the command line.

Secrets never reach the log: fields named in ``SECRET_FIELDS`` are recorded only
as "set" / "changed".
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.db import models
from django.http import HttpRequest, HttpResponseBase

from accounts.models import AuditEvent, AuditSource, User

SECRET_FIELDS = frozenset(
    {"password", "key_hash", "secret", "api_key", "credential", "credentials", "token"}
)
SECRET_SHOWN = "••••••"


@dataclass(frozen=True)
class Actor:
    user: User | None
    source: str
    address: str = ""

    @property
    def label(self) -> str:
        if self.user is not None:
            return self.user.email
        return "command line" if self.source == AuditSource.COMMAND else self.source


COMMAND_LINE = Actor(None, AuditSource.COMMAND)
_acting: ContextVar[Actor | None] = ContextVar("switchboard_audit_actor", default=None)


def current() -> Actor:
    return _acting.get() or COMMAND_LINE


@contextlib.contextmanager
def acting(actor: Actor) -> Iterator[Actor]:
    token = _acting.set(actor)
    try:
        yield actor
    finally:
        _acting.reset(token)


def actor_for(request: HttpRequest, user: Any = None) -> Actor:
    from django.urls import reverse

    from accounts.throttle import client_address

    if user is None:
        user = getattr(request, "user", None)
    admin_prefix = reverse("admin:index")
    source = AuditSource.ADMIN if request.path.startswith(admin_prefix) else AuditSource.CONSOLE
    return Actor(
        user if isinstance(user, User) else None,
        source,
        client_address(request),
    )


@contextlib.contextmanager
def acting_for(request: HttpRequest, user: Any = None) -> Iterator[Actor]:
    with acting(actor_for(request, user)) as actor:
        yield actor


def _plain(value: Any) -> Any:
    """A JSON-safe, readable form of a field value."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, models.Model):
        return str(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)


def snapshot(obj: models.Model, fields: Iterable[str]) -> dict[str, Any]:
    """The values of ``fields`` of ``obj``, secrets masked (``"" `` when unset)."""
    values: dict[str, Any] = {}
    for name in fields:
        value = getattr(obj, name)
        if hasattr(value, "all") and callable(value.all):  # a many-to-many manager
            value = sorted(str(item) for item in value.all())
        if name in SECRET_FIELDS:
            value = SECRET_SHOWN if value else ""
        values[name] = _plain(value)
    return values


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """``{field: [before, after]}`` for each field whose value changed."""
    changes: dict[str, list[Any]] = {}
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old != new:
            changes[name] = [old, new]
    return changes


def record(
    action: str,
    obj: models.Model,
    *,
    changes: dict[str, list[Any]] | None = None,
    object_type: str | None = None,
    actor: Actor | None = None,
) -> AuditEvent:
    """Append one event: ``actor`` (default: who is acting now) did ``action`` to ``obj``."""
    actor = actor or current()
    return AuditEvent.objects.create(
        actor=actor.user,
        actor_label=actor.label[:254],
        source=actor.source,
        action=action[:32],
        object_type=(object_type or obj._meta.model_name or "")[:64],
        object_id=str(obj.pk or "")[:64],
        object_repr=str(obj)[:200],
        changes={
            name: [_mask(name, old), _mask(name, new)]
            for name, (old, new) in (changes or {}).items()
        },
        address=actor.address[:64],
    )


def object_type_label(object_type: str) -> str:
    """What people call an object type ("API key", not "apikey"): its model's verbose name."""
    from django.apps import apps

    for model in apps.get_models():
        if model._meta.model_name == object_type:
            return str(model._meta.verbose_name)
    return object_type


def _mask(name: str, value: Any) -> Any:
    if name in SECRET_FIELDS and value not in ("", None, SECRET_SHOWN):
        return SECRET_SHOWN
    return _plain(value)


def AuditMiddleware(  # noqa: N802 - Django's middleware factory convention
    get_response: Callable[[HttpRequest], Any],
) -> Callable[[HttpRequest], Any]:
    """Every Django request acts as its signed-in user (the Django admin included)."""
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            user = await request.auser()
            with acting_for(request, user):
                return await get_response(request)

        markcoroutinefunction(async_middleware)
        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        with acting_for(request):
            response: HttpResponseBase = get_response(request)
            return response

    return middleware


AuditMiddleware.sync_capable = True  # type: ignore[attr-defined]
AuditMiddleware.async_capable = True  # type: ignore[attr-defined]


def _admin_fields(obj: models.Model) -> list[str]:
    """The fields an admin form can change: concrete, non-key fields of the model."""
    return [
        field.name
        for field in obj._meta.concrete_fields
        if not field.primary_key and not field.auto_created
    ]


class AuditedModelAdmin:
    """A ``ModelAdmin`` mixin: each add, change and delete in the Django admin is audited.

    Put it first among the bases (``class KeyAdmin(AuditedModelAdmin, admin.ModelAdmin)``).
    The admin's view already runs in a transaction, so the event commits with the
    change.  ``audit_fields`` names the recorded fields (default: every concrete field;
    secrets masked by name as everywhere else).
    """

    audit_fields: tuple[str, ...] | None = None

    def _audited_fields(self, obj: models.Model) -> list[str]:
        return list(self.audit_fields) if self.audit_fields is not None else _admin_fields(obj)

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        fields = self._audited_fields(obj)
        before: dict[str, Any] = {}
        if change and obj.pk is not None:
            stored = type(obj)._default_manager.filter(pk=obj.pk).first()
            if stored is not None:
                before = snapshot(stored, fields)
        super().save_model(request, obj, form, change)  # type: ignore[misc]
        changes = diff(before, snapshot(obj, fields))
        if change and not changes:
            return
        with acting_for(request):
            record("change" if change else "create", obj, changes=changes)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        before = snapshot(obj, self._audited_fields(obj))
        pk = obj.pk
        super().delete_model(request, obj)  # type: ignore[misc]
        obj.pk = pk  # Django clears it on delete; the event names the row that was
        with acting_for(request):
            record("delete", obj, changes=diff(before, {}))

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        for obj in list(queryset):
            self.delete_model(request, obj)
