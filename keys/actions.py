"""Workflows on API keys."""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.utils import timezone

from accounts.models import User
from keys.models import ApiKey


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
    return ApiKey.issue(
        user=user,
        name=name,
        allowed_models=sorted(set(models or [])),
        expires_at=expires_at,
        is_web_key=is_web_key,
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
