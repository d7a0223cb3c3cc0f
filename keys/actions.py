"""Workflows on API keys."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import User
from chatapp.models import CatalogModel
from keys.forms import LIMIT_FIELDS, KeyCreateForm, LimitsForm, PriceForm, describe
from keys.models import ApiKey, ModelPrice


class KeyActionError(Exception):
    """A key operation that cannot be carried out; the message says why."""


def do_create_key(
    *,
    user: User,
    name: str = "",
    models: list[str] | None = None,
    expires_at: datetime | None = None,
    is_web_key: bool = False,
) -> tuple[ApiKey, str]:
    """Issue a key; returns it with the full secret, which is shown once and never stored.

    Checked by ``keys.forms.KeyCreateForm`` (an active owner, an expiry in the
    future, known models), as the admin and the console check it.
    """
    form = KeyCreateForm(
        data={
            "user": user.pk,
            "name": name,
            "expires_at": expires_at,
            "allowed_models": sorted(set(models or [])),
        }
    )
    if not form.is_valid():
        raise KeyActionError(describe(form.errors))
    defaults = {field: value or None for field, value in settings.SWITCHBOARD_KEY_DEFAULTS.items()}
    return ApiKey.issue(
        user=user,
        name=name,
        allowed_models=sorted(set(models or [])),
        expires_at=expires_at,
        is_web_key=is_web_key,
        **defaults,
    )


def do_revoke_key(*, key: ApiKey) -> ApiKey:
    # Lock the row so a concurrent edit (admin form, another revoke) cannot write the
    # old state back over the revocation.
    with transaction.atomic():
        locked = ApiKey.objects.select_for_update().get(pk=key.pk)
        if locked.revoked_at is None:
            locked.revoked_at = timezone.now()
            locked.enabled = False
            locked.save(update_fields=["revoked_at", "enabled"])
    return locked


INTEGER_LIMITS = ("rpm", "rpd", "tpm", "tpd", "concurrency", "token_budget", "max_output_tokens")


def do_set_limits(*, key: ApiKey, **changes: Any) -> ApiKey:
    """Change a key's limits; ``None`` (or 0) clears one.

    Accepted: rpm, rpd, tpm, tpd, concurrency, token_budget, max_output_tokens
    (integers), money_budget (Decimal), budget_period, clamp_max_tokens — checked
    by ``keys.forms.LimitsForm``, the rules the admin and the console apply too.
    """
    unknown = sorted(set(changes) - set(LIMIT_FIELDS))
    if unknown:
        raise KeyActionError(f"unknown limit {unknown[0]!r}")
    for name, value in changes.items():
        if (
            name in INTEGER_LIMITS
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int) or value < 0)
        ):
            raise KeyActionError(f"{name}: expected a whole number of at least 0, got {value!r}")
    data = {name: getattr(key, name) for name in LIMIT_FIELDS}
    data.update(changes)
    form = LimitsForm(data=data, instance=key)
    if not form.is_valid():
        raise KeyActionError(describe(form.errors))
    # Only the fields given change: a concurrent edit of another limit is kept.
    for name in changes:
        setattr(key, name, form.cleaned_data[name])
    key.save(update_fields=[*changes])  # the save invalidates the cached principal
    return key


def do_set_price(
    *,
    model: CatalogModel,
    input_price: Decimal,
    output_price: Decimal,
    cached_input_price: Decimal | None = None,
    effective_from: datetime | None = None,
) -> ModelPrice:
    """Add a price from ``effective_from`` (default now); earlier prices stay as history."""
    for name, value in (
        ("input", input_price),
        ("output", output_price),
        ("cached-input", cached_input_price),
    ):
        if value is not None and not value.is_finite():
            raise KeyActionError(f"--{name}: expected a price of at least 0, got {value}")
        if value is not None and value.as_tuple().exponent < -12:  # type: ignore[operator]
            raise KeyActionError(f"--{name}: at most 12 decimal places, got {value}")
    form = PriceForm(
        data={
            "model": model.pk,
            "input_per_mtok": input_price,
            "output_per_mtok": output_price,
            "cached_input_per_mtok": cached_input_price,
            "effective_from": effective_from or timezone.now(),
        }
    )
    if not form.is_valid():
        flags = {
            "input_per_mtok": "--input",
            "output_per_mtok": "--output",
            "cached_input_per_mtok": "--cached-input",
        }
        errors = {flags.get(name, name): messages for name, messages in form.errors.items()}
        raise KeyActionError(describe(errors))
    return form.save()


def do_get_web_key(*, user: User) -> ApiKey:
    """The user's browser-chat key, created (with the default limits) on first use.

    Browser chat is metered like the API: this key's limits and budgets apply.
    """
    existing = ApiKey.objects.filter(user=user, is_web_key=True).first()
    if existing is not None:
        return existing
    try:
        # The partial unique constraint keeps one web key per user when two tabs race.
        with transaction.atomic():
            key, _raw = do_create_key(user=user, name="Browser chat", is_web_key=True)
            return key
    except IntegrityError:
        return ApiKey.objects.get(user=user, is_web_key=True)
