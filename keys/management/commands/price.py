"""``manage.py price set|list|set-route|list-routes``: prices per 1M tokens, with history.

``set``/``list``: what clients are charged per model.  ``set-route``/``list-routes``:
what a route's provider charges us (the upstream cost; charged - upstream = margin).
"""

from __future__ import annotations

import json
from argparse import ArgumentParser, ArgumentTypeError
from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chatapp.actions import CatalogError, check_model
from chatapp.models import Route
from keys.actions import KeyActionError, do_set_price, do_set_route_price
from keys.management.commands.key import decimal_text, iso, parse_expiry
from keys.models import ModelPrice, RoutePrice


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
        "cache_write": decimal_text(price.cache_write_per_mtok),
        "currency": price.currency,
        "per": "1M tokens",
        "effective_from": iso(price.effective_from),
    }


def route_price_row(price: RoutePrice) -> dict[str, Any]:
    route = price.route
    return {
        "route": route.pk,
        "model": route.model.name,
        "provider": route.provider.name,
        "upstream_model": route.upstream_model,
        "input": decimal_text(price.input_per_mtok),
        "output": decimal_text(price.output_per_mtok),
        "cached_input": decimal_text(price.cached_input_per_mtok),
        "cache_write": decimal_text(price.cache_write_per_mtok),
        "currency": price.currency,
        "per": "1M tokens",
        "effective_from": iso(price.effective_from),
    }


def find_route(model: str, provider: str, upstream_model: str | None) -> Route:
    """The one route of ``model`` through ``provider`` (and ``upstream_model`` if given)."""
    routes = Route.objects.select_related("model", "provider").filter(
        model=check_model(name=model), provider__name=provider
    )
    if upstream_model:
        routes = routes.filter(upstream_model=upstream_model)
    found = list(routes[:2])
    if not found:
        raise CommandError(f"{model} has no route through provider {provider!r}")
    if len(found) > 1:
        raise CommandError(
            f"{model} has several routes through {provider!r}: name one with --upstream-model"
        )
    return found[0]


def add_price_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, type=price_value, metavar="PRICE", help="per 1M input tokens"
    )
    parser.add_argument(
        "--output", required=True, type=price_value, metavar="PRICE", help="per 1M output tokens"
    )
    parser.add_argument(
        "--cached-input",
        type=price_value,
        metavar="PRICE",
        help="per 1M cached input tokens (default: --input)",
    )
    parser.add_argument(
        "--cache-write",
        type=price_value,
        metavar="PRICE",
        help="per 1M input tokens written to the prompt cache (Anthropic; default: --input)",
    )
    parser.add_argument(
        "--from", dest="effective_from", metavar="ISO-8601", help="when the price takes effect"
    )
    parser.add_argument("--json", action="store_true")


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
            "--cache-write",
            type=price_value,
            metavar="PRICE",
            help="per 1M input tokens written to the prompt cache (default: --input)",
        )
        add.add_argument(
            "--from", dest="effective_from", metavar="ISO-8601", help="when the price takes effect"
        )
        add.add_argument("--json", action="store_true")
        listing = sub.add_parser("list", help="prices with their history, newest first")
        listing.add_argument("model", nargs="?", metavar="MODEL")
        listing.add_argument("--json", action="store_true")
        route = sub.add_parser(
            "set-route",
            help="add what a route's provider charges us from now (or --from) on; history is kept",
        )
        route.add_argument("model", metavar="MODEL")
        route.add_argument("--provider", required=True, metavar="NAME")
        route.add_argument(
            "--upstream-model", metavar="ID", help="when the model has several routes there"
        )
        add_price_arguments(route)
        routes = sub.add_parser("list-routes", help="upstream prices with their history")
        routes.add_argument("model", nargs="?", metavar="MODEL")
        routes.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"handle_{options['action'].replace('-', '_')}")(options)
        except (KeyActionError, CatalogError) as exc:
            raise CommandError(str(exc)) from None

    def handle_set(self, options: dict[str, Any]) -> None:
        model = check_model(name=options["model"])
        price = do_set_price(
            model=model,
            input_price=options["input"],
            output_price=options["output"],
            cached_input_price=options["cached_input"],
            cache_write_price=options["cache_write"],
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
        ) + (
            f", cache write {price.cache_write_per_mtok}"
            if price.cache_write_per_mtok is not None
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

    def handle_set_route(self, options: dict[str, Any]) -> None:
        route = find_route(options["model"], options["provider"], options["upstream_model"])
        price = do_set_route_price(
            route=route,
            input_price=options["input"],
            output_price=options["output"],
            cached_input_price=options["cached_input"],
            cache_write_price=options["cache_write"],
            effective_from=parse_expiry(options["effective_from"])
            if options["effective_from"]
            else None,
        )
        row = route_price_row(price)
        if options["json"]:
            self.stdout.write(json.dumps(row, indent=2))
            return
        cached = f", cached input {row['cached_input']}" if row["cached_input"] else ""
        cached += f", cache write {row['cache_write']}" if row["cache_write"] else ""
        self.stdout.write(
            f"{row['model']} via {row['provider']}/{row['upstream_model']}: upstream input "
            f"{row['input']}, output {row['output']}{cached} {row['currency']} per 1M tokens "
            f"from {row['effective_from']}"
        )

    def handle_list_routes(self, options: dict[str, Any]) -> None:
        prices = RoutePrice.objects.select_related("route__model", "route__provider").order_by(
            "route__model__name", "route__provider__name", "route_id", "-effective_from", "-id"
        )
        if options["model"]:
            prices = prices.filter(route__model=check_model(name=options["model"]))
        rows = [route_price_row(price) for price in prices]
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for row in rows:
            self.stdout.write(
                f"{row['model']}\t{row['provider']}/{row['upstream_model']}\tinput {row['input']}"
                f"\toutput {row['output']}\tcached {row['cached_input'] or '-'}"
                f"\t{row['currency']}/1M\tfrom {row['effective_from']}"
            )
