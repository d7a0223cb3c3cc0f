"""Workflows on people: create, change role, disable/enable, password links, bootstrap.

The console, the Django admin and ``manage.py user`` all go through these; each
change is written to the audit log (``accounts.audit``) in the same transaction,
so a change without its audit event cannot be committed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from importlib import import_module

from django.conf import settings
from django.contrib.auth import SESSION_KEY
from django.contrib.auth.password_validation import validate_password
from django.contrib.auth.tokens import default_token_generator
from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from django.utils.translation import gettext as _

from accounts import audit
from accounts.models import Role, User

# What the audit log records of a user (the password only as "set"/"changed").
USER_FIELDS = ("email", "name", "role", "is_active", "is_superuser")


class AccountError(Exception):
    """A request about accounts that cannot be carried out; the message says why.

    ``field`` names the form field the problem belongs to (None: the whole request).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def find_user(*, email: str) -> User:
    try:
        return User.objects.get(email=User.normalize_address(email))
    except User.DoesNotExist:
        raise AccountError(_("no user with email %(email)s") % {"email": email}) from None


def check_role(*, role: str) -> str:
    if role not in Role.values:
        raise AccountError(
            _("role %(role)r is not one of %(roles)s")
            % {"role": role, "roles": ", ".join(Role.values)},
            field="role",
        )
    return role


def check_new_user(*, email: str, role: str, password: str | None) -> str:
    """Validate a new user's fields; returns the normalized email."""
    address = User.normalize_address(email)
    try:
        validate_email(address)
    except ValidationError:
        raise AccountError(
            _("%(email)r is not a valid email address") % {"email": email}, field="email"
        ) from None
    check_role(role=role)
    if User.objects.filter(email=address).exists():
        raise AccountError(
            _("a user with email %(email)s already exists") % {"email": address}, field="email"
        )
    if password is not None:
        try:
            validate_password(password, User(email=address))
        except ValidationError as exc:
            raise AccountError(
                _("password rejected: ") + " ".join(exc.messages), field="password"
            ) from None
    return address


def do_create_user(
    *, email: str, role: str = Role.MEMBER, password: str | None = None, name: str = ""
) -> User:
    """Create a user (no usable password without ``password``: send a password link)."""
    address = check_new_user(email=email, role=role, password=password)
    with transaction.atomic():
        user = User.objects.create_user(address, password, role=role, name=name.strip())
        after = audit.snapshot(user, (*USER_FIELDS, "password"))
        audit.record("create", user, changes=audit.diff({}, after))
    return user


def _other_active_admins(user: User) -> bool:
    return User.objects.filter(role=Role.ADMIN, is_active=True).exclude(pk=user.pk).exists()


def check_set_role(*, user: User, role: str) -> str:
    check_role(role=role)
    if user.role == Role.ADMIN and role != Role.ADMIN and not _other_active_admins(user):
        raise AccountError(
            _("%(email)s is the last active admin: make another admin first")
            % {"email": user.email},
            field="role",
        )
    return role


def do_set_role(*, user: User, role: str) -> User:
    """Give ``user`` a role; the superuser flag follows it (``User.save``)."""
    # The row lock serialises two admins demoting each other at once, so the
    # "last active admin" check below cannot be passed by both.
    with transaction.atomic():
        _lock_admins()
        user = User.objects.select_for_update().get(pk=user.pk)
        check_set_role(user=user, role=role)
        if user.role == role:
            return user
        before = audit.snapshot(user, USER_FIELDS)
        user.role = role
        user.save(update_fields=["role"])
        audit.record(
            "change role", user, changes=audit.diff(before, audit.snapshot(user, USER_FIELDS))
        )
    return user


def _lock_admins() -> None:
    """Lock the admins' rows (in id order): the one lock of this module's workflows."""
    list(User.objects.select_for_update().filter(role=Role.ADMIN).order_by("pk").values("pk"))


def check_set_active(*, user: User, active: bool) -> None:
    if not active and user.role == Role.ADMIN and user.is_active and not _other_active_admins(user):
        raise AccountError(
            _("%(email)s is the last active admin: it cannot be disabled") % {"email": user.email}
        )


def do_set_active(*, user: User | None = None, email: str | None = None, active: bool) -> User:
    """Enable or disable a user (by instance or email).

    Disabling ends their sessions at once and, through the key cache's invalidation
    on every user save (``keys.apps``), their API keys fail on their very next request.
    """
    if user is None:
        user = find_user(email=email or "")
    with transaction.atomic():
        _lock_admins()
        user = User.objects.select_for_update().get(pk=user.pk)
        check_set_active(user=user, active=active)
        if user.is_active == active:
            return user
        before = audit.snapshot(user, USER_FIELDS)
        user.is_active = active
        user.save(update_fields=["is_active"])
        if not active:
            end_sessions(user)
        audit.record(
            "enable" if active else "disable",
            user,
            changes=audit.diff(before, audit.snapshot(user, USER_FIELDS)),
        )
    return user


def end_sessions(user: User) -> int:
    """Delete every stored session signed in as ``user``; returns how many.

    Sessions live in the database (Django's default engine, or ``cached_db``): the
    unexpired rows are decoded to find the user's, and each is deleted through the
    configured engine (so a cached copy goes too).  Whatever the engine, a disabled
    user is also refused on their next request by the auth backend (``is_active``).
    """
    engine = import_module(settings.SESSION_ENGINE).SessionStore
    codec = DatabaseSessionStore()
    ended = [
        key
        for key, data in Session.objects.filter(expire_date__gt=timezone.now())
        .values_list("session_key", "session_data")
        .iterator(chunk_size=2000)
        if str(codec.decode(data).get(SESSION_KEY)) == str(user.pk)
    ]
    for key in ended:
        engine(session_key=key).delete()
    return len(ended)


def check_password_link(*, user: User) -> None:
    if not user.is_active:
        raise AccountError(
            _("%(email)s is disabled: enable them before sending a password link")
            % {"email": user.email}
        )


def do_issue_password_link(*, user: User) -> str:
    """A one-time link (path) to set ``user``'s password, valid PASSWORD_RESET_TIMEOUT (72 h).

    Django's token is derived from the password hash and the last sign-in, so it stops
    working once used.  The audit log records that a link was issued, never the link.
    """
    check_password_link(user=user)
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    token = default_token_generator.make_token(user)
    with transaction.atomic():
        audit.record("password link", user)
    return reverse("accounts:set_password", kwargs={"uidb64": uid, "token": token})


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
