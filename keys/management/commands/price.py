"""``manage.py price set|list``: per-model prices per 1M tokens, with history."""

from __future__ import annotations

import json
from argparse import ArgumentParser, ArgumentTypeError
from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chatapp.actions import CatalogError, check_model
from keys.actions import KeyActionError, do_set_price
from keys.management.commands.key import decimal_text, iso, parse_expiry
from keys.models import ModelPrice


def price_value(text: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ArgumentTypeError(f"expected a price such as 0.15, got {text!r}") from None
    if not value.is_finite() or value < 0:
        raise ArgumentTypeError(f"expected a price of at least 0, got {text!r}")
    return value


def price_row(price: ModelPrice) -> dict[str, Any]:
    return {
        "model": price.model.name,
        "input": decimal_text(price.input_per_mtok),
        "output": decimal_text(price.output_per_mtok),
        "cached_input": decimal_text(price.cached_input_per_mtok),
        "currency": price.currency,
        "per": "1M tokens",
        "effective_from": iso(price.effective_from),
    }


class Command(BaseCommand):
    help = f"Set or list model prices (per 1M tokens, in SWITCHBOARD_CURRENCY={settings.SWITCHBOARD_CURRENCY})."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("set", help="add a price from now (or --from) on; history is kept")
        add.add_argument("model", metavar="MODEL")
        add.add_argument(
            "--input", required=True, type=price_value, metavar="PRICE", help="per 1M input tokens"
        )
        add.add_argument(
            "--output",
            required=True,
            type=price_value,
            metavar="PRICE",
            help="per 1M output tokens",
        )
        add.add_argument(
            "--cached-input",
            type=price_value,
            metavar="PRICE",
            help="per 1M cached input tokens (default: --input)",
        )
        add.add_argument(
            "--from", dest="effective_from", metavar="ISO-8601", help="when the price takes effect"
        )
        add.add_argument("--json", action="store_true")
        listing = sub.add_parser("list", help="prices with their history, newest first")
        listing.add_argument("model", nargs="?", metavar="MODEL")
        listing.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"handle_{options['action']}")(options)
        except (KeyActionError, CatalogError) as exc:
            raise CommandError(str(exc)) from None

    def handle_set(self, options: dict[str, Any]) -> None:
        model = check_model(name=options["model"])
        price = do_set_price(
            model=model,
            input_price=options["input"],
            output_price=options["output"],
            cached_input_price=options["cached_input"],
            effective_from=parse_expiry(options["effective_from"])
            if options["effective_from"]
            else None,
        )
        if options["json"]:
            self.stdout.write(json.dumps(price_row(price), indent=2))
            return
        cached = (
            f", cached input {price.cached_input_per_mtok}"
            if price.cached_input_per_mtok is not None
            else ""
        )
        self.stdout.write(
            f"{model.name}: input {price.input_per_mtok}, output {price.output_per_mtok}{cached} "
            f"{price.currency} per 1M tokens from {iso(price.effective_from)}"
        )

    def handle_list(self, options: dict[str, Any]) -> None:
        prices = ModelPrice.objects.select_related("model").order_by(
            "model__name", "-effective_from", "-id"
        )
        if options["model"]:
            prices = prices.filter(model=check_model(name=options["model"]))
        rows = [price_row(price) for price in prices]
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for row in rows:
            self.stdout.write(
                f"{row['model']}\tinput {row['input']}\toutput {row['output']}\tcached {row['cached_input'] or '-'}"
                f"\t{row['currency']}/1M\tfrom {row['effective_from']}"
            )
