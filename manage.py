#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    if sys.argv[1:2] == ["serve"]:
        # Daphne makes its event loop as Django loads its app: uvloop's, set before.
        from chatapp.server import use_uvloop

        use_uvloop()
    from django.core.management import execute_from_command_line

    from chatapp.startup import load_settings_or_exit

    load_settings_or_exit()
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
