"""``manage.py key create|list|revoke``: API keys from the shell."""

from __future__ import annotations

import json
from argparse import ArgumentParser
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from accounts.models import User
from chatapp.actions import CatalogError, check_model_names
from keys.actions import KeyActionError, do_create_key, do_revoke_key
from keys.models import ApiKey


def parse_expiry(text: str) -> datetime:
    """An ISO-8601 date or datetime; without an offset it is read in ``settings.TIME_ZONE``."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CommandError(
            f"--expires {text!r}: expected an ISO-8601 date or time, e.g. 2030-01-31 or "
            "2030-01-31T18:00+08:00"
        ) from None
    if timezone.is_naive(value):
        value = timezone.make_aware(value, ZoneInfo(settings.TIME_ZONE))
    return value


def find_user(email: str) -> User:
    try:
        return User.objects.get(email=User.normalize_address(email))
    except User.DoesNotExist:
        raise CommandError(f"no user with email {email}") from None


def iso(value: datetime | None) -> str | None:
    """Machine-readable times are UTC, whatever offset they were given in."""
    return value.astimezone(UTC).isoformat() if value is not None else None


def local(value: datetime) -> str:
    return f"{timezone.localtime(value):%Y-%m-%d %H:%M}"


def key_row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.pk,
        "prefix": key.prefix,
        "name": key.name,
        "user": key.user.email,
        "state": key.state,
        "models": list(key.allowed_models or []),
        "expires_at": iso(key.expires_at),
        "created_at": iso(key.created_at),
        "last_used_at": iso(key.last_used_at),
        "web_key": key.is_web_key,
    }


class Command(BaseCommand):
    help = "Create, list or revoke API keys."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)

        create = sub.add_parser("create", help="issue a key; the full key is printed once")
        create.add_argument("--user", required=True, metavar="EMAIL")
        create.add_argument("--name", default="")
        create.add_argument(
            "--models",
            default="",
            metavar="A,B",
            help="comma-separated public model names the key may use (default: all)",
        )
        create.add_argument(
            "--expires",
            metavar="ISO-8601",
            help=f"expiry date or time; without an offset it is in {settings.TIME_ZONE}",
        )
        create.add_argument("--json", action="store_true", help="machine-readable output")

        listing = sub.add_parser("list", help="list keys (never their secrets)")
        listing.add_argument("--user", metavar="EMAIL", help="only this user's keys")
        listing.add_argument("--json", action="store_true", help="machine-readable output")

        revoke = sub.add_parser("revoke", help="revoke a key for good")
        revoke.add_argument("key", metavar="KEY_PREFIX_OR_ID")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"handle_{options['action']}")(options)
        except (KeyActionError, CatalogError) as exc:
            raise CommandError(str(exc)) from None

    def handle_create(self, options: dict[str, Any]) -> None:
        user = find_user(options["user"])
        models = check_model_names(names=options["models"].split(","))
        expires_at = parse_expiry(options["expires"]) if options["expires"] else None
        key, raw = do_create_key(
            user=user, name=options["name"], models=models, expires_at=expires_at
        )
        if options["json"]:
            self.stdout.write(json.dumps({**key_row(key), "key": raw}, indent=2))
            return
        label = f" {key.name!r}" if key.name else ""
        self.stdout.write(f"created key {key.pk}{label} for {user.email}")
        self.stdout.write(raw)
        self.stdout.write("Copy it now: the full key is shown only this once and is not stored.")

    def handle_list(self, options: dict[str, Any]) -> None:
        keys = ApiKey.objects.select_related("user").order_by("user__email", "-created_at")
        if options["user"]:
            keys = keys.filter(user=find_user(options["user"]))
        if options["json"]:
            self.stdout.write(json.dumps([key_row(key) for key in keys], indent=2))
            return
        for key in keys:
            models = ",".join(key.allowed_models or []) or "all models"
            expires = f"expires {local(key.expires_at)}" if key.expires_at else "no expiry"
            used = f"last used {local(key.last_used_at)}" if key.last_used_at else "never used"
            self.stdout.write(
                f"{key.pk}\t{key.prefix}\t{key.name or '-'}\t{key.user.email}\t{key.state}"
                f"\t{models}\t{expires}\tcreated {local(key.created_at)}\t{used}"
            )

    def handle_revoke(self, options: dict[str, Any]) -> None:
        ref = options["key"].strip()
        try:
            key = ApiKey.objects.by_prefix_or_id(ref)
        except ApiKey.DoesNotExist as exc:
            raise CommandError(f"no key with id {ref}" if ref.isdigit() else str(exc)) from None
        if key.revoked_at is not None:
            self.stdout.write(
                f"key {key.pk} ({key.prefix}…) was already revoked at {key.revoked_at.isoformat()}"
            )
            return
        key = do_revoke_key(key=key)
        self.stdout.write(f"revoked key {key.pk} ({key.prefix}…) of {key.user.email}")
