"""``manage.py model add|list|enable|disable|rules``: the models clients ask for, their routes,
and what their upstreams accept (parameter rules)."""

from __future__ import annotations

import json
from argparse import ArgumentParser, BooleanOptionalAction
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Prefetch

from chatapp.actions import (
    CatalogError,
    check_provider,
    do_add_model,
    do_set_model_enabled,
    do_update_model,
)
from chatapp.models import CatalogModel, Route
from chatapp.relay import params


def capabilities(model: CatalogModel) -> list[str]:
    flags = {
        "chat": model.supports_chat,
        "vision": model.supports_vision,
        "tools": model.supports_tools,
        "embeddings": model.supports_embeddings,
    }
    return [name for name, on in flags.items() if on]


class Command(BaseCommand):
    help = "Add, list, enable or disable models; adding a model again with another provider adds a route."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)

        add = sub.add_parser(
            "add",
            help="add a model, or another route to an existing one",
            description=(
                "Add a model routed to a provider. Naming an existing model adds a route to it; "
                "options given then update the model, options left out keep its values."
            ),
        )
        add.add_argument("name", help="the public name clients put in the request's model field")
        add.add_argument("--provider", required=True)
        add.add_argument("--upstream-model", required=True, metavar="ID")
        add.add_argument("--display-name")
        add.add_argument("--description")
        for flag, text in (
            ("chat", "serves chat (default on)"),
            ("vision", "accepts images"),
            ("tools", "supports tool calls"),
            ("embeddings", "serves embeddings"),
        ):
            add.add_argument(f"--{flag}", action=BooleanOptionalAction, default=None, help=text)
        add.add_argument("--context", type=int, metavar="TOKENS", help="context window")
        add.add_argument("--max-output", type=int, metavar="TOKENS", help="max output tokens")
        add.add_argument("--priority", type=int, default=0, help="lower is tried first (default 0)")
        add.add_argument(
            "--weight", type=int, default=1, help="share among equal priorities (default 1)"
        )

        listing = sub.add_parser("list", help="list models with their routes")
        listing.add_argument("--json", action="store_true", help="machine-readable output")

        for name, text in (("enable", "offer a model to clients"), ("disable", "withdraw it")):
            action = sub.add_parser(name, help=text)
            action.add_argument("name")

        rules = sub.add_parser(
            "rules",
            help="show or set what the model's upstream accepts",
            description=(
                "Parameter rules, applied to the body sent upstream: 'PARAM: drop', "
                "'PARAM: rename NEW', 'PARAM: fix JSON-VALUE', 'PARAM: refuse' (a 400 naming it). "
                "--rule replaces every rule; without options the rules are shown."
            ),
        )
        rules.add_argument("name")
        rules.add_argument(
            "--rule", action="append", metavar="'PARAM: ACTION [ARG]'", help="repeat for each rule"
        )
        rules.add_argument("--clear", action="store_true", help="remove every rule")
        rules.add_argument(
            "--fold-system",
            action=BooleanOptionalAction,
            default=None,
            help="fold the system message into the first user turn",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"handle_{options['action']}")(options)
        except CatalogError as exc:
            raise CommandError(str(exc)) from None

    def handle_add(self, options: dict[str, Any]) -> None:
        provider = check_provider(name=options["provider"])
        model, route, created = do_add_model(
            name=options["name"],
            provider=provider,
            upstream_model=options["upstream_model"],
            display_name=options["display_name"],
            description=options["description"],
            context_window=options["context"],
            max_output_tokens=options["max_output"],
            chat=options["chat"],
            vision=options["vision"],
            tools=options["tools"],
            embeddings=options["embeddings"],
            priority=options["priority"],
            weight=options["weight"],
        )
        what = "added model" if created else "added a route to model"
        self.stdout.write(
            f"{what} {model.name} → {provider.name}/{route.upstream_model}"
            f" (priority {route.priority}, weight {route.weight};"
            f" {', '.join(capabilities(model)) or 'no capabilities'})"
        )

    def handle_rules(self, options: dict[str, Any]) -> None:
        model = CatalogModel.objects.filter(name=options["name"]).first()
        if model is None:
            raise CommandError(f"no model named {options['name']!r}")
        changes: dict[str, Any] = {}
        if options["clear"] and options["rule"]:
            raise CommandError("--clear and --rule exclude each other")
        if options["clear"]:
            changes["param_rules"] = []
        elif options["rule"]:
            try:
                found = params.parse_text("\n".join(options["rule"]))
            except params.RuleError as exc:
                raise CommandError(f"--rule: {exc}".replace("line ", "rule ")) from None
            changes["param_rules"] = [rule.as_json() for rule in found]
        if options["fold_system"] is not None:
            changes["fold_system"] = options["fold_system"]
        if changes:
            model = do_update_model(model=model, changes=changes)
        text = params.as_text(params.from_json(model.param_rules)) or "(no parameter rules)"
        self.stdout.write(f"{model.name}:\n{text}")
        if model.fold_system:
            self.stdout.write("system message folded into the first user turn")

    def handle_list(self, options: dict[str, Any]) -> None:
        routes = Route.objects.select_related("provider").order_by("priority", "-weight", "id")
        models = list(
            CatalogModel.objects.prefetch_related(Prefetch("routes", queryset=routes)).order_by(
                "name"
            )
        )
        if options["json"]:
            rows = [
                {
                    "id": model.pk,
                    "name": model.name,
                    "display_name": model.display_name,
                    "description": model.description,
                    "context_window": model.context_window,
                    "max_output_tokens": model.max_output_tokens,
                    "capabilities": capabilities(model),
                    "enabled": model.enabled,
                    "routes": [
                        {
                            "id": route.pk,
                            "provider": route.provider.name,
                            "upstream_model": route.upstream_model,
                            "priority": route.priority,
                            "weight": route.weight,
                            "enabled": route.enabled,
                            "provider_enabled": route.provider.enabled,
                        }
                        for route in model.routes.all()
                    ],
                }
                for model in models
            ]
            self.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False))
            return
        for model in models:
            state = "enabled" if model.enabled else "disabled"
            self.stdout.write(f"{model.name}\t{state}\t{','.join(capabilities(model))}")
            for route in model.routes.all():
                route_state = "enabled" if route.enabled else "disabled"
                if route.enabled and not route.provider.enabled:
                    route_state = "provider disabled"
                self.stdout.write(
                    f"  → {route.provider.name}/{route.upstream_model}\tpriority {route.priority}"
                    f"\tweight {route.weight}\t{route_state}"
                )

    def handle_enable(self, options: dict[str, Any]) -> None:
        model = do_set_model_enabled(name=options["name"], enabled=True)
        self.stdout.write(f"enabled model {model.name}")

    def handle_disable(self, options: dict[str, Any]) -> None:
        model = do_set_model_enabled(name=options["name"], enabled=False)
        self.stdout.write(f"disabled model {model.name}")
