"""``manage.py bootstrap``: migrate, then make sure a first admin exists. Idempotent."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from accounts.actions import AccountError, do_bootstrap_admin
from chatapp.actions import do_register_local_model
from chatapp.environ import Env


class Command(BaseCommand):
    help = "Apply migrations and create the first admin (from SWITCHBOARD_ADMIN_EMAIL/_PASSWORD)."

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity = options["verbosity"]
        call_command("migrate", interactive=False, verbosity=max(0, verbosity - 1))
        env = Env()
        email = env.string("SWITCHBOARD_ADMIN_EMAIL", "admin@example.com")
        password = env.raw("SWITCHBOARD_ADMIN_PASSWORD")
        try:
            result = do_bootstrap_admin(email=email, password=password)
        except AccountError as exc:
            raise CommandError(f"cannot create the first admin: {exc}") from None
        local_model = do_register_local_model()
        if local_model is not None:
            self.stdout.write(
                f"Registered the local model {local_model.name} ({local_model.label})."
            )
        if not result.created:
            if local_model is None:
                self.stdout.write(
                    f"Database up to date; admin {result.email} already exists. Nothing changed."
                )
            return
        self.stdout.write(self.style.SUCCESS(f"Created the first admin: {result.email}"))
        if result.generated_password:
            self.stdout.write(
                "Generated password (shown once, not stored in clear): " + result.generated_password
            )
        self.stdout.write(f"Data directory: {settings.DATA_DIR}")
