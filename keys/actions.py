"""Workflows on API keys, key policies and prices.

Each ``do_*`` that changes what admins manage records it in the audit log
(``accounts.audit.record``) inside the same transaction as the change, so the
console, the Django admin and the ``manage.py key``/``price`` commands are all
covered; who acted comes from the context.  A key's secret and its hash are never
recorded.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from accounts import audit
from accounts.models import User
from chatapp.models import CatalogModel, Route
from keys.forms import (
    LIMIT_FIELDS,
    AlertThresholdsForm,
    KeyForm,
    KeyIssueForm,
    KeyPolicyForm,
    LimitsForm,
    PriceForm,
    RoutePriceForm,
    describe,
)
from keys.models import AlertThresholds, ApiKey, KeyPolicy, ModelPrice, RoutePrice

# What the audit log keeps of a key (never key_hash: SECRET_FIELDS masks it anyway).
KEY_AUDIT_FIELDS = [
    "user",
    "name",
    "enabled",
    "expires_at",
    "allowed_models",
    *LIMIT_FIELDS,
    "revoked_at",
    "replaced_by_id",
]
PRICE_AUDIT_FIELDS = [
    "model",
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "currency",
    "effective_from",
]
POLICY_AUDIT_FIELDS = ["user", "max_keys", *KeyPolicy.CAPPED]
ROUTE_PRICE_AUDIT_FIELDS = ["route", *PRICE_AUDIT_FIELDS[1:]]
THRESHOLD_AUDIT_FIELDS = ["key", "user", "percents"]


class KeyActionError(Exception):
    """A key operation that cannot be carried out; the message says why."""


def _default_limits() -> dict[str, Any]:
    return {field: value or None for field, value in settings.SWITCHBOARD_KEY_DEFAULTS.items()}


def do_create_key(
    *,
    user: User,
    name: str = "",
    models: list[str] | None = None,
    expires_at: datetime | None = None,
    is_web_key: bool = False,
    limits: dict[str, Any] | None = None,
) -> tuple[ApiKey, str]:
    """Issue a key; returns it with the full secret, which is shown once and never stored.

    ``limits`` (the fields of ``LIMIT_FIELDS``) override the defaults
    (``SWITCHBOARD_KEY_DEFAULTS``).  Checked by ``keys.forms.KeyIssueForm`` (an
    active owner, an expiry in the future, known models, valid limits), as the
    admin and the console check it.
    """
    unknown = sorted(set(limits or {}) - set(LIMIT_FIELDS))
    if unknown:
        raise KeyActionError(f"unknown limit {unknown[0]!r}")
    values: dict[str, Any] = {"budget_period": ApiKey._meta.get_field("budget_period").default}
    values.update(clamp_max_tokens=False, **_default_limits())
    values.update(limits or {})
    form = KeyIssueForm(
        data={
            "user": user.pk,
            "name": name,
            "expires_at": expires_at,
            "allowed_models": sorted(set(models or [])),
            **{field: "" if value is None else value for field, value in values.items()},
        }
    )
    if not form.is_valid():
        raise KeyActionError(describe(form.errors))
    with transaction.atomic():
        key, raw = ApiKey.issue(
            user=user,
            name=name,
            allowed_models=form.cleaned_data["allowed_models"],
            expires_at=expires_at,
            is_web_key=is_web_key,
            **{field: form.cleaned_data[field] for field in LIMIT_FIELDS},
        )
        if not is_web_key:  # the chat's own key is made on first use, by no one's decision
            audit.record(
                "create", key, changes=audit.diff({}, audit.snapshot(key, KEY_AUDIT_FIELDS))
            )
    return key, raw


def check_may_revoke(*, key: ApiKey) -> None:
    """The chat's own key is not revoked from the console: the chat would stop for good."""
    if key.is_web_key:
        raise KeyActionError(
            _(
                "This is the browser chat's own key: it cannot be revoked. "
                "Disable the user to stop their chat, or lower the key's limits."
            )
        )


def do_revoke_key(*, key: ApiKey) -> ApiKey:
    # Lock the row so a concurrent edit (admin form, another revoke) cannot write the
    # old state back over the revocation.  The save invalidates the cached principal
    # (keys.auth), so the very next request with this key is refused in every process.
    with transaction.atomic():
        locked = ApiKey.objects.select_for_update().get(pk=key.pk)
        if locked.revoked_at is None:
            before = audit.snapshot(locked, KEY_AUDIT_FIELDS)
            locked.revoked_at = timezone.now()
            locked.enabled = False
            locked.save(update_fields=["revoked_at", "enabled"])
            audit.record(
                "revoke",
                locked,
                changes=audit.diff(before, audit.snapshot(locked, KEY_AUDIT_FIELDS)),
            )
    return locked


def do_rotate_key(*, key: ApiKey, grace: timedelta | None = None) -> tuple[ApiKey, str]:
    """A new secret with the same settings; the old key revoked now, or after ``grace``.

    With a grace period the old key keeps working until now + grace (its expiry is
    brought forward, never pushed back) and is marked as replaced by the new one.
    """
    with transaction.atomic():
        # Lock the old key: two rotations at once must not both issue a successor.
        old = ApiKey.objects.select_for_update().get(pk=key.pk)
        check_may_revoke(key=old)
        if old.revoked_at is not None:
            raise KeyActionError(_("This key is revoked: it cannot be rotated."))
        if old.replaced_by_id is not None:
            raise KeyActionError(_("This key was already rotated."))
        if old.expires_at is not None and old.expires_at <= timezone.now():
            raise KeyActionError(
                _("This key has expired: give it a new expiry first, or create a new key.")
            )
        new, raw = do_create_key(
            user=old.user,
            name=old.name,
            models=list(old.allowed_models or []),
            expires_at=old.expires_at,
            limits={field: getattr(old, field) for field in LIMIT_FIELDS},
        )
        before = audit.snapshot(old, KEY_AUDIT_FIELDS)
        old.replaced_by = new
        if grace:
            until = timezone.now() + grace
            if old.expires_at is None or until < old.expires_at:
                old.expires_at = until
            old.save(update_fields=["replaced_by", "expires_at"])
        else:
            old.revoked_at = timezone.now()
            old.enabled = False
            old.save(update_fields=["replaced_by", "revoked_at", "enabled"])
        audit.record(
            "rotate", old, changes=audit.diff(before, audit.snapshot(old, KEY_AUDIT_FIELDS))
        )
    return new, raw


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
    before = audit.snapshot(key, KEY_AUDIT_FIELDS)  # before the form writes onto ``key``
    data = {name: getattr(key, name) for name in LIMIT_FIELDS}
    data.update(changes)
    form = LimitsForm(data=data, instance=key)
    if not form.is_valid():
        raise KeyActionError(describe(form.errors))
    with transaction.atomic():
        # Only the fields given change: a concurrent edit of another limit is kept.
        for name in changes:
            setattr(key, name, form.cleaned_data[name])
        key.save(update_fields=[*changes])  # the save invalidates the cached principal
        changed = audit.diff(before, audit.snapshot(key, KEY_AUDIT_FIELDS))
        if changed:
            audit.record("update", key, changes=changed)
    return key


EDITABLE_FIELDS = ["name", "enabled", "expires_at", "allowed_models", *LIMIT_FIELDS]


def do_edit_key(*, key: ApiKey, **changes: Any) -> ApiKey:
    """Change a key's name, expiry, allowed models, limits and budgets (``keys.forms.KeyForm``).

    Only the fields given change.  Refused as a whole (nothing saved) when any is invalid.
    """
    unknown = sorted(set(changes) - set(EDITABLE_FIELDS))
    if unknown:
        raise KeyActionError(f"unknown field {unknown[0]!r}")
    data: dict[str, Any] = {name: getattr(key, name) for name in EDITABLE_FIELDS}
    data.update(changes)
    initial = {name: getattr(key, name) for name in EDITABLE_FIELDS}
    form_data = {name: "" if value is None else value for name, value in data.items()}
    # A detached instance: validating must not write onto ``key`` before the lock.
    form = KeyForm(data=form_data, instance=ApiKey(pk=key.pk), initial=initial)
    if not form.is_valid():
        raise KeyActionError(describe(form.errors))
    with transaction.atomic():
        # Lock the row: a revocation committed meanwhile must not be undone by this save.
        locked = ApiKey.objects.select_for_update().get(pk=key.pk)
        if locked.revoked_at is not None and form.cleaned_data.get("enabled"):
            form.cleaned_data["enabled"] = False
        before = audit.snapshot(locked, KEY_AUDIT_FIELDS)
        for name in changes:
            setattr(locked, name, form.cleaned_data[name])
        if changes:
            locked.save(update_fields=[*changes])  # invalidates the cached principal
        changed = audit.diff(before, audit.snapshot(locked, KEY_AUDIT_FIELDS))
        if changed:
            audit.record("update", locked, changes=changed)
    return locked


# --- Members' own keys ---


def policy_for(user: User) -> KeyPolicy:
    """The user's key policy; without one, the defaults (5 keys, no caps)."""
    return KeyPolicy.objects.filter(user=user).first() or KeyPolicy(user=user)


def member_limits(policy: KeyPolicy) -> dict[str, Any]:
    """The default limits, each lowered to the policy's cap (a cap also bounds "none")."""
    limits = _default_limits()
    for field in KeyPolicy.CAPPED:
        cap = getattr(policy, field)
        if cap is None:
            continue
        current = limits.get(field)
        limits[field] = cap if current is None else min(current, cap)
    return limits


def usable_keys(user: User) -> int:
    """Keys that still work or will (not revoked, not expired), the chat's own not counted."""
    from django.db.models import Q

    now = timezone.now()
    return (
        ApiKey.objects.filter(user=user, is_web_key=False, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .count()
    )


def check_member_keys_allowed() -> None:
    if not settings.SWITCHBOARD_MEMBER_KEYS:
        raise KeyActionError(
            _("Members cannot manage their own keys here: ask an admin for a key.")
        )


def do_create_member_key(
    *,
    user: User,
    name: str = "",
    models: list[str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A member's own key: the default limits within their policy's caps, at most max_keys."""
    check_member_keys_allowed()
    with transaction.atomic():
        # Lock the owner's row: two creations at once must not both pass the count.
        User.objects.select_for_update().filter(pk=user.pk).first()
        policy = policy_for(user)
        held = usable_keys(user)
        if held >= policy.max_keys:
            raise KeyActionError(
                ngettext(
                    "You already have %(count)d usable key, your limit: revoke one first "
                    "or ask an admin to raise it.",
                    "You already have %(count)d usable keys, your limit: revoke one first "
                    "or ask an admin to raise it.",
                    held,
                )
                % {"count": held}
            )
        return do_create_key(
            user=user,
            name=name,
            models=models,
            expires_at=expires_at,
            limits=member_limits(policy),
        )


def do_set_policy(*, user: User, **values: Any) -> KeyPolicy:
    """Set a user's key policy (``keys.forms.KeyPolicyForm``); 0 or None clears a cap."""
    unknown = sorted(set(values) - {"max_keys", *KeyPolicy.CAPPED})
    if unknown:
        raise KeyActionError(f"unknown policy field {unknown[0]!r}")
    with transaction.atomic():
        policy = KeyPolicy.objects.select_for_update().filter(user=user).first() or KeyPolicy(
            user=user
        )
        before = audit.snapshot(policy, POLICY_AUDIT_FIELDS) if policy.pk else {}
        data = {name: getattr(policy, name) for name in ["max_keys", *KeyPolicy.CAPPED]}
        data.update(values)
        form = KeyPolicyForm(
            data={name: "" if value is None else value for name, value in data.items()},
            instance=policy,
        )
        if not form.is_valid():
            raise KeyActionError(describe(form.errors))
        policy = form.save()
        changed = audit.diff(before, audit.snapshot(policy, POLICY_AUDIT_FIELDS))
        if changed:
            audit.record("update" if before else "create", policy, changes=changed)
    return policy


# --- Prices ---


def do_set_price(
    *,
    model: CatalogModel,
    input_price: Decimal,
    output_price: Decimal,
    cached_input_price: Decimal | None = None,
    effective_from: datetime | None = None,
    cache_write_price: Decimal | None = None,
) -> ModelPrice:
    """Add a price from ``effective_from`` (default now); earlier prices stay as history."""
    price: ModelPrice = _add_price(
        PriceForm,
        {"model": model.pk},
        PRICE_AUDIT_FIELDS,
        input_price=input_price,
        output_price=output_price,
        cached_input_price=cached_input_price,
        cache_write_price=cache_write_price,
        effective_from=effective_from,
    )
    return price


def do_set_route_price(
    *,
    route: Route,
    input_price: Decimal,
    output_price: Decimal,
    cached_input_price: Decimal | None = None,
    effective_from: datetime | None = None,
    cache_write_price: Decimal | None = None,
) -> RoutePrice:
    """Add what the route's provider charges us from ``effective_from`` (default now) on.

    History like model prices: earlier rows stay, and usage records keep the upstream
    cost computed when they were made.  The save bumps the catalog version
    (``chatapp.apps``), so every process prices the next request with it.
    """
    price: RoutePrice = _add_price(
        RoutePriceForm,
        {"route": route.pk},
        ROUTE_PRICE_AUDIT_FIELDS,
        input_price=input_price,
        output_price=output_price,
        cached_input_price=cached_input_price,
        cache_write_price=cache_write_price,
        effective_from=effective_from,
    )
    return price


# The command's flag for each price field, in the order they are checked.
PRICE_FLAGS = {
    "input_per_mtok": "--input",
    "output_per_mtok": "--output",
    "cached_input_per_mtok": "--cached-input",
    "cache_write_per_mtok": "--cache-write",
}


def _add_price(
    form_class: type[PriceForm],
    owner: dict[str, Any],
    audit_fields: list[str],
    *,
    input_price: Decimal,
    output_price: Decimal,
    cached_input_price: Decimal | None,
    cache_write_price: Decimal | None,
    effective_from: datetime | None,
) -> Any:
    """One new price row (a model's or a route's), validated by its form and audited.

    Refuses first what a DecimalField would round or choke on, naming the command's flag.
    """
    values = {
        "input_per_mtok": input_price,
        "output_per_mtok": output_price,
        "cached_input_per_mtok": cached_input_price,
        "cache_write_per_mtok": cache_write_price,
    }
    for field, value in values.items():
        flag = PRICE_FLAGS[field]
        if value is not None and not value.is_finite():
            raise KeyActionError(f"{flag}: expected a price of at least 0, got {value}")
        if value is not None and value.as_tuple().exponent < -12:  # type: ignore[operator]
            raise KeyActionError(f"{flag}: at most 12 decimal places, got {value}")
    form = form_class(data={**owner, **values, "effective_from": effective_from or timezone.now()})
    if not form.is_valid():
        errors = {PRICE_FLAGS.get(name, name): messages for name, messages in form.errors.items()}
        raise KeyActionError(describe(errors))
    with transaction.atomic():
        price = form.save()
        audit.record("create", price, changes=audit.diff({}, audit.snapshot(price, audit_fields)))
    return price


def do_set_alert_thresholds(
    *, percents: Any, key: ApiKey | None = None, user: User | None = None
) -> AlertThresholds:
    """Set the budget alert thresholds of one key, or of every key of one user.

    ``percents``: whole percentages (a list, or text such as ``"80, 95"``), checked by
    ``keys.forms.AlertThresholdsForm``; empty clears them (a key then follows its
    owner's).  Recorded in the audit log when something changed.
    """
    if (key is None) == (user is None):
        raise KeyActionError("give either a key or a user")
    with transaction.atomic():
        # Lock the row: two saves at once must not both create it.
        owner_filter = {"key": key} if key is not None else {"user": user}
        row = AlertThresholds.objects.select_for_update().filter(
            **owner_filter
        ).first() or AlertThresholds(**owner_filter)
        before = audit.snapshot(row, THRESHOLD_AUDIT_FIELDS) if row.pk else {}
        form = AlertThresholdsForm(data={"percents": percents}, instance=row)
        if not form.is_valid():
            raise KeyActionError(describe(form.errors))
        try:
            with transaction.atomic():
                row = form.save()
        except IntegrityError:  # created meanwhile by a concurrent save: update that one
            row = AlertThresholds.objects.select_for_update().get(**owner_filter)
            row.percents = form.cleaned_data["percents"]
            row.save(update_fields=["percents", "updated_at"])
        changed = audit.diff(before, audit.snapshot(row, THRESHOLD_AUDIT_FIELDS))
        if changed:
            audit.record("update" if before else "create", row, changes=changed)
    return row


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
