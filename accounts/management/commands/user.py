"""``manage.py user add|list|role|disable|enable|password-link`` for scripted administration.

The same actions as the console (accounts.actions), audited as the command line.
"""

from __future__ import annotations

import json
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from accounts.actions import (
    AccountError,
    do_create_user,
    do_issue_password_link,
    do_set_active,
    do_set_role,
    find_user,
)
from accounts.models import Role, User


class Command(BaseCommand):
    help = "Add, list, disable or enable users."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="create a user")
        add.add_argument("email")
        add.add_argument("--role", choices=Role.values, default=Role.MEMBER)
        add.add_argument("--password", help="without it the user gets no usable password")
        add.add_argument("--name", default="", help="the user's display name")
        listing = sub.add_parser("list", help="list users")
        listing.add_argument("--json", action="store_true", help="machine-readable output")
        for name, text in (
            ("disable", "stop a user signing in"),
            ("enable", "let a user sign in again"),
        ):
            action = sub.add_parser(name, help=text)
            action.add_argument("email")
        role = sub.add_parser("role", help="change a user's role")
        role.add_argument("email")
        role.add_argument("role", choices=Role.values)
        link = sub.add_parser(
            "password-link", help="print a one-time link (72 h) for the user to set a password"
        )
        link.add_argument("email")
        link.add_argument(
            "--base-url", default="", help="the site's address, e.g. https://llm.example.com"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"handle_{options['action'].replace('-', '_')}")(options)
        except AccountError as exc:
            raise CommandError(str(exc)) from None

    def handle_add(self, options: dict[str, Any]) -> None:
        user = do_create_user(
            email=options["email"],
            role=options["role"],
            password=options["password"],
            name=options["name"],
        )
        self.stdout.write(f"created {user.role} {user.email}")

    def handle_list(self, options: dict[str, Any]) -> None:
        users = list(User.objects.order_by("email"))
        if options["json"]:
            rows = [
                {
                    "id": user.pk,
                    "email": user.email,
                    "role": user.role,
                    "active": user.is_active,
                    "date_joined": user.date_joined.isoformat(),
                }
                for user in users
            ]
            self.stdout.write(json.dumps(rows, indent=2))
            return
        for user in users:
            state = "active" if user.is_active else "disabled"
            self.stdout.write(f"{user.email}\t{user.role}\t{state}")

    def handle_disable(self, options: dict[str, Any]) -> None:
        user = do_set_active(email=options["email"], active=False)
        self.stdout.write(f"disabled {user.email}")

    def handle_enable(self, options: dict[str, Any]) -> None:
        user = do_set_active(email=options["email"], active=True)
        self.stdout.write(f"enabled {user.email}")

    def handle_role(self, options: dict[str, Any]) -> None:
        user = do_set_role(user=find_user(email=options["email"]), role=options["role"])
        self.stdout.write(f"{user.email} is now {user.role}")

    def handle_password_link(self, options: dict[str, Any]) -> None:
        path = do_issue_password_link(user=find_user(email=options["email"]))
        self.stdout.write(options["base_url"].rstrip("/") + path)
