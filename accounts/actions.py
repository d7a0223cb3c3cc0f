"""Workflows on people: create, disable, bootstrap the first admin."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction

from accounts.models import Role, User


class AccountError(Exception):
    """A request about accounts that cannot be carried out; the message says why."""


def check_new_user(*, email: str, role: str, password: str | None) -> str:
    """Validate a new user's fields; returns the normalized email."""
    address = User.normalize_address(email)
    try:
        validate_email(address)
    except ValidationError:
        raise AccountError(f"{email!r} is not a valid email address") from None
    if role not in Role.values:
        raise AccountError(f"role {role!r} is not one of {', '.join(Role.values)}")
    if User.objects.filter(email=address).exists():
        raise AccountError(f"a user with email {address} already exists")
    if password is not None:
        try:
            validate_password(password, User(email=address))
        except ValidationError as exc:
            raise AccountError("password rejected: " + " ".join(exc.messages)) from None
    return address


def do_create_user(*, email: str, role: str = Role.MEMBER, password: str | None = None) -> User:
    address = check_new_user(email=email, role=role, password=password)
    return User.objects.create_user(address, password, role=role, is_superuser=(role == Role.ADMIN))


def do_set_active(*, email: str, active: bool) -> User:
    try:
        user = User.objects.get(email=User.normalize_address(email))
    except User.DoesNotExist:
        raise AccountError(f"no user with email {email}") from None
    if user.is_active != active:
        user.is_active = active
        user.save(update_fields=["is_active"])
    return user


@dataclass(frozen=True)
class BootstrapResult:
    created: bool
    email: str
    generated_password: str | None = None


def do_bootstrap_admin(*, email: str, password: str | None) -> BootstrapResult:
    """Create the first admin unless an admin exists already (idempotent).

    With no password given, a random one is generated and returned so the caller can
    print it once; it is never stored in clear.
    """
    # The transaction plus the unique email keeps two concurrent bootstraps from
    # creating two admins: the loser's insert fails and it reports the winner's.
    with transaction.atomic():
        existing = User.objects.filter(role=Role.ADMIN).order_by("date_joined").first()
        if existing is not None:
            return BootstrapResult(created=False, email=existing.email)
        generated = None
        if not password:
            generated = password = secrets.token_urlsafe(18)
        do_create_user(email=email, role=Role.ADMIN, password=password)
    return BootstrapResult(
        created=True, email=User.normalize_address(email), generated_password=generated
    )
