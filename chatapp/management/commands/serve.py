"""``manage.py serve``: set up, serve with Daphne, and say where to sign in once it listens.

The README's first command ends here.  ``bootstrap`` runs first (migrations, the
first admin, the local model); what it has to tell — above all the first admin's
one-time password — is printed after the server is ready, as the last lines on the
screen, so the server's start-up output cannot scroll it away.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Bootstrap, then serve pages, WebSockets and /v1 with Daphne on one port."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
        parser.add_argument("--port", type=int, default=8000, help="port to listen on")

    def handle(self, *args: Any, **options: Any) -> None:
        host, port = options["host"], options["port"]
        setup = io.StringIO()
        call_command("bootstrap", stdout=setup)

        # Imported here: Daphne installs Twisted's asyncio reactor as it loads.
        from daphne.endpoints import build_endpoint_description_strings
        from daphne.server import Server

        from chatapp.asgi import application

        logging.basicConfig(level=logging.INFO, format="%(asctime)-15s %(levelname)-8s %(message)s")
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104

        def ready() -> None:
            lines = [line for line in setup.getvalue().splitlines() if line.strip()]
            banner = [
                "",
                "=" * 72,
                f"Switchboard is ready: open http://{shown}:{port}/",
                *lines,
                "Chat at /chat/, the console at /console/, the API at /v1/.",
                "Lost the admin's password? `manage.py user password-link EMAIL` prints a"
                f" one-time link to set a new one (open it at http://{shown}:{port}).",
                "=" * 72,
            ]
            sys.stdout.write("\n".join(banner) + "\n")
            sys.stdout.flush()

        Server(
            application=application,
            endpoints=build_endpoint_description_strings(host=host, port=port),
            ready_callable=ready,
        ).run()
