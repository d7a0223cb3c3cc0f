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
from keys.limiter import MAX_MONEY_BUDGET
from keys.models import ApiKey, BudgetPeriod, ModelPrice


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
    """Issue a key; returns it with the full secret, which is shown once and never stored."""
    if expires_at is not None and expires_at <= timezone.now():
        raise KeyActionError(f"expiry {expires_at.isoformat()} is in the past")
    if not user.is_active:
        raise KeyActionError(f"user {user.email} is disabled")
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


LIMIT_FIELDS = ("rpm", "rpd", "tpm", "tpd", "concurrency", "token_budget", "max_output_tokens")


def do_set_limits(*, key: ApiKey, **changes: Any) -> ApiKey:
    """Change a key's limits; ``None`` (or 0) clears one.

    Accepted: rpm, rpd, tpm, tpd, concurrency, token_budget, max_output_tokens
    (integers), money_budget (Decimal), budget_period, clamp_max_tokens.
    """
    updates: dict[str, Any] = {}
    for name, value in changes.items():
        if name in LIMIT_FIELDS:
            if value is not None and (not isinstance(value, int) or value < 0):
                raise KeyActionError(
                    f"{name}: expected a whole number of at least 0, got {value!r}"
                )
            updates[name] = value or None
        elif name == "money_budget":
            if value is not None and (
                not isinstance(value, Decimal) or not value.is_finite() or value < 0
            ):
                raise KeyActionError(
                    f"money_budget: expected an amount of at least 0, got {value!r}"
                )
            if value is not None and value > MAX_MONEY_BUDGET:
                raise KeyActionError(
                    f"money_budget: at most {MAX_MONEY_BUDGET} {settings.SWITCHBOARD_CURRENCY}"
                )
            updates[name] = value or None
        elif name == "budget_period":
            if value not in BudgetPeriod.values:
                raise KeyActionError(
                    f"budget_period: expected one of {', '.join(BudgetPeriod.values)}"
                )
            updates[name] = value
        elif name == "clamp_max_tokens":
            updates[name] = bool(value)
        else:
            raise KeyActionError(f"unknown limit {name!r}")
    for name, value in updates.items():
        setattr(key, name, value)
    key.save(update_fields=[*updates])  # the save invalidates the cached principal
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
        if value is not None and (not value.is_finite() or value < 0):
            raise KeyActionError(f"--{name}: expected a price of at least 0, got {value}")
        if value is not None and value.as_tuple().exponent < -12:  # type: ignore[operator]
            raise KeyActionError(f"--{name}: at most 12 decimal places, got {value}")
    return ModelPrice.objects.create(
        model=model,
        input_per_mtok=input_price,
        output_per_mtok=output_price,
        cached_input_per_mtok=cached_input_price,
        currency=settings.SWITCHBOARD_CURRENCY,
        effective_from=effective_from or timezone.now(),
    )


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
