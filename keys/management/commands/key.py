"""``manage.py key create|list|revoke``: API keys from the shell."""

from __future__ import annotations

import json
from argparse import ArgumentParser, ArgumentTypeError
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from accounts.models import User
from chatapp.actions import CatalogError, check_model_names
from keys import limiter
from keys.actions import KeyActionError, do_create_key, do_revoke_key, do_set_limits
from keys.models import ApiKey, BudgetPeriod


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


UNSET: Any = None


def decimal_text(value: Decimal | None) -> str | None:
    """12.500000000000 → "12.5": amounts as people write them."""
    return None if value is None else f"{value.normalize():f}"


def limit_value(text: str) -> int | None:
    """A limit from the command line: a whole number; 0 or 'none' clears it."""
    if text.strip().lower() in ("none", "0", ""):
        return 0
    try:
        value = int(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a whole number, 0 or none, got {text!r}") from None
    if value < 0:
        raise ArgumentTypeError(f"expected a whole number of at least 0, got {value}")
    return value


def money_value(text: str) -> Decimal:
    if text.strip().lower() in ("none", "0", ""):
        return Decimal(0)
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ArgumentTypeError(
            f"expected an amount such as 12.50, 0 or none, got {text!r}"
        ) from None
    if not value.is_finite() or value < 0:
        raise ArgumentTypeError(f"expected an amount of at least 0, got {text!r}")
    return value


def find_key(ref: str) -> ApiKey:
    ref = ref.strip()
    try:
        return ApiKey.objects.select_related("user").by_prefix_or_id(ref)
    except ApiKey.DoesNotExist as exc:
        raise CommandError(f"no key with id {ref}" if ref.isdigit() else str(exc)) from None


def limits_row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.pk,
        "prefix": key.prefix,
        "limits": {
            "rpm": key.rpm,
            "rpd": key.rpd,
            "tpm": key.tpm,
            "tpd": key.tpd,
            "concurrency": key.concurrency,
            "token_budget": key.token_budget,
            "money_budget": decimal_text(key.money_budget),
            "period": key.budget_period,
            "max_output": key.max_output_tokens,
            "clamp": key.clamp_max_tokens,
        },
        "currency": settings.SWITCHBOARD_CURRENCY,
    }


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
    help = "Create, list, limit, inspect or revoke API keys."

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

        limits = sub.add_parser(
            "limits", help="set a key's rate limits and budgets (0 or none clears one)"
        )
        limits.add_argument("key", metavar="KEY_PREFIX_OR_ID")
        for flag, text in (
            ("--rpm", "requests per minute"),
            ("--rpd", "requests per day"),
            ("--tpm", "tokens per minute"),
            ("--tpd", "tokens per day"),
            ("--concurrency", "requests in flight at once"),
            ("--token-budget", "tokens per budget period"),
            ("--max-output", "max output tokens per request"),
        ):
            limits.add_argument(flag, metavar="N", type=limit_value, help=text)
        limits.add_argument(
            "--money-budget",
            metavar="AMOUNT",
            type=money_value,
            help=f"spend per budget period, in {settings.SWITCHBOARD_CURRENCY}",
        )
        limits.add_argument("--period", choices=BudgetPeriod.values, help="the budgets' period")
        clamp = limits.add_mutually_exclusive_group()
        clamp.add_argument(
            "--clamp", dest="clamp", action="store_true", default=None,
            help="lower a larger max_tokens to --max-output instead of refusing",
        )  # fmt: skip
        clamp.add_argument(
            "--reject",
            dest="clamp",
            action="store_false",
            help="refuse a larger max_tokens (default)",
        )
        limits.add_argument("--json", action="store_true", help="machine-readable output")

        usage = sub.add_parser("usage", help="current use against every limit and budget")
        usage.add_argument("key", metavar="KEY_PREFIX_OR_ID")
        usage.add_argument("--json", action="store_true", help="machine-readable output")

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

    def handle_limits(self, options: dict[str, Any]) -> None:
        key = find_key(options["key"])
        names = {
            "rpm": "rpm",
            "rpd": "rpd",
            "tpm": "tpm",
            "tpd": "tpd",
            "concurrency": "concurrency",
            "token_budget": "token_budget",
            "max_output": "max_output_tokens",
            "money_budget": "money_budget",
        }
        changes: dict[str, Any] = {
            field: options[option]
            for option, field in names.items()
            if options[option] is not UNSET
        }
        if options["period"]:
            changes["budget_period"] = options["period"]
        if options["clamp"] is not None:
            changes["clamp_max_tokens"] = options["clamp"]
        if changes:
            do_set_limits(key=key, **changes)
        row = limits_row(key)
        if options["json"]:
            self.stdout.write(json.dumps(row, indent=2))
            return
        self.stdout.write(
            f"key {key.pk} ({key.prefix}…): "
            + ", ".join(
                f"{name} {value if value is not None else 'none'}"
                for name, value in row["limits"].items()
            )
        )

    def handle_usage(self, options: dict[str, Any]) -> None:
        key = find_key(options["key"])
        # Not the server: in the embedded mode its counters are out of reach (see usage()).
        report = limiter.usage(key_id=key.pk, limits=key.limits, in_server=False)
        if options["json"]:
            self.stdout.write(json.dumps({"id": key.pk, "prefix": key.prefix, **report}, indent=2))
            return
        self.stdout.write(f"key {key.pk} ({key.prefix}…) at {report['time']}")
        if report["source"] == "ledger":
            self.stdout.write(
                "  (embedded mode: requests and tokens counted from the usage ledger, i.e. the"
                " requests that have ended; what is in flight only the server process knows)"
            )
        for name in ("rpm", "rpd", "tpm", "tpd"):
            item = report[name]
            limit = item["limit"] if item["limit"] is not None else "no limit"
            self.stdout.write(
                f"  {name:<12} {item['used']} / {limit}  (window resets {item['resets_at']})"
            )
        concurrency = report["concurrency"]
        in_flight = concurrency["in_flight"] if concurrency["in_flight"] is not None else "?"
        self.stdout.write(f"  {'in flight':<12} {in_flight} / {concurrency['limit'] or 'no limit'}")
        for name in ("token_budget", "money_budget"):
            item = report[name]
            limit = item["limit"] if item["limit"] is not None else "no limit"
            unit = f" {item['currency']}" if name == "money_budget" else ""
            resets = f"resets {item['resets_at']}" if item["resets_at"] else "lifetime"
            reserved = f" + {item['reserved']} reserved" if item["reserved"] is not None else ""
            self.stdout.write(
                f"  {name:<12} {item['spent']}{unit} spent{reserved} / {limit}"
                f"  ({item['period']}, {resets})"
            )

    def handle_revoke(self, options: dict[str, Any]) -> None:
        key = find_key(options["key"])
        if key.revoked_at is not None:
            self.stdout.write(
                f"key {key.pk} ({key.prefix}…) was already revoked at {key.revoked_at.isoformat()}"
            )
            return
        key = do_revoke_key(key=key)
        self.stdout.write(f"revoked key {key.pk} ({key.prefix}…) of {key.user.email}")
